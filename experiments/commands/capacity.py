"""``servesim capacity``: the highest request rate each policy sustains within latency SLOs, and
the replicas a target rate needs.

The search per policy: simulate at a start rate; if it meets the SLOs, double it until they
fail; if not, try a rate 10^4 times lower (nearly unloaded: a miss there means no rate will
do). That brackets the limit; then bisect (geometrically while the bracket spans more than
2x) until the bracket [lo, hi) is within the stated relative precision, (hi - lo) / lo <=
precision. The answer is lo, the highest rate simulated that met every SLO. A search is
sequential; the searches of the policies run in parallel, one step of each per round.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from experiments.commands.compare import (
    base_workload,
    format_table,
    jobs_option,
    policy_configs,
    policy_knob_options,
    without_options,
    workload_info,
)
from experiments.commands.simulate import cluster_options
from experiments.options import workload_options
from experiments.output import write_json
from experiments.sweep import RateScaler, RunSpec, Sweep, default_jobs
from sim.config import SimConfig
from sim.metrics import DEFAULT_PERCENTILES, parse_goodput

SLO_METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_FORMS = (
    "METRIC_STAT:MS with METRIC one of ttft, tpot, itl, e2el and STAT one of mean, median, pNN "
    "(a percentile, e.g. p90, p99, p99.9); STAT_METRIC:MS is accepted too. "
    "Examples: ttft_p99:500, tpot_p99:50, e2el_mean:20000, p90_ttft:300"
)
MAX_DOUBLINGS = 20
"""Doublings of the start rate before the search reports that the SLOs hold at any rate."""
FLOOR_FRACTION = 1e-4
"""When the start rate misses the SLOs, the search tries this fraction of it next: requests
then barely overlap, so a miss there means the SLOs are below the unloaded latency."""
VERIFY_ROUTER = "least_loaded"


@dataclass(frozen=True)
class Slo:
    """A latency limit on one statistic of one metric of a run's summary."""

    metric: str
    stat: str
    """``mean``, ``median`` or ``p<percentile>`` (``p99``, ``p99.9``)."""
    limit_ms: float

    @property
    def key(self) -> str:
        """The summary key, e.g. ``p99_ttft_ms``."""
        return f"{self.stat}_{self.metric}_ms"

    @property
    def percentile(self) -> float | None:
        return float(self.stat[1:]) if self.stat.startswith("p") else None

    def __str__(self) -> str:
        return f"{self.metric}_{self.stat} <= {self.limit_ms:g} ms"


def _parse_stat(text: str) -> str | None:
    if text in ("mean", "median"):
        return text
    m = re.fullmatch(r"p(\d+(?:\.\d+)?)", text)
    if m and 0 < float(m.group(1)) < 100:
        p = float(m.group(1))
        return f"p{int(p)}" if p == int(p) else f"p{p:g}"
    return None


def parse_slo(text: str) -> Slo:
    """``"ttft_p99:500"`` -> ``Slo("ttft", "p99", 500.0)``; also ``p99_ttft:500``, ``tpot_mean:40``."""
    name, sep, value = text.strip().partition(":")
    parts = name.strip().lower().split("_")
    if not sep or len(parts) != 2:
        raise ValueError(f"SLO {text!r}: expected {SLO_FORMS}")
    metric, stat_text = parts if parts[0] in SLO_METRICS else parts[::-1]
    stat = _parse_stat(stat_text)
    if metric not in SLO_METRICS or stat is None:
        raise ValueError(f"SLO {text!r}: expected {SLO_FORMS}")
    try:
        limit_ms = float(value)
    except ValueError:
        raise ValueError(f"SLO {text!r}: {value!r} is not a number of milliseconds; expected {SLO_FORMS}") from None
    if not (math.isfinite(limit_ms) and limit_ms > 0):
        raise ValueError(f"SLO {text!r}: the limit must be a number of milliseconds > 0; expected {SLO_FORMS}")
    return Slo(metric, stat, limit_ms)


def slo_percentiles(slos: Sequence[Slo]) -> list[float]:
    """The percentiles a summary must carry to check ``slos`` (and the default ones)."""
    return sorted({*DEFAULT_PERCENTILES, *(p for s in slos if (p := s.percentile) is not None)})


def violations(summary: dict[str, Any], slos: Sequence[Slo], goodput_fraction: float | None = None) -> list[str]:
    """Why a run misses its SLOs; empty when it meets them all.

    ``goodput_fraction``: also require that share of all requests (rejected ones included)
    to meet the per-request ``--goodput`` SLOs."""
    if summary["completed"] == 0:
        return ["no request completed"]
    out = [f"{s.metric}_{s.stat} {summary[s.key]:.1f} > {s.limit_ms:g} ms" for s in slos if summary[s.key] > s.limit_ms]
    if goodput_fraction is not None:
        share = good_share(summary)
        if share < goodput_fraction:
            out.append(f"goodput share {share:.3f} < {goodput_fraction:g}")
    return out


def good_share(summary: dict[str, Any]) -> float:
    """Requests meeting every --goodput SLO, as a share of all requests."""
    total = summary["completed"] + summary["rejected"]
    return summary["request_goodput"] * summary["duration"] / total if total else 0.0


