"""``servesim compare``: several scheduling policies on one workload, side by side, across loads."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import click

from experiments.commands.simulate import build_sim_config, cluster_options
from experiments.options import build_workload, fail, policy_options, workload_options
from experiments.output import write_json
from experiments.sweep import RateScaler, RunSpec, Workload, default_jobs, run_sweep
from sim.config import SimConfig, parse_policy
from sim.metrics import parse_goodput
from sim.workload import TraceReplay

DEFAULT_POLICIES = "static,continuous,chunked,chunked+swap"
AUTO_RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5)
"""``--rates auto``: these fractions of the saturation request throughput."""
AUTO_PROBE_FACTOR = 1000.0
"""``--rates auto`` probes saturation at this multiple of the workload's own rate."""

# (row label, summary key, format); the rows of a comparison table.
TABLE_ROWS: list[tuple[str, str, str]] = [
    ("offered rate (req/s)", "offered_rate", ".2f"),
    ("completed", "completed", "d"),
    ("rejected", "rejected", "d"),
    ("request throughput (req/s)", "request_throughput", ".2f"),
    ("output throughput (tok/s)", "output_throughput", ".1f"),
    ("mean TTFT (ms)", "mean_ttft_ms", ".1f"),
    ("p99 TTFT (ms)", "p99_ttft_ms", ".1f"),
    ("mean TPOT (ms)", "mean_tpot_ms", ".2f"),
    ("p99 TPOT (ms)", "p99_tpot_ms", ".2f"),
    ("p99 ITL (ms)", "p99_itl_ms", ".2f"),
    ("mean E2EL (ms)", "mean_e2el_ms", ".1f"),
    ("preemptions", "num_preemptions", "d"),
]


# -- options shared with `servesim capacity` -----------------------------------------------------


def without_options(*names: str) -> Callable[[Callable], Callable]:
    """Drop the named click parameters that earlier decorators attached (e.g. ``--policy``
    when the policies come from ``--policies``)."""

    def deco(f: Callable) -> Callable:
        f.__click_params__ = [p for p in f.__click_params__ if p.name not in names]  # type: ignore[attr-defined]
        return f

    return deco


def policy_knob_options(f: Callable) -> Callable:
    """The policy knobs of ``simulate`` (order, preemption, budgets) without ``--policy``."""
    return without_options("policy")(policy_options(f))


jobs_option = click.option("--jobs", "-j", default=None, type=click.IntRange(min=1),
                           help="Simulations to run at once, one process each [default: one per core; 1 runs "
                                "in this process].")


def policy_configs(opts: dict[str, Any], policies: str) -> list[tuple[str, SimConfig]]:
    """(label, config) per comma-separated policy spec: ``static``, ``continuous``, ``chunked``,
    optionally ``+recompute`` / ``+swap`` / ``+off`` (default: ``--preempt``)."""
    specs = [s.strip() for s in policies.split(",") if s.strip()]
    if not specs:
        raise click.BadParameter("give at least one policy, e.g. static,continuous,chunked+swap",
                                 param_hint="--policies")
    if len(set(specs)) != len(specs):
        raise click.BadParameter(f"{policies!r} names a policy twice", param_hint="--policies")
    out = []
    for spec in specs:
        try:
            name, preempt = parse_policy(spec)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--policies") from None
        try:
            out.append((spec, build_sim_config(opts, name, preempt)))
        except click.ClickException as e:
            raise click.BadParameter(f"{spec!r}: {e.message}", param_hint="--policies") from None
    return out


def base_workload(opts: dict[str, Any]) -> tuple[Workload, RateScaler]:
    try:
        workload = build_workload(opts, opts["seed"])
        return workload, RateScaler(workload)
    except ValueError as e:
        raise fail(e) from None


def workload_info(workload: Workload, scaler: RateScaler) -> dict[str, Any]:
    kind = "trace" if isinstance(workload, TraceReplay) else "synthetic"
    return dataclasses.asdict(workload) | {"kind": kind, "native_rate": scaler.native_rate,
                                           "base_rate": scaler.base_rate}


