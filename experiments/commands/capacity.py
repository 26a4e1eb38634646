"""``servesim capacity``: the highest request rate each policy sustains within latency SLOs, and
the replicas a target rate needs. The search is :mod:`experiments.capacity`'s; this module
parses the options and prints the tables.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from experiments.capacity import VERIFY_ROUTER, RateSearch, Slo, find_capacity, good_share, parse_slo
from experiments.options import (
    base_workload,
    cluster_options,
    jobs_option,
    policies_help,
    policy_configs,
    policy_knob_options,
    without_options,
    workload_options,
)
from experiments.output import write_json
from experiments.report import format_table
from experiments.sweep import default_jobs, describe_workload
from sim.metrics import parse_goodput


def _ms(run: dict[str, Any] | None, key: str) -> str:
    return "-" if run is None else f"{run[key]:.1f}"


def capacity_table(searches: dict[str, RateSearch], slos: Sequence[Slo], goodput: bool) -> str:
    header = ["policy", "max rate (req/s)", "fails at", *(f"{s.metric}_{s.stat} (ms)" for s in slos),
              *(["good share"] if goodput else []), "output tok/s", "sims"]
    rows = []
    for label, s in searches.items():
        rows.append([
            label,
            "none" if s.lo is None else f"{s.lo:.4g}" + ("+" if s.hi is None else ""),
            "-" if s.hi is None else f"{s.hi:.4g}",
            *(_ms(s.lo_run, slo.key) for slo in slos),
            *([("-" if s.lo_run is None else f"{good_share(s.lo_run):.3f}")] if goodput else []),
            _ms(s.lo_run, "output_throughput"),
            str(s.steps),
        ])
    return format_table(header, rows)


@click.command("capacity")
@click.option("--policies", default="static,continuous,chunked", show_default=True, metavar="SPEC,...",
              help=policies_help("size"))
@click.option("--slo", "slos", multiple=True, required=True, metavar="METRIC_STAT:MS",
              help="Latency SLO, repeatable, all must hold: ttft_p99:MS, tpot_p99:MS, e2el_p99:MS, itl_p99:MS; "
                   "STAT may be mean, median or any pNN.")
@click.option("--goodput", multiple=True, metavar="NAME:MS",
              help="Per-request SLO for --goodput-fraction, repeatable: ttft:MS, tpot:MS, e2el:MS.")
@click.option("--goodput-fraction", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Also require this share of requests to meet every --goodput SLO.")
@click.option("--precision", default=0.05, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Relative precision of the max rate: the search stops when (fail - pass) / pass <= this.")
@click.option("--start-rate", default=None, type=click.FloatRange(min=0, min_open=True),
              help="First rate to try, req/s [default: the workload's own mean rate].")
@click.option("--target-rate", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Size a cluster for this rate: replicas = ceil(target / max rate), verified in simulation.")
@click.option("--max-replicas", default=64, show_default=True, type=click.IntRange(min=1),
              help="Most replicas the --target-rate check tries.")
@click.option("--layouts", default=None, metavar="auto|TPxPP,...",
              help="With --target-rate: plan across parallelism layouts (auto: tp 1, 2, 4, 8 x pp 1, 2) and "
                   "report the fewest GPUs (tp x pp x replicas) that meet the SLOs, with every layout tried.")
@workload_options
@policy_knob_options
@without_options("replicas", "router")
@cluster_options
@jobs_option
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False),
              help="Directory to write capacity.json into.")
def capacity(**opts: Any) -> None:
    """The highest request rate at which each policy meets every --slo on one replica, found by
    exponential search and bisection; with --target-rate, the replicas that rate needs.

    A rate time-scales a trace to that mean rate, or sets a synthetic workload's --rate.
    """
    try:
        slos = [parse_slo(s) for s in opts["slos"]]
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--slo") from None
    try:
        goodput = parse_goodput(opts["goodput"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--goodput") from None
    fraction = opts["goodput_fraction"]
    if (fraction is None) != (not goodput):
        raise click.UsageError("--goodput-fraction and --goodput go together: the share of requests that must "
                               "meet the --goodput SLOs, e.g. --goodput ttft:500 --goodput-fraction 0.9")
    opts = opts | {"replicas": 1, "router": "round_robin"}
    configs = policy_configs(opts, opts["policies"])
    workload, scaler = base_workload(opts)
    precision = opts["precision"]
    jobs = opts["jobs"]

    if opts["layouts"]:
        _plan(opts, configs, workload, slos, goodput, fraction)
        return
    t0 = time.perf_counter()
    try:
        report = find_capacity(configs, workload, slos, goodput=goodput, goodput_fraction=fraction,
                               start_rate=opts["start_rate"], precision=precision, target_rate=opts["target_rate"],
                               max_replicas=opts["max_replicas"], jobs=jobs)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    wall_s = time.perf_counter() - t0
    searches, sizings, start_rate = report.searches, report.sizings, report.start_rate

    conditions = [str(s) for s in slos]
    if fraction is not None:
        within = ", ".join(f"{k} {v:g} ms" for k, v in goodput.items())
        conditions.append(f">= {fraction:g} of requests within {within}")
    click.echo(f"SLOs: {'; '.join(conditions)}")
    click.echo(f"max rate per replica, to a relative precision of {precision:g} "
               f"(it meets the SLOs; 'fails at' is the lowest rate simulated that did not, "
               f"at most {1 + precision:g}x higher):")
    click.echo(capacity_table(searches, slos, fraction is not None))
    for label, s in searches.items():
        if s.lo is None:
            click.echo(f"{label}: misses the SLOs even at {s.hi:.3g} req/s ({'; '.join(s.hi_why)})")
        elif s.hi is None:
            click.echo(f"{label}: still meets the SLOs at {s.lo:.3g} req/s, the search's ceiling")
    if opts["target_rate"] is not None:
        click.echo(f"\nreplicas for {opts['target_rate']:g} req/s "
                   f"(checked with --replicas N --router {VERIFY_ROUTER}):")
        rows = []
        for label, _ in configs:
            z = sizings.get(label)
            if z is None:
                rows.append([label, "-", "-", "no rate meets the SLOs"])
                continue
            verdict = (f"SLOs hold with {z.replicas}" if z.replicas is not None
                       else f"SLOs missed up to {opts['max_replicas']} ({'; '.join(z.tried[-1][1])})")
            rows.append([label, str(z.first_guess), "-" if z.replicas is None else str(z.replicas), verdict])
        click.echo(format_table(["policy", "ceil(target/max)", "replicas", "check"], rows))
    click.echo(f"\n{report.simulations} simulations in {wall_s:.1f} s wall, {jobs or default_jobs()} jobs")

    if opts["output"]:
        out = Path(opts["output"])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "capacity.json", {
            "command": "capacity", "slos": [dataclasses.asdict(s) for s in slos],
            "goodput_slos_ms": goodput, "goodput_fraction": fraction, "precision": precision,
            "start_rate": start_rate, "workload": describe_workload(workload, scaler),
            "configs": {label: c.to_dict() for label, c in configs},
            "policies": {label: {"max_rate": s.lo, "fail_rate": s.hi, "fail_reasons": s.hi_why, "steps": s.steps,
                                 "summary_at_max_rate": s.lo_run} for label, s in searches.items()},
            "target_rate": opts["target_rate"],
            "sizing": {label: dataclasses.asdict(z) for label, z in sizings.items()},
        })
        click.echo(f"wrote {out}/capacity.json")


def _plan(opts: dict[str, Any], configs: list, workload: Any, slos: Sequence[Slo], goodput: dict[str, float],
          fraction: float | None) -> None:
    """--layouts: the fewest GPUs for --target-rate across parallelism layouts (experiments.plan)."""
    from experiments.plan import parse_layouts, plan_parallelism

    if opts["target_rate"] is None:
        raise click.UsageError("--layouts plans for a --target-rate: give one")
    if opts.get("tp") or opts.get("pp", 1) != 1:
        raise click.UsageError("--layouts chooses tp and pp: leave out --tp and --pp")
    try:
        layouts = parse_layouts(opts["layouts"], configs[0][1].model)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--layouts") from None
    t0 = time.perf_counter()
    try:
        plan = plan_parallelism(configs, layouts, workload, slos, opts["target_rate"],
                                max_replicas=opts["max_replicas"], goodput=goodput, goodput_fraction=fraction,
                                start_rate=opts["start_rate"], precision=opts["precision"], jobs=opts["jobs"])
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    wall_s = time.perf_counter() - t0
    click.echo(f"SLOs: {'; '.join(str(s) for s in slos)}; target {opts['target_rate']:g} req/s")
    rows = [[r.label, str(r.gpus_per_replica), "-" if r.kv_blocks is None else str(r.kv_blocks),
             "-" if r.max_rate is None else f"{r.max_rate:.4g}", "-" if r.replicas is None else str(r.replicas),
             "-" if r.gpus is None else str(r.gpus), r.why or "meets the SLOs"] for r in plan.rows]
    click.echo(format_table(["layout", "GPUs/replica", "KV blocks", "max rate/replica", "replicas", "GPUs", "check"],
                            rows))
    if plan.best is None:
        click.echo("no layout meets the SLOs at the target rate")
    else:
        b = plan.best
        click.echo(f"fewest GPUs: {b.gpus} = tp {b.tp} x pp {b.pp} x {b.replicas} replicas ({b.label})")
    sims = plan.report.simulations if plan.report else 0
    click.echo(f"{sims} simulations in {wall_s:.1f} s wall")
    if opts["output"]:
        out = Path(opts["output"])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "capacity.json", {
            "command": "capacity", "plan": "layouts", "target_rate": opts["target_rate"],
            "slos": [dataclasses.asdict(s) for s in slos], "goodput_slos_ms": goodput, "goodput_fraction": fraction,
            "layouts": [dataclasses.asdict(r) | {"gpus": r.gpus} for r in plan.rows],
            "best": None if plan.best is None else plan.best.label,
        })
        click.echo(f"wrote {out}/capacity.json")
