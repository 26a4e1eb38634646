"""vLLM's own benchmark client against `servesim serve` (needs vLLM in its own environment:
``SERVESIM_VLLM_PYTHON=/path/to/venv/bin/python``; skipped otherwise)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

pytest.importorskip("torch")

from experiments.bench_vs_vllm import VLLM_BENCH

VLLM_PYTHON = os.environ.get("SERVESIM_VLLM_PYTHON")


def _vllm_importable() -> bool:
    if not VLLM_PYTHON:
        return False
    probe = subprocess.run([VLLM_PYTHON, "-c", "import vllm.benchmarks.serve"], capture_output=True, timeout=300)
    return probe.returncode == 0


pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not _vllm_importable(), reason="SERVESIM_VLLM_PYTHON with vllm not given")]


def test_vllm_bench_serve_completes_every_request(net, one_torch_thread, tmp_path):
    """`vllm bench serve` (random dataset, text prompts, streaming) completes all its requests
    against servesim serve, with exactly the lengths it asked for."""
    from runtime.tokenizer import load_tokenizer, write_wordlevel_tokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    tok = write_wordlevel_tokenizer(tmp_path / "tok", 4096)
    with ServerThread(tiny_engine(net), load_tokenizer(tok), max_model_len=1024) as server:
        assert VLLM_PYTHON is not None
        subprocess.run([VLLM_PYTHON, "-c", VLLM_BENCH, "--backend", "openai", "--base-url", server.url,
                        "--model", "tiny", "--tokenizer", str(tok), "--dataset-name", "random",
                        "--random-input-len", "32", "--random-output-len", "8", "--num-prompts", "8",
                        "--request-rate", "inf", "--ignore-eos", "--save-result", "--result-dir", str(tmp_path),
                        "--result-filename", "vllm.json"], check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "vllm.json").read_text())
    assert result["completed"] == 8 and result["failed"] == 0
    assert result["total_output_tokens"] == 8 * 8
    assert result["total_input_tokens"] == 8 * 32
