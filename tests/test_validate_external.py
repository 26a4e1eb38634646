"""`servesim validate --url` and `--engine vllm`: an external engine over HTTP against the
simulator with the vllm policy; the black box's verdict without the step check; the server
started by validate always stopped, a failed start reported with its log."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY_PROFILE = ROOT / "profiles" / "tiny-cpu.json"
VLLM_PYTHON = os.environ.get("SERVESIM_VLLM_PYTHON")


def _validate(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["validate", "--no-progress", *args])
    return result.exit_code, result.output


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    return ckpt


def _fake_python(tmp_path: Path, body: str) -> Path:
    """An executable standing in for vLLM's python: it runs ``body`` (sh) whatever it is asked."""
    script = tmp_path / "fake-python"
    script.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited: only its entry is left until its parent reaps it.
    status = Path(f"/proc/{pid}/stat")
    return not (status.exists() and status.read_text().split()[2] == "Z")


def test_url_against_servesim_serve_with_the_vllm_policy(net, one_torch_thread, tmp_path):
    """--url replays the slice against a running server (repeated), reads its KV pool from
    /metrics, simulates with the vllm policy, and reports a verdict without the step check; the
    steps its streams show whole are priced and reported apart (stream-steps.csv), and no
    steps.csv or step plot is written. A warm-up run goes first, shown and kept but not compared."""
    pytest.importorskip("torch")
    from runtime.tokenizer import ByteTokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    out = tmp_path / "out"
    with ServerThread(tiny_engine(net, policy="vllm", kv_blocks=256, max_num_seqs=32), ByteTokenizer()) as server:
        code, text = _validate("--url", server.url, "--profile", str(TINY_PROFILE), "-n", "8", "--repeats", "2",
                               "--warmup-runs", "1", "--build-tokens", "6", "--max-num-seqs", "32",
                               "--token-budget", "2048",
                               "--max-prompt-tokens", "96", "--max-output-tokens", "12", "-o", str(out))
    assert code == 0, text
    assert "steps read from the streams" in text and "step-median check is left out of the verdict" in text
    assert "verdict: " in text and "per-step median" not in text
    # A CPU profile against a server the user runs: how to size its oneDNN cache is said.
    assert "start yours with the same" in text and "ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384" in text
    report = json.loads((out / "validation.json").read_text())
    assert report["verdict"] in ("PASS", "FAIL")
    assert "median_step_rel_error" not in report["checks"] and "median_step_rel_error" not in report
    assert set(report["checks"]) >= {"mean_ttft_ms", "mean_tpot_ms", "p99_e2el_ms", "request_throughput"}
    assert "black box" in report["step_errors"] and report["num_steps"] == 0
    # Its steps read back from the streams: every burst of both runs in stream-steps.csv, the
    # clean ones priced, the rest counted by reason; the same again from the files.
    stream = report["stream_steps"]
    bursts = [row for run in ("live", "live-2")
              for row in csv.DictReader((out / run / "stream-steps.csv").open())]
    assert stream["steps"] > 0 and stream["steps"] + sum(stream["left_out"].values()) == len(bursts)
    assert sum(not row["left_out"] for row in bursts) == stream["steps"] and len(stream["run_paces"]) == 2
    assert (out / "live" / "tokens.csv").exists()
    assert report["completed"] == {"live": 8, "sim": 8} and report["live_runs"] == 2
    assert "warm-up run 1/1 (not compared): mean TTFT" in text and "after 1 warm-up run(s)" in text
    # A step of every token count 1..6 first (vLLM's CPU backend builds a kernel for each).
    assert "built: every step token count up to 6 run once" in text and report["build_tokens"] == 6
    [warmup] = report["warmup_runs"]
    assert warmup["mean_ttft_ms"] > 0 and warmup["mean_tpot_ms"] > 0
    # A profile without black-box pattern medians gives the server's speed nothing to compare with.
    assert report["at_device_speed"] is None and "the server's speed is not checked" in text
    setup = report["setup"]
    assert setup["kv"] == {"num_blocks": 256, "block_size": 16}
    assert setup["scheduler"]["policy"] == "vllm" and setup["scheduler"]["max_num_seqs"] == 32
    assert setup["external"]["url"] == server.url and not setup["external"]["started_by_servesim"]
    assert len(report["mean_ttft_ms"]["live_runs"]) == 2
    for run in ("live", "live-2", "sim"):
        summary = json.loads((out / run / "summary.json").read_text())
        assert summary["completed"] == 8
    assert not (out / "live" / "steps.csv").exists() and not (out / "step-scatter.png").exists()
    assert (out / "ttft-cdf.png").exists() and (out / "e2el-cdf.png").exists()
    # The run read back: its requests priced again with its own profile give its simulation, and
    # each live request's TPOT is binned by the concurrency it decoded in.
    from experiments import load_error, reprice, stream_error

    lines: list[str] = []
    assert reprice.main([str(out), str(TINY_PROFILE)], echo=lines.append) == 0
    tpot = next(line for line in lines if line.endswith("TPOT")).split()
    assert float(tpot[1]) == pytest.approx(report["mean_tpot_ms"]["live"], abs=0.05)
    assert float(tpot[2]) == pytest.approx(report["mean_tpot_ms"]["sim"], abs=0.05)
    p99 = next(line for line in lines if line.endswith("p99 TPOT")).split()
    assert float(p99[0]) == pytest.approx(report["p99_tpot_ms"]["live"], abs=0.05)
    assert float(p99[1]) == pytest.approx(report["p99_tpot_ms"]["sim"], abs=0.05)
    bins = load_error.load_bins(out)
    decoded = sum(1 for run in ("live", "live-2") for r in load_error.read_decoding(out / run / "requests.csv"))
    assert sum(len(b.ratios) for b in bins) == decoded > 0
    lines = []
    assert stream_error.main([str(out)], echo=lines.append) == 0
    assert f"{stream['steps']} steps (+{sum(stream['left_out'].values())} left out)" in lines[-2]
    assert f"median |err| {stream['median_step_rel_error'] * 100:.1f}%" in lines[-2]
    # and how the server took its arrivals, each live run's beside the same requests simulated
    assert re.search(r"arrivals prefilled in the next step: live (-|\d+%), (-|\d+%), sim (-|\d+%); "
                     r"steps that prefilled: live \d+, \d+, sim \d+$", lines[-1]), lines[-1]


