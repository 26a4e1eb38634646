"""Tensor and pipeline parallelism: per-GPU shares, vLLM's KV capacity rule, the CLI, TP profiles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from calibrate.profile import load_profile
from experiments.cli import main
from sim.config import KVConfig, SimConfig, resolve_capacity
from sim.hardware import GIB, get_hardware
from sim.models import get_model
from sim.parallel import (
    Parallelism,
    activation_reserve_bytes,
    check_parallelism,
    kv_bytes_per_token_per_gpu,
    ring_allreduce_s,
    stage_layers,
    weight_bytes_per_gpu,
)
from sim.policies.base import SchedulerConfig

ROOT = Path(__file__).resolve().parents[1]
GPU_STEPS = ROOT.parent / "shared" / "gpu-steps" / "splitwise_a100_perf_model.csv"
TINY_PROFILE = ROOT / "profiles" / "tiny-cpu.json"


def test_kv_heads_split_then_copied():
    """Llama-3.1-70B's 8 KV heads split over 8 GPUs; over 16 each GPU keeps a whole head (a copy)."""
    m = get_model("llama-3.1-70b")
    full = m.kv_bytes_per_token()
    assert kv_bytes_per_token_per_gpu(m, Parallelism(8, 1), "bfloat16") == full // 8
    assert kv_bytes_per_token_per_gpu(m, Parallelism(16, 1), "bfloat16") == full // 8
    assert kv_bytes_per_token_per_gpu(m, Parallelism(4, 2), "bfloat16") == full // 4 // 2


def test_mla_cache_is_kept_whole_on_every_gpu():
    """DeepSeek-V3's latent cache is not split by tensor parallelism."""
    m = get_model("deepseek-v3")
    assert kv_bytes_per_token_per_gpu(m, Parallelism(8, 1), "bfloat16") == m.kv_bytes_per_token()


def test_weights_per_gpu():
    """One GPU holds all the weights; TP 4 about a quarter; PP 2's largest stage about half."""
    m = get_model("llama-3.1-70b")
    assert weight_bytes_per_gpu(m, Parallelism(1, 1), "bfloat16") == m.weight_bytes()
    assert weight_bytes_per_gpu(m, Parallelism(4, 1), "bfloat16") == pytest.approx(m.weight_bytes() / 4, rel=1e-3)
    half = weight_bytes_per_gpu(m, Parallelism(1, 2), "bfloat16")
    assert m.weight_bytes() / 2 < half < m.weight_bytes() * 0.51
    assert stage_layers(m, 3) == [27, 27, 26]


def test_parallelism_checks():
    """tp must divide the heads, KV heads and tp must divide one another, pp at most the layers."""
    m = get_model("qwen2.5-7b")  # 28 heads, 4 KV heads, 28 layers
    check_parallelism(m, Parallelism(4, 28))
    with pytest.raises(ValueError, match="tp 3 does not divide"):
        check_parallelism(m, Parallelism(3, 1))
    with pytest.raises(ValueError, match="pp 29 is more than"):
        check_parallelism(m, Parallelism(1, 29))
    with pytest.raises(ValueError, match="tp must be >= 1"):
        Parallelism(0, 1)


def test_ring_allreduce_alpha_beta():
    """A ring all-reduce over n GPUs is 2(n-1) hops of latency and 2(n-1)/n of the message over the link."""
    hw = get_hardware("a100-80gb")
    assert ring_allreduce_s(hw, 1, 1e9) == 0
    expected = 14 * hw.link_latency_s + 14 / 8 * 1e6 / (hw.link_bytes_per_s * hw.link_efficiency)
    assert ring_allreduce_s(hw, 8, 1e6) == pytest.approx(expected)


