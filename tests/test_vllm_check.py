"""experiments/vllm_check.py: the one command that calibrates a real vLLM server black-box and
validates a slice against it. Its arguments are checked before anything starts."""

from __future__ import annotations

import pytest

from experiments import vllm_check


@pytest.mark.parametrize("args, message", [
    ([], "--vllm-python: no vLLM given"),
    (["--vllm-python", "/nowhere/python"], "no such file"),
    (["--vllm-python", "/bin/sh", "-n", "1"], "-n >= 2"),
    (["--vllm-python", "/bin/sh", "--load", "0"], "0 < --load < 10"),
    (["--vllm-python", "/bin/sh", "--tolerance", "p50:3"], "--tolerance"),
])
def test_bad_arguments_stop_before_anything_starts(args, message, monkeypatch, capsys):
    """No vLLM, a missing python or a bad size is one message naming the option (exit 2)."""
    monkeypatch.delenv(vllm_check.VLLM_PYTHON_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        vllm_check.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_server_that_cannot_start_is_an_error_with_its_log(tmp_path):
    """A python that is not vLLM's: the server exits, the check says so with its log and exits 2."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    lines: list[str] = []
    code = vllm_check.main(["--vllm-python", "/bin/false", "--checkpoint", str(ckpt), "--startup-timeout", "30",
                            "-o", str(tmp_path / "out")], echo=lines.append)
    assert code == 2
    assert any("the vLLM server exited" in line for line in lines)


def test_ctrl_c_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    """Ctrl-C while the server starts ends the check with a line and status 130."""
    import contextlib

    import experiments.validation.external as external

    @contextlib.contextmanager
    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt
        yield  # pragma: no cover

    monkeypatch.setattr(external, "vllm_server", interrupted)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    lines: list[str] = []
    code = vllm_check.main(["--vllm-python", "/bin/false", "--checkpoint", str(ckpt), "-o", str(tmp_path / "out")],
                           echo=lines.append)
    assert code == 130 and any("interrupted" in line for line in lines)