@pytest.mark.parametrize("option", ["--warmup-runs", "--build-tokens"])
def test_warmups_need_a_served_engine(option, tmp_path):
    """servesim's own live engine warms up every shape itself: --warmup-runs and --build-tokens
    are refused there."""
    code, text = _validate("--profile", str(TINY_PROFILE), option, "1", "-o", str(tmp_path / "out"))
    assert code == 2 and option in text and "only against a served engine" in text


def test_url_without_a_server_is_one_error_line(tmp_path):
    """A closed port is a clear error naming the URL, no traceback."""
    code, text = _validate("--url", f"http://127.0.0.1:{_closed_port()}", "--profile", str(TINY_PROFILE),
                           "-o", str(tmp_path / "out"))
    assert code == 1
    assert "cannot read the engine's settings" in text and "cannot connect" in text
    assert "Traceback" not in text


def test_engine_vllm_needs_a_checkpoint_directory(tmp_path):
    """--engine vllm with a preset name instead of a checkpoint directory names --model."""
    code, text = _validate("--engine", "vllm", "--model", "small", "--profile", str(TINY_PROFILE),
                           "-o", str(tmp_path / "out"))
    assert code == 2 and "--model" in text and "checkpoint directory" in text


def test_engine_and_url_are_exclusive_and_the_profile_required(tmp_path):
    """--engine vllm with --url is a usage error; an external validation needs --profile."""
    code, text = _validate("--engine", "vllm", "--url", "http://127.0.0.1:1", "--profile", str(TINY_PROFILE))
    assert code == 2 and "not both" in text
    code, text = _validate("--url", "http://127.0.0.1:1")
    assert code == 2 and "--profile is required" in text


def test_a_preset_is_still_checked_for_the_live_engine():
    """Without --engine vllm, --model must be a preset; the error lists them."""
    code, text = _validate("--model", "no-such-model", "--profile", str(TINY_PROFILE))
    assert code == 2 and "not a preset" in text and "tiny" in text


