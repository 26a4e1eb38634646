"""The roofline cost model: one formula for a step and a decode run, MoE, windows, TP, and the
uncalibrated check against real A100 measurements."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.cli import main
from sim.batch import StepShape
from sim.hardware import get_hardware
from sim.models import get_model
from sim.parallel import Parallelism
from sim.roofline import SHORT_RUN, RooflineCost

GPU_STEPS = Path(__file__).resolve().parents[2] / "shared" / "gpu-steps" / "splitwise_a100_perf_model.csv"

COSTS = [
    RooflineCost(get_model("qwen2.5-0.5b"), get_hardware("l4")),
    RooflineCost(get_model("llama-3.1-70b"), get_hardware("h100-sxm"), parallel=Parallelism(4, 1)),
    RooflineCost(get_model("llama-3.1-70b"), get_hardware("l40s"), parallel=Parallelism(16, 2)),  # KV heads copied
    RooflineCost(get_model("mixtral-8x7b"), get_hardware("mi300x"), parallel=Parallelism(2, 1)),
    RooflineCost(get_model("deepseek-v3"), get_hardware("b200"), parallel=Parallelism(8, 2)),
    RooflineCost(get_model(str(Path(__file__).parent / "data" / "hf-configs" / "mistral-7b-v0.1.json")),
                 get_hardware("a10g"), "float16"),
]

@st.composite
def shapes(draw) -> StepShape:
    """A valid step: prefill chunks of any length after any context, decodes of any contexts, swaps."""
    prefill_seqs = draw(st.integers(0, 8))
    decode_seqs = draw(st.integers(0, 512))
    return StepShape(
        prefill_tokens=draw(st.integers(prefill_seqs, 4096)) if prefill_seqs else 0, prefill_seqs=prefill_seqs,
        prefill_context_tokens=draw(st.integers(0, 50_000)) if prefill_seqs else 0, decode_seqs=decode_seqs,
        decode_context_tokens=draw(st.integers(0, 3_000_000)) if decode_seqs else 0,
        swap_in_tokens=draw(st.integers(0, 2048)), swap_out_tokens=draw(st.integers(0, 2048)),
    )


@settings(max_examples=300, deadline=None)
@given(shape=shapes(), n=st.sampled_from([1, 2, SHORT_RUN, SHORT_RUN + 1, 200]), which=st.integers(0, len(COSTS) - 1))
def test_decode_run_is_step_time_bit_for_bit(shape, n, which):
    """decode_run_times(shape, n)[j] is exactly step_time of the j-th step, for every model and parallelism."""
    cost = COSTS[which]
    run = [float(t) for t in cost.decode_run_times(shape, n)]
    steps = [cost.step_time(replace(shape, decode_context_tokens=shape.decode_context_tokens + j * shape.decode_seqs))
             for j in range(n)]
    assert run == steps


def _single_gpu_roofline_as_before(model, hw, shape):
    """The single-GPU dense formula as it was before parallelism and MoE (a regression reference)."""
    flops = 2 * model.matmul_params * shape.num_tokens + 4 * model.num_layers * model.num_heads * model.head_dim * (
        shape.attention_work + shape.decode_context_tokens + shape.decode_seqs)
    memory = model.weight_bytes() + model.kv_bytes_per_token() * (
        shape.decode_context_tokens + shape.prefill_context_tokens + shape.num_tokens)
    forward = max(flops / (hw.peak_flops * hw.compute_efficiency),
                  memory / (hw.memory_bytes_per_s * hw.memory_efficiency))
    swap = model.kv_bytes_per_token() * (shape.swap_in_tokens + shape.swap_out_tokens)
    return hw.step_overhead_s + forward + swap / hw.host_link_bytes_per_s


@pytest.mark.parametrize("shape", [StepShape(decode_seqs=7, decode_context_tokens=9000),
                                   StepShape(prefill_tokens=512, prefill_seqs=2, prefill_context_tokens=100),
                                   StepShape(prefill_tokens=300, prefill_seqs=1, decode_seqs=40,
                                             decode_context_tokens=40_000, swap_in_tokens=32)])
def test_single_gpu_dense_price_unchanged(shape):
    """On one GPU a dense model costs exactly what the roofline always priced it at."""
    model, hw = get_model("qwen2.5-7b"), get_hardware("h100-sxm")
    assert RooflineCost(model, hw).step_time(shape) == _single_gpu_roofline_as_before(model, hw, shape)


def test_moe_decode_reads_active_experts_and_large_batches_read_all():
    """A Mixtral decode of one sequence reads about its active weights; a large batch reads all experts."""
    model, hw = get_model("mixtral-8x7b"), get_hardware("h100-sxm")
    cost = RooflineCost(model, hw, parallel=Parallelism(2, 1))
    one = cost._weight_bytes(1)
    many = cost._weight_bytes(256)
    assert one == pytest.approx(model.active_params * 2 / 2, rel=0.01)
    assert many == pytest.approx(model.num_params * 2 / 2, rel=0.01)
    dense = RooflineCost(get_model("llama-2-70b"), hw, parallel=Parallelism(2, 1))
    assert cost.step_time(StepShape(decode_seqs=1, decode_context_tokens=100)) < dense.step_time(
        StepShape(decode_seqs=1, decode_context_tokens=100))


def test_sliding_window_caps_what_decodes_read():
    """Past the window, a Mistral-7B-v0.1 decode costs the same however long its context."""
    cost = COSTS[-1]
    at_window = cost.step_time(StepShape(decode_seqs=4, decode_context_tokens=4 * 4096))
    assert cost.step_time(StepShape(decode_seqs=4, decode_context_tokens=4 * 30_000)) == at_window
    assert cost.step_time(StepShape(decode_seqs=4, decode_context_tokens=4 * 1000)) < at_window


def test_tensor_parallel_splits_work_and_pays_for_allreduce():
    """TP 4 makes a 70B decode faster than TP 2; over PCIe the all-reduces cost more than over NVLink."""
    model, shape = get_model("llama-3.1-70b"), StepShape(decode_seqs=32, decode_context_tokens=32 * 2000)
    h100 = get_hardware("h100-sxm")
    t2 = RooflineCost(model, h100, parallel=Parallelism(2, 1)).step_time(shape)
    t4 = RooflineCost(model, h100, parallel=Parallelism(4, 1)).step_time(shape)
    assert t4 < t2
    pcie = replace(h100, name="h100-pcie-like", interconnect="PCIe", link_bytes_per_s=32e9, link_latency_s=15e-6)
    assert RooflineCost(model, pcie, parallel=Parallelism(4, 1)).step_time(shape) > t4


def test_pipeline_stages_add_handoffs_not_speed():
    """With one batch in flight, PP 2 costs the TP-only step plus a hand-off."""
    model, hw, shape = get_model("llama-3.1-70b"), get_hardware("h100-sxm"), StepShape(decode_seqs=8,
                                                                                        decode_context_tokens=8000)
    tp_only = RooflineCost(model, hw, parallel=Parallelism(4, 1)).step_time(shape)
    piped = RooflineCost(model, hw, parallel=Parallelism(4, 2)).step_time(shape)
    assert tp_only < piped < tp_only * 1.01


def test_bad_parallelism_is_refused():
    """TP that does not divide the heads is an error naming tp."""
    with pytest.raises(ValueError, match="tp 3 does not divide"):
        RooflineCost(get_model("llama-3.1-70b"), get_hardware("h100-sxm"), parallel=Parallelism(3, 1))


@pytest.mark.skipif(not GPU_STEPS.exists(), reason="needs ../shared/gpu-steps")
def test_profile_predict_roofline_on_real_a100_steps():
    """`profile predict --roofline` prices the measured A100 Llama-2-70B steps at TP 4 and reports error per kind."""
    res = CliRunner().invoke(main, ["profile", "predict", "--roofline", "--model", "llama-2-70b", "--hardware",
                                    "a100-80gb", "--tp", "4", str(GPU_STEPS)])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].endswith("predicted_step_ms,step_ms,ape_pct") and len(lines) == 1 + 2 * 105
    assert "the roofline of llama-2-70b on a100-80gb at tp 4 x pp 1" in res.stderr
    assert any(line.startswith("prefill    105") for line in res.stderr.splitlines())


def test_profile_predict_roofline_needs_model_and_hardware(tmp_path):
    """--roofline without --model or --hardware, or with a PROFILE too, is a usage error."""
    steps = tmp_path / "s.csv"
    steps.write_text("prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens\n"
                     "16,1,0,0,0\n")
    res = CliRunner().invoke(main, ["profile", "predict", "--roofline", "--model", "tiny", str(steps)])
    assert res.exit_code == 2 and "--roofline needs --model and --hardware" in res.output
    res = CliRunner().invoke(main, ["profile", "predict", "--roofline", "--model", "tiny", "--hardware", "cpu",
                                    str(steps), str(steps)])
    assert res.exit_code == 2 and "no PROFILE" in res.output
    res = CliRunner().invoke(main, ["profile", "predict", "--roofline", "--model", "tiny", "--hardware", "cpu",
                                    str(steps)])
    assert res.exit_code == 0 and res.stdout.splitlines()[1].startswith("16,1,0,0,0")
