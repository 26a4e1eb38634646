"""``servesim compare``: several scheduling policies on one workload, side by side, across loads.
The runs are :mod:`experiments.comparison`'s; this module parses, prints and writes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import click

from experiments.comparison import AUTO_RATE_FRACTIONS, Comparison, ratio_to_static, run_comparison
from experiments.options import (
    base_workload,
    cluster_options,
    fail,
    jobs_option,
    policies_help,
    policy_configs,
    policy_knob_options,
    workload_options,
)
from experiments.output import write_json, write_runs_csv
from experiments.plots import comparison_plots
from experiments.report import comparison_table, format_cell, throughput_table
from experiments.sweep import default_jobs, describe_workload
from sim.metrics import parse_goodput

DEFAULT_POLICIES = "static,continuous,chunked,chunked+swap"


# -- the command ---------------------------------------------------------------------------------


def parse_rates(text: str | None) -> list[float] | Literal["auto"] | None:
    """``"2,4,8"`` -> ``[2.0, 4.0, 8.0]`` (sorted, unique); ``"auto"`` -> ``"auto"``."""
    if text is None:
        return None
    if text.strip() == "auto":
        return "auto"
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected 'auto' or comma-separated request rates in req/s, e.g. 2,4,8",
                                 param_hint="--rates") from None
    if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
        raise click.BadParameter(f"{text!r}: every rate must be a number > 0 (req/s)", param_hint="--rates")
    return rates


def ratio_line(cmp: Comparison) -> tuple[str, dict[str, float | None]]:
    """The closing line on throughput relative to static at the highest rate, named for what it
    is: a saturation ratio only when that rate is at or beyond saturation."""
    assert cmp.rates is not None
    top = cmp.rates[-1]
    ratios = ratio_to_static(cmp.at_rate(top))
    text = ", ".join(f"{k} {format_cell(v, '.2f')}x" for k, v in ratios.items())
    if cmp.saturated:
        return f"saturation throughput ratio (output tok/s vs static at {top:g} req/s): {text}", ratios
    where = "" if cmp.saturation_rps is None else f", below saturation ~{cmp.saturation_rps:.3g} req/s"
    return f"output throughput vs static at the highest rate, {top:g} req/s{where}: {text}", ratios


@click.command("compare")
@click.option("--policies", default=DEFAULT_POLICIES, show_default=True, metavar="SPEC,...",
              help=policies_help("compare"))
@click.option("--rates", default=None, metavar="R,...|auto",
              help="Request rates (req/s) to run each policy at: a trace is time-scaled to each mean rate, a "
                   "synthetic workload generated at it. 'auto' picks rates around saturation. Default: the "
                   "workload as given.")
@workload_options
@policy_knob_options
@cluster_options
@click.option("--goodput", multiple=True, metavar="NAME:MS",
              help="SLO for goodput, repeatable: ttft:MS, tpot:MS, e2el:MS.")
@jobs_option
@click.option("-o", "--output", default="compare-out", show_default=True, type=click.Path(file_okay=False),
              help="Directory for compare.json, compare.csv and the plots.")
def compare(**opts: Any) -> None:
    """Run several scheduling policies on the same workload and print them side by side.

    With several --rates: a table per rate, output throughput by rate with each policy's ratio
    to static, and plots of latency against throughput (and goodput against rate with
    --goodput). Every run is written to compare.json and compare.csv.
    """
    try:
        goodput = parse_goodput(opts["goodput"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--goodput") from None
    asked = parse_rates(opts["rates"])
    configs = policy_configs(opts, opts["policies"])
    workload, scaler = base_workload(opts)
    labels = [label for label, _ in configs]
    jobs = opts["jobs"]

    t0 = time.perf_counter()
    try:
        cmp = run_comparison(configs, workload, None if asked == "auto" else asked,
                      fractions=AUTO_RATE_FRACTIONS if asked == "auto" else None, goodput=goodput, jobs=jobs,
                      with_saturation=asked is not None)
    except ValueError as e:
        raise fail(e) from None
    wall_s = time.perf_counter() - t0
    if asked == "auto":
        assert cmp.saturation_rps is not None
        click.echo(f"--rates auto: saturation ~{cmp.saturation_rps:.3g} req/s (best request throughput with every "
                   f"request queued at once); rates = {', '.join(f'{f:g}' for f in AUTO_RATE_FRACTIONS)} x that")

    rates = cmp.rates
    for rate in rates or (None,):
        title = "as given" if rate is None else f"rate {rate:g} req/s"
        click.echo(f"\n== {title} ==")
        click.echo(comparison_table(cmp.at_rate(rate), bool(goodput)))
    if rates is not None and len(rates) > 1:
        click.echo("\n== output throughput (tok/s) by request rate ==")
        click.echo(throughput_table(cmp.runs, labels, rates))
    ratios: dict[str, float | None] = {}
    if rates is not None and ratio_to_static(cmp.at_rate(rates[-1])):
        line, ratios = ratio_line(cmp)
        click.echo(f"\n{line}")
    n_sims = len(cmp.runs) + (len(configs) if cmp.saturation_rps is not None else 0)
    click.echo(f"\n{n_sims} simulations in {wall_s:.1f} s wall, {jobs or default_jobs()} jobs")

    out = Path(opts["output"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {
        "command": "compare", "policies": labels, "rates": None if rates is None else list(rates),
        "workload": describe_workload(workload, scaler), "goodput_slos_ms": goodput,
        "configs": {label: c.to_dict() for label, c in configs}, "saturation_rps": cmp.saturation_rps,
        "top_rate_saturated": cmp.saturated,
        "throughput_ratio_at_top_rate": ratios, "runs": list(cmp.runs),
    })
    write_runs_csv(out / "compare.csv", cmp.runs)
    written = ["compare.json", "compare.csv"]
    if rates is not None and len(rates) > 1:
        written += [p.name for p in comparison_plots(out, cmp.runs, labels, bool(goodput))]
    click.echo(f"wrote {out}/: {', '.join(written)}")
