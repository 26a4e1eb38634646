"""The capacity search: the highest request rate a configuration sustains within latency SLOs,
and the replicas a target rate needs (``servesim capacity`` prints it; other searches, e.g.
across parallelism layouts, call :func:`find_capacity` with their own configurations).

The search per configuration: simulate at a start rate; if it meets the SLOs, double it until
they fail; if not, try a rate 10^4 times lower (nearly unloaded: a miss there means no rate
will do). That brackets the limit; then bisect (geometrically while the bracket spans more
than 2x) until the bracket [lo, hi) is within the stated relative precision, (hi - lo) / lo <=
precision. The answer is lo, the highest rate simulated that met every SLO. A search is
sequential; the searches of several configurations run in parallel, one step of each per round.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from experiments.sweep import RateScaler, RunSpec, Sweep, Workload
from sim.config import SimConfig
from sim.metrics import DEFAULT_PERCENTILES

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
    tried: list[tuple[int, list[str]]] = field(default_factory=list)
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


@dataclass(frozen=True)
class CapacityReport:
    """What :func:`find_capacity` found: a search per configuration label, and with a target
    rate the replicas each needs."""

    searches: dict[str, RateSearch]
    sizings: dict[str, Sizing]
    start_rate: float
    simulations: int


def find_capacity(configs: Sequence[tuple[str, SimConfig]], workload: Workload, slos: Sequence[Slo], *,
                  goodput: dict[str, float] | None = None, goodput_fraction: float | None = None,
                  start_rate: float | None = None, precision: float = 0.05, target_rate: float | None = None,
                  max_replicas: int = 64, jobs: int | None = None, progress: bool | None = None) -> CapacityReport:
    """Search every (label, config) for its highest rate within ``slos`` (one replica each) and,
    with ``target_rate``, size the replicas it needs. ``start_rate`` None: the workload's own
    mean rate. Raises ValueError (a workload without a rate, bad settings) for people."""
    if not slos and goodput_fraction is None:
        raise ValueError("a capacity search needs at least one SLO")
    if (goodput_fraction is None) != (not goodput):
        raise ValueError("goodput_fraction and goodput go together: the share of requests that must meet the "
                         "goodput SLOs")
    if not 0 < precision < 1:
        raise ValueError(f"precision must be in (0, 1), got {precision}")
    scaler = RateScaler(workload)
    start = start_rate if start_rate is not None else scaler.base_rate
    sizings: dict[str, Sizing] = {}
    with Sweep(goodput, slo_percentiles(slos), jobs, progress, desc="capacity search") as sweep:
        searches = search_capacity(sweep, configs, scaler, slos, goodput_fraction, start, precision)
        if target_rate is not None:
            sizings = size_replicas(sweep, configs, scaler, searches, slos, goodput_fraction, target_rate,
                                    max_replicas)
    runs = sum(s.steps for s in searches.values()) + sum(len(z.tried) for z in sizings.values())
    return CapacityReport(searches, sizings, start, runs)