class RateSearch:
    """The search for one policy: ``next_rate()`` proposes a rate to simulate (None when done),
    ``record()`` takes its outcome."""

    def __init__(self, start_rate: float, precision: float) -> None:
        self.start_rate = start_rate
        self.precision = precision
        self.lo: float | None = None
        """Highest rate that met the SLOs."""
        self.hi: float | None = None
        """Lowest rate that missed them."""
        self.lo_run: dict[str, Any] | None = None
        self.hi_why: list[str] = []
        self.steps = 0

    def next_rate(self) -> float | None:
        lo, hi, start = self.lo, self.hi, self.start_rate
        if lo is None and hi is None:
            return start
        if hi is None:
            assert lo is not None
            return None if lo >= start * 2**MAX_DOUBLINGS else lo * 2
        if lo is None:
            floor = start * FLOOR_FRACTION
            return None if hi <= floor else floor
        if (hi - lo) / lo <= self.precision:
            return None
        return math.sqrt(lo * hi) if hi > 2 * lo else (lo + hi) / 2

    def record(self, rate: float, run: dict[str, Any], why: list[str]) -> None:
        self.steps += 1
        if not why and (self.lo is None or rate > self.lo):
            self.lo, self.lo_run = rate, run
        elif why and (self.hi is None or rate < self.hi):
            self.hi, self.hi_why = rate, why


@dataclass
class Sizing:
    """Replicas for the target rate: ``replicas`` met the SLOs (None: not up to the cap)."""

    first_guess: int
    replicas: int | None = None
    tried: list[tuple[int, list[str]]] = dataclasses.field(default_factory=list)
    run: dict[str, Any] | None = None


def search_capacity(sweep: Sweep, configs: Sequence[tuple[str, SimConfig]], scaler: RateScaler,
                    slos: Sequence[Slo], goodput_fraction: float | None, start_rate: float,
                    precision: float) -> dict[str, RateSearch]:
    """One :class:`RateSearch` per policy, run to the end in lockstep rounds."""
    searches = {label: RateSearch(start_rate, precision) for label, _ in configs}
    while True:
        todo = [(label, config, rate) for label, config in configs
                if (rate := searches[label].next_rate()) is not None]
        if not todo:
            return searches
        runs = sweep.run([RunSpec(label, config, scaler.at(rate), rate) for label, config, rate in todo])
        for (label, _, rate), run in zip(todo, runs, strict=True):
            searches[label].record(rate, run, violations(run, slos, goodput_fraction))


def size_replicas(sweep: Sweep, configs: Sequence[tuple[str, SimConfig]], scaler: RateScaler,
                  searches: dict[str, RateSearch], slos: Sequence[Slo], goodput_fraction: float | None,
                  target_rate: float, max_replicas: int) -> dict[str, Sizing]:
    """ceil(target / max rate) replicas per policy, checked by simulating them behind a
    least-loaded router at the target rate, and one more until the SLOs hold or the cap."""
    sizings: dict[str, Sizing] = {}
    for label, _ in configs:
        lo = searches[label].lo
        if lo is not None:
            sizings[label] = Sizing(math.ceil(target_rate / lo - 1e-9))
    workload = scaler.at(target_rate)
    while True:
        todo = []
        for label, config in configs:
            s = sizings.get(label)
            if s is None or s.replicas is not None:
                continue
            n = s.first_guess + len(s.tried)
            if n <= max_replicas:
                todo.append((label, n, dataclasses.replace(config, replicas=n, router=VERIFY_ROUTER)))
        if not todo:
            return sizings
        runs = sweep.run([RunSpec(label, config, workload, target_rate) for label, _, config in todo])
        for (label, n, _), run in zip(todo, runs, strict=True):
            why = violations(run, slos, goodput_fraction)
            sizings[label].tried.append((n, why))
            if not why:
                sizings[label].replicas, sizings[label].run = n, run


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
              help="Policies to size: static, continuous, chunked, each optionally +recompute, +swap or +off.")
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
    start_rate = opts["start_rate"] or scaler.base_rate
    precision = opts["precision"]
    jobs = opts["jobs"]

    t0 = time.perf_counter()
    sizings: dict[str, Sizing] = {}
    try:
        with Sweep(goodput, slo_percentiles(slos), jobs, desc="capacity search") as sweep:
            searches = search_capacity(sweep, configs, scaler, slos, fraction, start_rate, precision)
            if opts["target_rate"] is not None:
                sizings = size_replicas(sweep, configs, scaler, searches, slos, fraction, opts["target_rate"],
                                        opts["max_replicas"])
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    wall_s = time.perf_counter() - t0

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
    click.echo(f"\n{sum(s.steps for s in searches.values()) + sum(len(z.tried) for z in sizings.values())} "
               f"simulations in {wall_s:.1f} s wall, {jobs or default_jobs()} jobs")

    if opts["output"]:
        out = Path(opts["output"])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "capacity.json", {
            "command": "capacity", "slos": [dataclasses.asdict(s) for s in slos],
            "goodput_slos_ms": goodput, "goodput_fraction": fraction, "precision": precision,
            "start_rate": start_rate, "workload": workload_info(workload, scaler),
            "configs": {label: c.to_dict() for label, c in configs},
            "policies": {label: {"max_rate": s.lo, "fail_rate": s.hi, "fail_reasons": s.hi_why, "steps": s.steps,
                                 "summary_at_max_rate": s.lo_run} for label, s in searches.items()},
            "target_rate": opts["target_rate"],
            "sizing": {label: dataclasses.asdict(z) for label, z in sizings.items()},
        })
        click.echo(f"wrote {out}/capacity.json")