def test_kv_blocks_follow_vllms_rule_per_gpu():
    """KV blocks = (utilisation x memory - weights - activation reserve) per GPU / (its KV per token x block)."""
    m, par = get_model("llama-3.1-70b"), Parallelism(4, 1)
    config = SimConfig(model="llama-3.1-70b", hardware="h100-sxm", tp=4,
                       scheduler=SchedulerConfig(policy="chunked", token_budget=2048))
    reserve = activation_reserve_bytes(m, par, "bfloat16", 2048, 256)
    free = 0.9 * 80e9 - weight_bytes_per_gpu(m, par, "bfloat16") - reserve
    assert resolve_capacity(config).num_blocks == int(free // (m.kv_bytes_per_token() / 4 * 16))
    measured = SimConfig(model="llama-3.1-70b", hardware="h100-sxm", tp=4, kv=KVConfig(activation_reserve_gib=0))
    assert resolve_capacity(measured).num_blocks > resolve_capacity(config).num_blocks


def test_70b_needs_more_than_one_h100():
    """Llama-3.1-70B does not fit one H100 (the error says to add GPUs); TP 2 leaves it little KV, TP 4 plenty."""
    with pytest.raises(ValueError, match=r"no room for the KV cache of llama-3.1-70b.*--tp"):
        resolve_capacity(SimConfig(model="llama-3.1-70b", hardware="h100-sxm"))
    tp2 = resolve_capacity(SimConfig(model="llama-3.1-70b", hardware="h100-sxm", tp=2)).num_blocks
    tp4 = resolve_capacity(SimConfig(model="llama-3.1-70b", hardware="h100-sxm", tp=4)).num_blocks
    assert 1 <= tp2 < 100 < 10_000 < tp4


def test_simulate_cli_with_tp_reports_gpus(tmp_path):
    """`simulate --tp 4 --replicas 2` runs a 70B and records tp, pp and 8 GPUs in config.json."""
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["simulate", "-n", "40", "--model", "llama-3.1-70b", "--tp", "4",
                                    "--replicas", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "on 8 GPU(s) (tp 4 x pp 1 x 2 replicas)" in res.output
    config = json.loads((out / "config.json").read_text())
    assert (config["tp"], config["pp"], config["num_gpus"]) == (4, 1, 8)


def test_simulate_cli_bad_parallelism_is_a_clear_error():
    """--tp that does not divide the heads exits with a message, no traceback."""
    res = CliRunner().invoke(main, ["simulate", "-n", "5", "--model", "llama-3.1-70b", "--tp", "3"])
    assert res.exit_code == 1 and "tp 3 does not divide" in res.output and "Traceback" not in res.output


@pytest.mark.skipif(not GPU_STEPS.exists(), reason="needs ../shared/gpu-steps")
def test_fit_from_tp_sharded_measurements(tmp_path):
    """`calibrate fit` on the A100 TP-2 steps records tp 2; simulate takes it, and refuses another tp."""
    prof = tmp_path / "a100-tp2.json"
    res = CliRunner().invoke(main, ["calibrate", "fit", str(GPU_STEPS), "--model", "llama-2-70b", "--tp", "2",
                                    "--kv-memory-gib", "100", "-o", str(prof)])
    assert res.exit_code == 0, res.output
    loaded = load_profile(prof)
    assert loaded.tp == 2 and len(loaded.samples) == 2 * 105
    out = tmp_path / "run"
    res = CliRunner().invoke(main, ["simulate", "-n", "30", "--max-prompt-tokens", "2000", "--profile", str(prof),
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "config.json").read_text())["tp"] == 2
    res = CliRunner().invoke(main, ["simulate", "-n", "30", "--profile", str(prof), "--tp", "4"])
    assert res.exit_code == 1 and "measured at tp 2" in res.output


@pytest.mark.skipif(not GPU_STEPS.exists(), reason="needs ../shared/gpu-steps")
def test_splitwise_file_needs_a_tp_choice(tmp_path):
    """A splitwise file with several TP degrees for the model asks for --tp, listing them."""
    res = CliRunner().invoke(main, ["calibrate", "fit", str(GPU_STEPS), "--model", "llama-2-70b",
                                    "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 1 and "tensor_parallel 2, 4, 8: choose one with --tp" in res.output


def test_schema_2_profile_reads_as_tp_1():
    """The shipped (schema 2) tiny CPU profile loads, measured on one GPU."""
    assert load_profile(TINY_PROFILE).tp == 1


def test_activation_reserve_is_gib_scale_for_a_70b():
    """The estimated profiling-forward peak of a 70B at 8192 tokens over TP 4 is between 0.3 and 3 GiB."""
    reserve = activation_reserve_bytes(get_model("llama-3.1-70b"), Parallelism(4, 1), "bfloat16", 8192, 256)
    assert 0.3 * GIB < reserve < 3 * GIB


def test_capacity_plans_the_fewest_gpus_across_layouts(tmp_path):
    """`capacity --layouts` lists every layout (one that does not fit says so) and names the fewest GPUs."""
    res = CliRunner().invoke(main, [
        "capacity", "--policies", "chunked", "--model", "llama-3.1-70b", "--hardware", "h100-sxm",
        "--arrival", "poisson", "-n", "120", "--rate", "2", "--max-prompt-tokens", "1024",
        "--slo", "ttft_p99:3000", "--slo", "tpot_p99:100", "--target-rate", "8", "--layouts", "1x1,4x1,8x1",
        "--precision", "0.2", "-j", "1", "-o", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "chunked tp1xpp1" in res.output and "does not fit" in res.output
    plan = json.loads((tmp_path / "capacity.json").read_text())
    rows = {r["label"]: r for r in plan["layouts"]}
    met = [r for r in rows.values() if r["gpus"] is not None]
    assert met and rows["chunked tp1xpp1"]["gpus"] is None
    best = rows[plan["best"]]
    assert best["gpus"] == min(r["gpus"] for r in met)
    assert f"fewest GPUs: {best['gpus']} = tp {best['tp']} x pp {best['pp']}" in res.output


def test_capacity_layouts_need_a_target_rate():
    """--layouts without --target-rate is a usage error."""
    res = CliRunner().invoke(main, ["capacity", "--policies", "chunked", "--slo", "ttft_p99:1000", "--layouts",
                                    "auto", "-n", "10"])
    assert res.exit_code == 2 and "--target-rate" in res.output
