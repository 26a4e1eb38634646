"""The same requests priced by other calibrations: a validation run's requests simulated again with
each profile given, their mean TTFT and TPOT against the run's live mean.

A fidelity table answers for one calibration; this tells how much of its error the calibration
decides. Each run's requests, scheduler and KV pool are read back from its ``validation.json``
(``setup``: what ``validate --url`` / ``--engine vllm`` and ``fidelity.py --url`` record), so the
arrivals stay those the live runs served, whichever profile prices them::

    python experiments/reprice.py runs/fidelity-vllm p0.json p1.json p2.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments.load_error import LoadErrorInput, runs_under

METRICS = {"mean_tpot_ms": "TPOT", "p99_tpot_ms": "p99 TPOT", "mean_ttft_ms": "TTFT"}
"""What is compared (validation.json key: label), in print order."""


def simulate_again(setup: dict[str, Any], cost: Any) -> dict[str, float]:
    """The summary of ``setup``'s requests simulated under its scheduler and pool with ``cost``."""
    from experiments.validation.errors import PERCENTILES
    from sim.metrics import summarize

    sim = simulated(setup, cost)
    return summarize(sim.requests, sim.itl(), PERCENTILES, None, sim.num_preemptions)


def simulated(setup: dict[str, Any], cost: Any, token_times: bool = False) -> Any:
    """``setup``'s requests simulated under its scheduler and pool with ``cost`` (a SimResult;
    ``token_times``: each request keeps its tokens' times)."""
    from sim.cluster import make_router
    from sim.engine import simulate
    from sim.kv import BlockManager
    from sim.policies import make_policy
    from sim.policies.base import SchedulerConfig
    from sim.workload import TraceReplay

    replay_fields = {f.name for f in dataclasses.fields(TraceReplay)}
    workload = TraceReplay(**{k: v for k, v in setup["workload"].items() if k in replay_fields})
    scheduler = SchedulerConfig(**setup["scheduler"])
    kv = setup["kv"]

    def policy() -> Any:
        return make_policy(scheduler, BlockManager(kv["num_blocks"], kv["block_size"]))

    return simulate(workload.requests(), policy, cost, make_router("round_robin"), 1, token_times=token_times)


def read_setup(run: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """The run's ``setup`` and its live means (mean TTFT and TPOT, ms)."""
    path = run / "validation.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoadErrorInput(f"{path}: {e}") from None
    setup = data.get("setup") or {}
    missing = [k for k in ("workload", "scheduler", "kv") if k not in setup]
    missing += [m for m in METRICS if "live" not in (data.get(m) or {})]
    if missing:
        raise LoadErrorInput(f"{path}: no {', '.join(missing)} (a run of validate --url, --engine vllm or "
                             "fidelity.py --url records its workload, scheduler and KV pool)")
    return setup, {m: float(data[m]["live"]) for m in METRICS}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a validate output, or a fidelity output (its cells/)")
    p.add_argument("profiles", type=Path, nargs="+", help="the calibrations to price the requests with")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    from calibrate.profile import CalibratedCost, load_profile

    try:
        costs = [CalibratedCost(load_profile(p)) for p in args.profiles]
        runs = [(run.name, *read_setup(run)) for run in runs_under(args.runs)]
    except ValueError as e:  # ProfileError, LoadErrorInput
        echo(f"error: {e}")
        return 2
    name_width = max(len(name) for name, _, _ in runs)
    echo("mean TPOT (ms) simulated with each profile, and its error against the live mean; "
         "then p99 TPOT and mean TTFT the same way")
    echo(f"{'run'.ljust(name_width)}  {'live':>7}  " + "  ".join(f"{p.stem[:16]:>16}" for p in args.profiles))
    for name, setup, live in runs:
        try:
            sims = [simulate_again(setup, cost) for cost in costs]
        except (TypeError, KeyError, ValueError) as e:  # a setup this version does not read
            echo(f"error: {name}: its recorded setup cannot be simulated again ({e})")
            return 2
        for metric, label in METRICS.items():
            cells = [f"{s[metric]:7.1f} ({(s[metric] / live[metric] - 1) * 100:+6.1f}%)" for s in sims]
            echo(f"{(name if metric == 'mean_tpot_ms' else '').ljust(name_width)}  {live[metric]:7.1f}  "
                 + "  ".join(f"{c:>16}" for c in cells) + f"  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
