"""Several configurations on one workload, side by side across request rates: the runs, the
saturation the rates may be placed around, and each run's ratio to static batching
(``servesim compare`` and the demo print and plot it).

A rate time-scales a trace to that mean rate, or sets a synthetic workload's rate
(:class:`~experiments.sweep.RateScaler`). Saturation is :mod:`sim.saturation`'s, the best of
the configurations: every request of the workload queued at t = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from experiments.sweep import RateScaler, RunSpec, Sweep, Workload

AUTO_RATE_FRACTIONS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.25, 1.5)
"""``compare --rates auto``: these fractions of the saturation request throughput."""


@dataclass(frozen=True)
class Comparison:
    """Every run (a vLLM-keyed summary plus ``policy``, ``rate`` and ``offered_rate``) of every
    configuration label at every rate; ``rates`` None: the workload as given, one run each."""

    labels: tuple[str, ...]
    rates: tuple[float, ...] | None
    runs: tuple[dict[str, Any], ...]
    saturation_rps: float | None = None
    """The best saturation throughput of the configurations (None: not looked for)."""

    def at_rate(self, rate: float | None) -> list[dict[str, Any]]:
        """The runs at one rate, in label order."""
        by_label = {r["policy"]: r for r in self.runs if r["rate"] == rate}
        return [by_label[label] for label in self.labels if label in by_label]

    @property
    def saturated(self) -> bool:
        """True when the highest rate is at or beyond saturation, so that its throughputs are
        the configurations' saturation throughputs."""
        return (self.rates is not None and self.saturation_rps is not None
                and self.rates[-1] >= self.saturation_rps * (1 - 1e-9))


def ratio_to_static(runs: Sequence[dict[str, Any]], key: str = "output_throughput") -> dict[str, float | None]:
    """Each run's ``key`` over the static run's, by policy label (runs at one rate); empty
    without a static run, None where static's is 0."""
    static = next((r for r in runs if r["policy"] == "static"), None)
    if static is None:
        return {}
    base = static[key]
    return {r["policy"]: (r[key] / base if base > 0 else None) for r in runs}


def best_saturation(sweep: Sweep, configs: Sequence[tuple[str, Any]], workload: Workload) -> float:
    """The highest saturation throughput (req/s) of ``configs`` on ``workload``; ValueError when
    no configuration completes a request."""
    rates = sweep.saturation([RunSpec(label, config, workload) for label, config in configs])
    best = max(rates, default=0.0)
    if best <= 0:
        raise ValueError("no configuration completed a request with the whole workload queued at once "
                         "(does a request fit the KV pool?)")
    return best


def rates_around(saturation_rps: float, fractions: Sequence[float] = AUTO_RATE_FRACTIONS) -> tuple[float, ...]:
    """``fractions`` of the saturation, each to 3 significant digits (req/s)."""
    return tuple(float(f"{saturation_rps * f:.3g}") for f in fractions)


def run_comparison(configs: Sequence[tuple[str, Any]], workload: Workload, rates: Sequence[float] | None = None, *,
            fractions: Sequence[float] | None = None, with_saturation: bool = False,
            goodput: dict[str, float] | None = None, jobs: int | None = None,
            progress: bool | None = None) -> Comparison:
    """Run every (label, config) on ``workload`` at every rate. ``rates`` None and ``fractions``
    given: those fractions of the best saturation; both None: the workload as given.
    ``with_saturation``: find the saturation for given rates too (so that a result can say
    whether its highest rate saturates). Raises ValueError (a workload without a rate, nothing
    completes) for people."""
    if rates is not None and fractions is not None:
        raise ValueError("give rates or fractions of saturation, not both")
    scaler = RateScaler(workload)
    saturation = None
    with Sweep(goodput, jobs=jobs, progress=progress, desc="compare") as sweep:
        if fractions is not None or (with_saturation and rates is not None):
            saturation = best_saturation(sweep, configs, workload)
        if rates is None and fractions is not None:
            assert saturation is not None
            rates = rates_around(saturation, fractions)
        if rates is None:
            specs = [RunSpec(label, config, workload) for label, config in configs]
        else:
            specs = [RunSpec(label, config, scaler.at(rate), rate) for rate in rates for label, config in configs]
        runs = sweep.run(specs)
    return Comparison(tuple(label for label, _ in configs), None if rates is None else tuple(rates), tuple(runs),
                      saturation)