# -- tables --------------------------------------------------------------------------------------


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "d":
        return str(int(value))
    return format(value, fmt)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(padded)

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def ratio_to_static(runs: Sequence[dict[str, Any]], key: str = "output_throughput") -> dict[str, float | None]:
    """Each run's ``key`` over the static run's, by policy label (runs at one rate)."""
    static = next((r for r in runs if r["policy"] == "static"), None)
    if static is None:
        return {}
    base = static[key]
    return {r["policy"]: (r[key] / base if base > 0 else None) for r in runs}


def comparison_table(runs: Sequence[dict[str, Any]], goodput: bool) -> str:
    """Rows = metrics, columns = policies, for runs at one rate."""
    rows = [[label, *(_cell(r[key], fmt) for r in runs)] for label, key, fmt in TABLE_ROWS]
    if goodput:
        rows.append(["goodput (req/s)", *(_cell(r["request_goodput"], ".2f") for r in runs)])
    ratios = ratio_to_static(runs)
    if ratios:
        rows.append(["output throughput vs static", *(_cell(ratios[r["policy"]], ".2f") + "x" for r in runs)])
    return format_table(["", *(r["policy"] for r in runs)], rows)


def throughput_table(runs: Sequence[dict[str, Any]], labels: Sequence[str], rates: Sequence[float]) -> str:
    """Rows = rates, columns = policies: output throughput and its ratio to static."""
    by_key = {(r["policy"], r["rate"]): r for r in runs}
    rows = []
    for rate in rates:
        at_rate = [by_key[(label, rate)] for label in labels]
        ratios = ratio_to_static(at_rate)
        cells = [f"{r['output_throughput']:.1f}" + (f" ({ratios[r['policy']]:.2f}x)" if ratios else "")
                 for r in at_rate]
        rows.append([f"{rate:g}", *cells])
    return format_table(["rate (req/s)", *labels], rows)


# -- output files --------------------------------------------------------------------------------


def write_csv(path: Path, runs: Sequence[dict[str, Any]]) -> None:
    """One row per run, every scalar of its summary; floats as repr, so runs compare byte for byte."""
    columns: list[str] = []
    for r in runs:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in runs:
            row = []
            for k in columns:
                v = r.get(k)
                row.append("" if v is None else json.dumps(v, sort_keys=True) if isinstance(v, dict)
                           else repr(v) if isinstance(v, float) else str(v))
            w.writerow(row)


