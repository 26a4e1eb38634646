"""`servesim calibrate --engine vllm` in process against a real vLLM (needs vLLM in its own
environment: ``SERVESIM_VLLM_PYTHON=/path/to/venv/bin/python``; skipped otherwise)."""

from __future__ import annotations

import os
import subprocess

import pytest

pytest.importorskip("torch")

VLLM_PYTHON = os.environ.get("SERVESIM_VLLM_PYTHON")


def _vllm_importable() -> bool:
    if not VLLM_PYTHON:
        return False
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm.v1.engine.core"], capture_output=True, timeout=300)
    return probe.returncode == 0


pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not _vllm_importable(), reason="SERVESIM_VLLM_PYTHON with vllm not given")]


def test_tiny_inprocess_calibration_records_the_steps_vllm_ran(tmp_path):
    """vLLM's own scheduler runs the patterns: lone prefills of the planned lengths, a prompt of
    twice the budget chunked (a chunk after the budget's context), decode batches of the planned
    sizes, live steps; the profile records the settings vLLM ran with."""
    from calibrate.vllm_calibration import calibrate_inprocess
    from calibrate.vllm_inproc import InprocPlan, VllmEngineArgs
    from runtime.checkpoint import write_checkpoint
    from sim.models import get_model

    ckpt = write_checkpoint(get_model("tiny"), tmp_path / "ckpt", seed=0)
    engine = VllmEngineArgs(model=str(ckpt), dtype="bfloat16", max_model_len=512, max_num_batched_tokens=256,
                            max_num_seqs=8, kv_cache_gib=1)
    plan = InprocPlan(quick=True, repeats=1, decode_tokens=3, max_batch_prompt_tokens=1024, live_requests=4,
                      live_loads=(0.5,), live_time_budget_s=30.0)
    profile = calibrate_inprocess(engine, vllm_python=VLLM_PYTHON, workdir=tmp_path / "work", plan=plan, folds=2)
    settings = profile.engine["settings"]
    assert (settings["max_num_batched_tokens"], settings["max_num_seqs"], settings["max_model_len"]) == (256, 8, 512)
    assert profile.engine["vllm_version"] and profile.engine["mode"] == "in-process"
    assert profile.block_size == settings["block_size"] and profile.num_kv_blocks == settings["num_gpu_blocks"]
    grid = [s.shape for s in profile.samples if s.origin == "grid"]
    lone = {sh.prefill_tokens for sh in grid if sh.prefill_seqs == 1 and sh.decode_seqs == 0
            and sh.prefill_context_tokens == 0}
    assert {16, 64, 256} <= lone
    assert any(sh.prefill_context_tokens == 256 and sh.decode_seqs == 0 for sh in grid)  # 511 tokens, chunked
    assert {sh.decode_seqs for sh in grid if sh.prefill_seqs == 0} == {1, 4}
    assert any(s.origin == "live" for s in profile.samples)
    assert (tmp_path / "work" / "steps.csv").exists()