def test_a_server_that_exits_at_start_prints_its_log(tmp_path):
    """A vLLM server that exits before it is ready: exit 1 with the end of its log."""
    fake = _fake_python(tmp_path, 'echo "ValueError: not enough KV cache memory"; exit 3')
    code, text = _validate("--engine", "vllm", "--model", str(_checkpoint(tmp_path)), "--vllm-python", str(fake),
                           "--profile", str(TINY_PROFILE), "-o", str(tmp_path / "out"))
    assert code == 1, text
    assert "exited with status 3 before it was ready" in text and "not enough KV cache memory" in text
    assert (tmp_path / "out" / "vllm-server.log").exists()


@pytest.mark.parametrize("given, seen", [(None, "16384"), ("777", "777")])
def test_the_server_gets_a_onednn_cache_for_every_token_count(given, seen, tmp_path, monkeypatch):
    """vLLM's CPU backend builds a oneDNN matmul per token count; the server servesim starts
    keeps 16384 of them (oneDNN's default, 1024, is evicted under load), unless the user's
    environment says otherwise."""
    if given is None:
        monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", given)
    fake = _fake_python(tmp_path, 'echo "cache=$ONEDNN_PRIMITIVE_CACHE_CAPACITY kv=$VLLM_CPU_KVCACHE_SPACE"; exit 3')
    code, text = _validate("--engine", "vllm", "--model", str(_checkpoint(tmp_path)), "--vllm-python", str(fake),
                           "--kv-cache-gib", "3", "--profile", str(TINY_PROFILE), "-o", str(tmp_path / "out"))
    assert code == 1, text
    assert f"cache={seen} kv=3" in text


def test_a_server_never_ready_is_stopped_after_the_startup_timeout(tmp_path):
    """A server that never answers /health is stopped after --startup-timeout; nothing hangs."""
    fake = _fake_python(tmp_path, 'echo "loading forever"; exec sleep 300')
    started = time.monotonic()
    code, text = _validate("--engine", "vllm", "--model", str(_checkpoint(tmp_path)), "--vllm-python", str(fake),
                           "--startup-timeout", "2", "--profile", str(TINY_PROFILE), "-o", str(tmp_path / "out"))
    assert code == 1, text
    assert "not ready within 2 s" in text and "loading forever" in text
    assert time.monotonic() - started < 60
    assert not _alive(int((tmp_path / "pid").read_text()))