def write_plots(out: Path, runs: Sequence[dict[str, Any]], labels: Sequence[str], goodput: bool) -> list[Path]:
    """Latency against throughput per policy (one point per rate), throughput and goodput
    against rate. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Distinct markers and dashes so that policies with identical results stay visible.
    styles: list[dict[str, Any]] = [dict(marker=m, linestyle=ls, markersize=s) for m, ls, s in
              (("o", "-", 7), ("s", "--", 6), ("^", "-.", 6), ("x", ":", 7), ("D", "-", 5), ("v", "--", 6))]
    by_policy = {label: sorted((r for r in runs if r["policy"] == label), key=lambda r: r["rate"]) for label in labels}
    written = []

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), constrained_layout=True)
    for ax, (key, name) in zip(axes.flat, (("mean_ttft_ms", "mean TTFT"), ("p99_ttft_ms", "p99 TTFT"),
                                           ("mean_e2el_ms", "mean E2EL"), ("p99_e2el_ms", "p99 E2EL")), strict=True):
        for i, (label, rs) in enumerate(by_policy.items()):
            ax.plot([r["output_throughput"] for r in rs], [r[key] for r in rs], label=label,
                    **styles[i % len(styles)])
        ax.set(xlabel="output throughput (tok/s)", ylabel=f"{name} (ms)", yscale="log", title=f"{name} vs throughput")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend()
    written.append(out / "latency-vs-throughput.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    panels = [("output_throughput", "output throughput (tok/s)")]
    if goodput:
        panels.append(("request_goodput", "goodput (req/s)"))
    for key, name in panels:
        fig, ax = plt.subplots(figsize=(7, 5), constrained_layout=True)
        for i, (label, rs) in enumerate(by_policy.items()):
            ax.plot([r["rate"] for r in rs], [r[key] for r in rs], label=label, **styles[i % len(styles)])
        ax.set(xlabel="request rate (req/s)", ylabel=name, title=f"{name} vs request rate")
        ax.grid(True, alpha=0.3)
        ax.legend()
        written.append(out / ("goodput-vs-rate.png" if key == "request_goodput" else "throughput-vs-rate.png"))
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


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


def auto_rates(configs: Sequence[tuple[str, SimConfig]], scaler: RateScaler, jobs: int | None) -> list[float]:
    """Rates around saturation: probe every policy at a very high rate, take the best request
    throughput as the saturation rate, and return ``AUTO_RATE_FRACTIONS`` of it."""
    probe = scaler.base_rate * AUTO_PROBE_FACTOR
    runs = run_sweep([RunSpec(label, config, scaler.at(probe), probe) for label, config in configs],
                     jobs=jobs, desc="probing saturation")
    saturation = max(r["request_throughput"] for r in runs)
    if saturation <= 0:
        raise click.ClickException("--rates auto: no policy completed a request in the probe run")
    click.echo(f"--rates auto: saturation ~{saturation:.3g} req/s (best request throughput with every request "
               f"queued at once); rates = {', '.join(f'{f:g}' for f in AUTO_RATE_FRACTIONS)} x that")
    return [float(f"{saturation * f:.3g}") for f in AUTO_RATE_FRACTIONS]


@click.command("compare")
@click.option("--policies", default=DEFAULT_POLICIES, show_default=True, metavar="SPEC,...",
              help="Policies to compare: static, continuous, chunked, each optionally +recompute, +swap or +off "
                   "(preemption; default --preempt).")
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
    rates = auto_rates(configs, scaler, jobs) if asked == "auto" else asked
    if rates is None:
        specs = [RunSpec(label, config, workload) for label, config in configs]
    else:
        try:
            specs = [RunSpec(label, config, scaler.at(rate), rate) for rate in rates for label, config in configs]
        except ValueError as e:
            raise fail(e) from None
    try:
        runs = run_sweep(specs, goodput, jobs=jobs, desc="compare")
    except ValueError as e:
        raise fail(e) from None
    wall_s = time.perf_counter() - t0

    for rate in rates or [None]:  # type: ignore[list-item]
        at_rate = [r for r in runs if r["rate"] == rate]
        title = "as given" if rate is None else f"rate {rate:g} req/s"
        click.echo(f"\n== {title} ==")
        click.echo(comparison_table(at_rate, bool(goodput)))
    if rates is not None and len(rates) > 1:
        click.echo("\n== output throughput (tok/s) by request rate ==")
        click.echo(throughput_table(runs, labels, rates))
    # The highest rate is the nearest to saturation; as given, the ratio is only in the table.
    saturation = ratio_to_static([r for r in runs if r["rate"] == rates[-1]]) if rates else {}
    if rates and saturation:
        click.echo(f"\nsaturation throughput ratio (output tok/s vs static at {rates[-1]:g} req/s): "
                   + ", ".join(f"{k} {_cell(v, '.2f')}x" for k, v in saturation.items()))
    click.echo(f"\n{len(specs)} simulations in {wall_s:.1f} s wall, {jobs or default_jobs()} jobs")

    out = Path(opts["output"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", {
        "command": "compare", "policies": labels, "rates": rates, "workload": workload_info(workload, scaler),
        "goodput_slos_ms": goodput, "configs": {label: c.to_dict() for label, c in configs},
        "saturation_throughput_ratio": saturation, "runs": runs,
    })
    write_csv(out / "compare.csv", runs)
    written = ["compare.json", "compare.csv"]
    if rates is not None and len(rates) > 1:
        written += [p.name for p in write_plots(out, runs, labels, bool(goodput))]
    click.echo(f"wrote {out}/: {', '.join(written)}")
