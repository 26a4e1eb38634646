"""Does calibration know when it failed? Two measurements on this machine:

1. ``noise``: the control steps' checkpoint timed ``--checkpoints`` times back to back on a
   quiet engine; the spread of their drift against the first is the run-to-run noise that
   :data:`calibrate.drift.DRIFT_THRESHOLD` must sit above.
2. ``hog``: a quick calibration (``servesim calibrate --quick``'s) with a busy loop on every
   core started ``--hog-after-s`` seconds in (half-way through, by default), bounded by
   ``--hog-s`` and killed at the end; it must stop with the drift named, not write a profile.

    python experiments/calibration_drift.py --model tiny --threads 1 --parts noise,hog
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import threading
import time


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def noise(model: str, threads: int, checkpoints: int) -> str:
    """Back-to-back checkpoints of the quick grid's control steps on an idle engine."""
    import dataclasses

    from calibrate.calibration import CPU_KV_MEMORY_BYTES
    from calibrate.drift import DriftMonitor, control_points, describe
    from calibrate.grid import make_grid
    from calibrate.measure import time_controls
    from runtime.build import build_runner
    from runtime.config import LiveConfig
    from sim.models import get_model

    spec = get_model(model)
    live = LiveConfig(model=model, device="cpu", threads=threads)
    block_bytes = spec.kv_bytes_per_token("float32") * live.block_size
    grid = make_grid(spec.max_position, CPU_KV_MEMORY_BYTES // block_bytes, live.block_size, quick=True)
    points = control_points(grid)
    runner = build_runner(dataclasses.replace(live, kv_blocks=max(p.kv_blocks(live.block_size) for p in points)))
    monitor = DriftMonitor(lambda: time_controls(runner, points), [describe(p) for p in points])
    t0 = time.perf_counter()
    for k in range(checkpoints):
        monitor.check(f"checkpoint {k}")
    wall_s = (time.perf_counter() - t0) / checkpoints
    drifts = [100 * c.drift for c in monitor.checkpoints[1:]]
    steps = "; ".join(monitor.controls)
    per_point = [[c.control_ms[i] for c in monitor.checkpoints] for i in range(len(points))]
    spread = ", ".join(f"{statistics.median(ms):.3g} ms (range {100 * (max(ms) - min(ms)) / min(ms):.0f}%)"
                       for ms in per_point)
    return (f"noise: {checkpoints} back-to-back checkpoints of {model}'s control steps ({steps}), "
            f"{threads} thread(s), {wall_s:.1f} s each\n"
            f"  per step: {spread}\n"
            f"  drift vs the first: median |d| {statistics.median(abs(d) for d in drifts):.1f}%, "
            f"max |d| {max(abs(d) for d in drifts):.1f}% ({', '.join(f'{d:+.1f}' for d in drifts)})\n"
            f"  load average when done: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def hog(model: str, threads: int, hog_after_s: float, hog_s: float) -> str:
    """A quick calibration with a busy loop on every core from ``hog_after_s`` on."""
    from calibrate.calibration import run_calibration
    from calibrate.errors import DriftError

    ctx = multiprocessing.get_context("spawn")
    hogs = [ctx.Process(target=_spin, args=(hog_s,), daemon=True) for _ in range(os.cpu_count() or 2)]
    started_at: list[float] = []
    t0 = time.perf_counter()

    def start() -> None:
        started_at.append(time.perf_counter() - t0)
        for h in hogs:
            h.start()

    timer = threading.Timer(hog_after_s, start)
    timer.start()
    try:
        prof = run_calibration(model, device="cpu", quick=True, threads=threads, progress=False)
        drift, check = prof.drift or {}, prof.fit_check or {}
        outcome = (f"NOT caught: a profile was fitted (largest drift {drift.get('max_drift_pct', 0.0):.1f}%, "
                   f"fit check {'passed' if check.get('passed') else 'failed'})")
    except DriftError as e:
        outcome = f"caught after {time.perf_counter() - t0:.0f} s:\n{e}"
    finally:
        timer.cancel()
        for h in hogs:
            if h.is_alive():
                h.kill()
            if h.pid is not None:
                h.join(10)
    when = f"{started_at[0]:.0f} s in" if started_at else "never (calibration ended first)"
    return f"hog: {len(hogs)} busy loops started {when} of a quick calibration of {model}; {outcome}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parts", default="noise,hog")
    p.add_argument("--checkpoints", type=int, default=10)
    p.add_argument("--hog-after-s", type=float, default=25.0)
    p.add_argument("--hog-s", type=float, default=120.0)
    args = p.parse_args()
    for part in args.parts.split(","):
        if part == "noise":
            print(noise(args.model, args.threads, args.checkpoints), flush=True)
        elif part == "hog":
            print(hog(args.model, args.threads, args.hog_after_s, args.hog_s), flush=True)
        else:
            raise SystemExit(f"--parts: unknown part {part!r}; known: noise, hog")


if __name__ == "__main__":
    main()