def test_ctrl_c_while_waiting_for_the_server_stops_it(tmp_path):
    """Ctrl-C (SIGINT) while vLLM starts: validate exits non-zero and the server is stopped."""
    import signal
    import sys

    fake = _fake_python(tmp_path, 'echo "loading"; exec sleep 300')
    proc = subprocess.Popen([sys.executable, "-c", "from experiments.cli import main; main()", "validate",
                             "--engine", "vllm", "--model", str(_checkpoint(tmp_path)), "--vllm-python", str(fake),
                             "--profile", str(TINY_PROFILE), "--no-progress", "-o", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text().strip():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not _alive(int((tmp_path / "pid").read_text()))


def _vllm_importable() -> bool:
    if not VLLM_PYTHON:
        return False
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm.entrypoints.openai.api_server"], capture_output=True,
                           timeout=300)
    return probe.returncode == 0


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not _vllm_importable(), reason="SERVESIM_VLLM_PYTHON with vllm not given")
def test_engine_vllm_validates_a_tiny_slice_against_a_real_vllm(tmp_path):
    """validate --engine vllm starts vLLM, replays 10 requests, reads its settings from /metrics
    (prefix caching off, vLLM's block size), simulates with the vllm policy, and stops the server."""
    pytest.importorskip("torch")
    from calibrate.profile import save_profile
    from calibrate.vllm_calibration import calibrate_inprocess
    from calibrate.vllm_inproc import InprocPlan, VllmEngineArgs
    from runtime.checkpoint import write_checkpoint
    from sim.models import get_model

    ckpt = write_checkpoint(get_model("small"), tmp_path / "ckpt", seed=0)
    engine = VllmEngineArgs(model=str(ckpt), dtype="bfloat16", max_model_len=1024, max_num_batched_tokens=512,
                            max_num_seqs=16, kv_cache_gib=1)
    plan = InprocPlan(quick=True, repeats=1, decode_tokens=3, max_batch_prompt_tokens=1024, live_requests=4,
                      live_loads=(0.5,), live_time_budget_s=30.0)
    profile = calibrate_inprocess(engine, vllm_python=VLLM_PYTHON, workdir=tmp_path / "work", plan=plan, folds=2)
    save_profile(profile, tmp_path / "profile.json")
    out = tmp_path / "out"
    code, text = _validate("--engine", "vllm", "--model", str(ckpt), "--vllm-python", str(VLLM_PYTHON),
                           "--profile", str(tmp_path / "profile.json"), "--kv-cache-gib", "1", "-n", "10",
                           "--repeats", "1", "--max-prompt-tokens", "256", "--max-output-tokens", "16",
                           "--build-tokens", "64", "-o", str(out))
    assert code == 0, text
    assert "built: every step token count up to 64 run once" in text
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in text  # servesim started it with the cache sized
    report = json.loads((out / "validation.json").read_text())
    setup = report["setup"]
    assert setup["external"]["started_by_servesim"] and setup["external"]["cache_config"]["enable_prefix_caching"] \
        == "False"
    assert setup["scheduler"]["token_budget"] == 512 and setup["scheduler"]["max_num_seqs"] == 16
    assert setup["kv"]["block_size"] == profile.block_size
    assert report["completed"]["live"] == 10 and "median_step_rel_error" not in report["checks"]
    assert "vLLM server ready" in text and (out / "vllm-server.log").exists()
    url = next(w for w in text.split() if w.startswith("http://127.0.0.1:"))
    port = int(url.rsplit(":", 1)[1])
    with socket.socket() as s:  # stopped: nothing listens on its port any more
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_url_checks_the_servers_speed_against_a_black_box_calibration(net, one_torch_thread, tmp_path):
    """With a profile from `calibrate --url`, the calibration's lone prefills and decode batches
    are sent again before the first compared run and after the last; their median step now /
    then is the server's speed, and the same requests are simulated again at it, without a
    step check (a black box's steps are not seen)."""
    pytest.importorskip("torch")
    from calibrate.profile import save_profile
    from calibrate.vllm_blackbox import BlackboxPlan, calibrate_blackbox
    from runtime.tokenizer import ByteTokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    plan = BlackboxPlan(prefill_lengths=(64, 256), decode_batches=(1, 3), decode_contexts=(32,), decode_tokens=12,
                        join_batch=2, join_lengths=(16,), repeats=2, overhead_requests=2, warm_passes=0)
    out = tmp_path / "out"
    with ServerThread(tiny_engine(net, policy="vllm", kv_blocks=256, max_num_seqs=32), ByteTokenizer()) as server:
        profile = calibrate_blackbox(server.url, model="tiny", dtype="float32", max_num_batched_tokens=2048,
                                     max_num_seqs=32, plan=plan, folds=2, device="cpu")
        assert {"prefill 64", "decode 1x32", "decode 3x32"} <= set(profile.engine["measured"]["pattern_median_ms"])
        save_profile(profile, tmp_path / "bb.json")
        code, text = _validate("--url", server.url, "--profile", str(tmp_path / "bb.json"), "-n", "6",
                               "--repeats", "2", "--warmup-runs", "0", "--build-tokens", "0", "--max-num-seqs", "32",
                               "--token-budget", "2048", "--max-prompt-tokens", "96", "--max-output-tokens", "12",
                               "-o", str(out))
    assert code == 0, text
    assert text.count("server speed: x") == 2
    report = json.loads((out / "validation.json").read_text())
    speeds = report["device_speed_vs_profile"]
    assert speeds["before"] > 0 and speeds["after"] > 0
    assert report["device_speed_source"] == "the calibration's lone prefills and decode batches"
    at = report["at_device_speed"]
    assert at["speed_checks"] == [speeds["before"], speeds["after"]]
    assert at["factor"] == pytest.approx((speeds["before"] + speeds["after"]) / 2)
    assert "median_step_rel_error" not in at and set(at) >= {"mean_ttft_ms", "mean_tpot_ms"}
    assert "verdict" in at and "at the device's speed" in text
