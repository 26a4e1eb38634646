"""A validation's files: ``validation.json``, the run directories ``live/`` (with ``steps.csv``,
or a server's ``stream-steps.csv`` and ``tokens.csv``; ``live-2/`` ... when repeated) and
``sim/``, and the plots (CDFs of TTFT and E2EL, live against simulated, and every live step's
predicted time against its measured time)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from experiments.output import write_json, write_run, write_steps, write_stream_steps
from experiments.plots import cdf_plot, step_scatter
from experiments.validation.errors import PERCENTILES
from experiments.validation.plan import Plan, arrivals_text
from experiments.validation.report import format_table
from experiments.validation.result import Validation, validate
from experiments.validation.runs import speed_reference
from experiments.validation.verdict import Tolerances, Verdict, verdict_at_device_speed, verdict_of
from sim.engine import SimResult
from sim.metrics import request_latencies, summarize
from sim.request import Status

if TYPE_CHECKING:
    from experiments.validation.external import ExternalPlan


def write_outputs(out: Path, plan: Plan | ExternalPlan, v: Validation, verdict: Verdict | None = None,
                  extra: dict[str, Any] | None = None) -> list[Path]:
    """validation.json (with the verdict, when given, and ``extra`` keys), live/ and sim/ run
    directories, and the plots; returns the plots. Without live steps (an external engine)
    there is no steps.csv and no step scatter."""
    out.mkdir(parents=True, exist_ok=True)
    config = {"command": "validate", **plan.describe()}
    for k, live in enumerate(v.live_runs):
        directory = out / ("live" if k == 0 else f"live-{k + 1}")
        summary = summarize(live.requests, live.itl(), PERCENTILES, None, live.num_preemptions)
        write_run(directory, config | {"executor": "live", "live_run": k + 1}, live.requests, summary,
                  [s.timeseries for s in live.replicas])
        if v.steps.measured_s.size:
            write_steps(directory / "steps.csv", live.step_log)
        stream = getattr(live, "stream_steps", None)  # a server's run: its steps read from the streams
        if stream is not None and stream.steps:
            write_stream_steps(directory / "stream-steps.csv", stream.steps)
    write_run(out / "sim", config | {"executor": "sim"}, v.sim.requests, v.sim_summary,
              [s.timeseries for s in v.sim.replicas])
    data = v.to_json({"setup": config, **(verdict.to_json() if verdict else {}), **(extra or {})})
    at_speed = verdict_at_device_speed(v, verdict.tolerances) if verdict else None
    if at_speed is not None:
        data["at_device_speed"]["verdict"] = at_speed.label
    write_json(out / "validation.json", data)

    def latencies(result: SimResult) -> tuple[list[float], list[float]]:
        done = [request_latencies(r) for r in result.requests if r.status is Status.FINISHED]
        return [t * 1000 for t, _, _ in done], [e * 1000 for _, _, e in done]

    live_ttft, live_e2el = [], []  # every live run's requests together
    for live in v.live_runs:
        ttft, e2el = latencies(live)
        live_ttft += ttft
        live_e2el += e2el
    sim_ttft, sim_e2el = latencies(v.sim)
    policy = plan.scheduler.policy
    plots = [
        cdf_plot(out / "ttft-cdf.png", {"live": live_ttft, "simulated": sim_ttft}, "TTFT (ms)",
                 f"TTFT, live vs simulated ({policy})", log_x=True),
        cdf_plot(out / "e2el-cdf.png", {"live": live_e2el, "simulated": sim_e2el}, "E2EL (ms)",
                 f"End-to-end latency, live vs simulated ({policy})", log_x=True),
    ]
    if not v.steps.measured_s.size:
        return plots
    return [
        *plots,
        step_scatter(out / "step-scatter.png", v.steps.measured_s, v.steps.predicted_s,
                     v.steps.kinds,
                     f"Every live step: profile's prediction vs measured ({policy})"),
    ]


def execute(plan: Plan, out: Path, progress: bool = True, echo: Callable[[str], None] = print,
            repeats: int = 1, tolerances: Tolerances | None = None) -> tuple[Validation, Verdict]:
    """Run the plan live (``repeats`` times) and simulated, print the table and the verdict
    against ``tolerances`` (default :class:`Tolerances`) through ``echo``, write everything;
    returns the Validation and its verdict."""
    from calibrate.profile import CalibratedCost

    n = plan.workload.num_requests
    if plan.load is not None:
        echo(f"saturation (simulated, all {n} requests queued at once): {plan.capacity_rps:.2f} req/s; "
             f"{arrivals_text(plan.workload, plan.synthetic_arrivals)} for {plan.load:.0%} load")
    times = f"{repeats} times" if repeats > 1 else "once"
    echo(f"serving {n} requests live {times} ({plan.live.model} on {plan.live.device}, {plan.scheduler.policy}, "
         f"{plan.capacity.num_blocks} KV blocks), then simulating them ...")
    t0 = time.perf_counter()
    v = validate(plan.workload.requests(), plan.live, CalibratedCost(plan.profile), progress, plan.profile.samples,
                 repeats, speed_reference(plan.profile))
    serving = " + ".join(f"{r.replicas[0].busy_s:.1f}" for r in v.live_runs)
    echo(f"live engine busy {serving} s ({time.perf_counter() - t0:.1f} s wall, simulation included)")
    verdict = verdict_of(v, tolerances)
    echo(format_table(v, verdict))
    write_outputs(out, plan, v, verdict)
    more = "".join(f", live-{k}/" for k in range(2, repeats + 1)) if repeats <= 3 else f", live-2/ .. live-{repeats}/"
    echo(f"wrote {out}/: validation.json, live/{more}, sim/, ttft-cdf.png, e2el-cdf.png, step-scatter.png")
    return v, verdict
