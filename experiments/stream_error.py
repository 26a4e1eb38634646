"""A server's live steps priced again: the steps its token streams show whole
(:mod:`calibrate.stream_steps`) in a validation run, priced by a profile, per band of decode
batch size; and how the server took its arrivals, against the simulation of the same requests.

``validate --url`` prints this for its own profile; this reads the runs back (their
``live*/requests.csv`` and ``tokens.csv``) and prices them with the profiles given (default: the
run's own, from ``validation.json``), so a calibration can be judged on steps of a live load it
never sent. A pace of x1.10 in a band: its steps took 10% longer than priced. The second line
of a run tells what the prices cannot: of the requests that arrived while a step ran, the share
prefilled in the next step (the rest waited a step or more), and the steps that prefilled, live
(each run) and simulated (the run's setup, this profile), read from the streams alike::

    python experiments/stream_error.py runs/fidelity-vllm
    python experiments/stream_error.py runs/fidelity-vllm --profile p0.json --profile p1.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from calibrate.stream_steps import StreamSteps, admission_steps, read_steps
from experiments.load_error import LoadErrorInput, csv_rows, runs_under
from experiments.reprice import simulated
from sim.request import Request, Status

REQUEST_COLUMNS = ("id", "arrival_s", "prompt_tokens", "output_tokens", "status")
TOKEN_COLUMNS = ("id", "token", "time_s")


def _rows(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    return csv_rows(path, columns, "validate --url, for each live run,")


def read_requests(live: Path) -> list[Request]:
    """The run's requests with their token times, from ``requests.csv`` and ``tokens.csv``."""
    requests: dict[int, Request] = {}
    path = live / "requests.csv"
    for line, r in _rows(path, REQUEST_COLUMNS):
        try:
            req = Request(int(r["id"]), float(r["arrival_s"]), int(r["prompt_tokens"]), int(r["output_tokens"]))
            req.status = Status(r["status"])
        except ValueError:
            raise LoadErrorInput(f"{path}, line {line}: id, arrival_s, prompt_tokens, output_tokens or status "
                                 "is not valid") from None
        requests[req.id] = req
    path = live / "tokens.csv"
    for line, r in _rows(path, TOKEN_COLUMNS):
        try:
            rid, t = int(r["id"]), float(r["time_s"])
        except ValueError:
            raise LoadErrorInput(f"{path}, line {line}: id or time_s is not a number") from None
        if rid not in requests:
            raise LoadErrorInput(f"{path}, line {line}: request {rid} is not in requests.csv")
        times = requests[rid].token_times_s
        if times is None:
            times = requests[rid].token_times_s = []
        times.append(t)
    for req in requests.values():
        if req.token_times_s is not None:
            req.token_times_s.sort()
    return sorted(requests.values(), key=lambda r: r.arrival_s)


def live_dirs(run: Path) -> list[Path]:
    lives = sorted(p for p in run.glob("live*") if p.is_dir())
    if not lives:
        raise LoadErrorInput(f"{run}: no live run (live/requests.csv)")
    return lives


def run_steps(run: Path, overhead_s: float, budget: int | None) -> list[StreamSteps]:
    return [read_steps(read_requests(live), overhead_s, budget) for live in live_dirs(run)]


def priced(steps: Sequence[StreamSteps], cost: Any) -> dict[str, Any]:
    """Clean steps, median |error|, the pace of all and of each decode batch band."""
    from experiments.validation.errors import step_errors

    errors = step_errors([s for run in steps for s in run.clean()], cost)
    if not errors.measured_s.size:
        return {"steps": 0}
    s = errors.summary()
    return {"steps": int(errors.measured_s.size), "median": s["median_step_rel_error"],
            "pace": float(errors.measured_s.sum() / errors.predicted_s.sum()),
            "bands": {name: 1 / (1 + b["total_rel_error"]) for name, b in s["step_errors_by_batch"].items()},
            "left_out": sum(sum(run.excluded().values()) for run in steps)}


def arrivals(requests: Sequence[Request], steps: StreamSteps) -> tuple[float | None, int]:
    """The share of the requests that arrived while a step ran that the next step prefilled
    (None: none did), and the number of steps that prefilled."""
    after = admission_steps(requests, steps).values()
    share = sum(n == 1 for n in after) / len(after) if after else None
    return share, sum(s.shape.prefill_seqs > 0 for s in steps.steps)


def describe_arrivals(live: Sequence[tuple[float | None, int]], sim: tuple[float | None, int]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x * 100:.0f}%"

    return (f"arrivals prefilled in the next step: live {', '.join(pct(a) for a, _ in live)}, sim {pct(sim[0])}; "
            f"steps that prefilled: live {', '.join(str(n) for _, n in live)}, sim {sim[1]}")


def describe(p: dict[str, Any]) -> str:
    if not p["steps"]:
        return "no step seen whole"
    bands = " ".join(f"{name}:x{pace:.2f}" for name, pace in p["bands"].items())
    return (f"{p['steps']} steps (+{p['left_out']} left out), median |err| {p['median'] * 100:.1f}%, "
            f"pace x{p['pace']:.2f}; by decode batch {bands}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, help="a validate --url output, or a fidelity --url output (its cells/)")
    p.add_argument("--profile", type=Path, action="append", default=[],
                   help="a profile to price the steps with (repeatable) [default: each run's own]")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    from calibrate.profile import CalibratedCost, load_profile

    try:
        given = [(p, load_profile(p)) for p in args.profile]
        runs = runs_under(args.runs)
        echo("steps read whole from the streams, priced by the profile; pace: their time over their price "
             "(x1.10: 10% longer than priced), overall and per decode batch band")
        for run in runs:
            data = json.loads((run / "validation.json").read_text())
            setup = (data.get("setup") if isinstance(data, dict) else None) or {}
            budget = (setup.get("scheduler") or {}).get("token_budget")
            if given:
                profiles = given
            elif "profile" in setup:
                profiles = [(Path(setup["profile"]), load_profile(setup["profile"]))]
            else:
                raise LoadErrorInput(f"{run}/validation.json: no setup.profile; give --profile")
            lives = [read_requests(live) for live in live_dirs(run)]
            for path, profile in profiles:
                cost = CalibratedCost(profile)
                steps = [read_steps(r, profile.request_overhead_s, budget) for r in lives]
                echo(f"{run.name}  [{path.stem}]  {describe(priced(steps, cost))}")
                sim = None
                if {"workload", "scheduler", "kv"} <= set(setup):
                    try:
                        sim = simulated(setup, cost, token_times=True).requests
                    except (TypeError, KeyError) as e:  # a setup this version does not read
                        raise LoadErrorInput(f"{run}/validation.json: its setup cannot be simulated again "
                                             f"({e})") from None
                if sim is not None:
                    live = [arrivals(r, s) for r, s in zip(lives, steps, strict=True)]
                    sim_arrivals = arrivals(sim, read_steps(sim, profile.request_overhead_s, budget))
                    echo(f"{' ' * len(run.name)}  {describe_arrivals(live, sim_arrivals)}")
    except (ValueError, OSError) as e:  # LoadErrorInput, ProfileError, an unreadable file
        echo(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
