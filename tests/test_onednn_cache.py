"""experiments/onednn_cache.py: vLLM's CPU matmuls under two oneDNN primitive-cache sizes."""

from __future__ import annotations

import os

import pytest

from experiments import onednn_cache

VLLM_PYTHON = os.environ.get("SERVESIM_VLLM_PYTHON")


@pytest.mark.parametrize("args, message", [
    ([], "--vllm-python: no vLLM given"),
    (["--vllm-python", "/bin/sh", "--capacities", "1024"], "two or more"),
    (["--vllm-python", "/bin/sh", "--capacities", "a,b"], "comma-separated integers"),
    (["--vllm-python", "/bin/sh", "--token-counts", "1"], "--token-counts must be >= 2"),
])
def test_bad_arguments_are_one_message(args, message, monkeypatch, capsys):
    monkeypatch.delenv(onednn_cache.VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        onednn_cache.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_python_without_vllm_is_an_error_with_its_output():
    """A measuring process that fails ends the run with its last lines, not a traceback here."""
    with pytest.raises(SystemExit, match=r"ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024: the measuring process exited"):
        onednn_cache.main(["--vllm-python", "/bin/false", "--token-counts", "8"], echo=lambda _: None)


def test_the_report_puts_each_capacity_beside_the_last():
    results = [{"capacity": c, "shapes": 4, "token_counts": 10,
                "build": {"1": {"first_ms": 2.0, "built_ms": 0.5}}, "sweeps_s": sweeps}
               for c, sweeps in (("1024", [8.0, 6.0, 5.0]), ("16384", [7.0, 1.0, 2.0]))]
    text = "\n".join(onednn_cache.report(results))
    assert "10 token counts x 4 shapes = 40 matmuls" in text
    assert "sweeps 2-3 with 1024 over 16384: x6.00, x2.50" in text
    assert "1.50" in text  # the build cost at one token: 2.0 - 0.5 ms


@pytest.mark.vllm
@pytest.mark.skipif(not VLLM_PYTHON, reason="SERVESIM_VLLM_PYTHON with vllm not given")
def test_against_a_real_vllm(capsys):
    """Both capacities measured in vLLM's own processes: 37 token counts x 4 shapes, more than a
    cache of 16 holds, fewer than one of 4096 (1, 4 and 16 are measured apart, as builds)."""
    lines: list[str] = []
    code = onednn_cache.main(["--vllm-python", str(VLLM_PYTHON), "--token-counts", "40", "--capacities", "16,4096"],
                             echo=lines.append)
    text = "\n".join(lines)
    assert code == 0, text
    assert "37 token counts x 4 shapes = 148 matmuls" in text
    assert "sweeps 2-3 with 16 over 4096: x" in text
    rows = [line.split() for line in lines if line.split()[:1] in (["16"], ["4096"]) and line.endswith("s")]
    assert len(rows) == 2 and all(float(x.rstrip("s")) > 0 for row in rows for x in row[1:])
