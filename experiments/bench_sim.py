"""Simulator speed: fast path vs stepping every iteration, side by side in one run.

Simulates the embedded azure-conv trace and a synthetic Poisson workload (1,000,000 requests
by default) under each policy, in fast mode and in step mode (``--exact-steps``), each run in
a fresh process on one core so that its peak memory (max RSS) is its own. Prints wall time,
simulated requests per wall second, peak memory, and the fast-over-step speed-up; checks that
both modes agree on every request's token count and on the summary.

    python experiments/bench_sim.py                       # the full benchmark
    python experiments/bench_sim.py --synthetic-requests 100000 --skip-step-above 200000
    python experiments/bench_sim.py --synthetic-requests 20000 --profile profiles/tiny-cpu.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import time

POLICIES = ("static", "continuous", "chunked")


def _workload(name: str, num_requests: int, seed: int):
    from sim.workload import SyntheticWorkload, TraceReplay

    if name == "azure-conv":
        return TraceReplay(trace="azure-conv").requests()
    # A moderately loaded 7B on one H100: about 30 requests in flight under continuous batching.
    return SyntheticWorkload(arrival="poisson", rate=20.0, num_requests=num_requests,
                             prompt_dist="uniform:128:1024", output_dist="uniform:16:256", seed=seed).generate()


def _run(args: tuple) -> dict:
    """One simulation job: (workload, requests, policy, exact steps, seed[, profile path]); the
    cost model is the roofline of the default model and GPU, or the profile's fit."""
    workload, num_requests, policy, exact, seed, *rest = args
    from sim.config import SimConfig
    from sim.policies import SchedulerConfig
    from sim.simulation import run_simulation

    profile = None
    if rest and rest[0] is not None:
        from calibrate.profile import load_profile

        profile = load_profile(rest[0])
    requests = _workload(workload, num_requests, seed)
    config = SimConfig(scheduler=SchedulerConfig(policy=policy),
                       exact_steps=exact)
    t0 = time.perf_counter()
    run = run_simulation(config, requests, profile)
    summary = run.summary()
    wall_s = time.perf_counter() - t0
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "workload": workload, "requests": len(requests), "policy": policy, "mode": "step" if exact else "fast",
        "wall_s": wall_s, "requests_per_s": len(requests) / wall_s, "peak_gib": peak_bytes / 2**30,
        "steps": sum(s.steps for s in run.result.replicas),
        "decisions": sum(len(s.timeseries.time_s) for s in run.result.replicas),
        "tokens": [r.num_generated for r in run.result.requests],
        "summary": {k: v for k, v in summary.items() if isinstance(v, float | int)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--synthetic-requests", type=int, default=1_000_000)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--skip-step-above", type=int, default=None,
                        help="Skip step mode for workloads larger than this (it is the slow reference).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the rows (without token lists) to this file.")
    parser.add_argument("--profile", default=None,
                        help="Price steps with this calibrated profile (e.g. profiles/tiny-cpu.json) instead of "
                             "the roofline.")
    opts = parser.parse_args()
    jobs = []
    for workload, n in (("azure-conv", 0), ("poisson", opts.synthetic_requests)):
        for policy in opts.policies.split(","):
            for exact in (False, True):
                if exact and opts.skip_step_above is not None and n > opts.skip_step_above:
                    continue
                jobs.append((workload, n, policy, exact, opts.seed, opts.profile))
    ctx = mp.get_context("spawn")
    rows = []
    print(f"{'workload':<11}{'requests':>10} {'policy':<11}{'mode':<5}{'wall s':>9}{'req/s':>11}{'peak GiB':>9}"
          f"{'steps':>11}{'decisions':>11}{'speed-up':>9}", flush=True)
    for job in jobs:
        with ctx.Pool(1, maxtasksperchild=1) as pool:  # a fresh process per run: its own peak memory
            row = pool.apply(_run, (job,))
        rows.append(row)
        speedup = ""
        if row["mode"] == "step":
            fast = next(r for r in rows if r["mode"] == "fast" and r["workload"] == row["workload"]
                        and r["policy"] == row["policy"])
            speedup = f"{row['wall_s'] / fast['wall_s']:.1f}x"
            same = fast["tokens"] == row["tokens"] and all(
                abs(fast["summary"][k] - v) <= 1e-9 * max(1.0, abs(v)) for k, v in row["summary"].items())
            speedup += "" if same else " DIFFERS"
        print(f"{row['workload']:<11}{row['requests']:>10} {row['policy']:<11}{row['mode']:<5}{row['wall_s']:>9.2f}"
              f"{row['requests_per_s']:>11.0f}{row['peak_gib']:>9.2f}{row['steps']:>11}{row['decisions']:>11}"
              f"{speedup:>9}", flush=True)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump([{k: v for k, v in r.items() if k != "tokens"} for r in rows], f, indent=2)


if __name__ == "__main__":
    main()
