"""A validation's verdict: PASS when every checked error is within its stated tolerance.

Three tolerances, each a percentage of the live value (``--tolerance NAME:PCT``):

- ``mean`` (default 10%): mean TTFT, TPOT and E2EL, request and output throughput;
- ``p99`` (default 20%): p99 TTFT, TPOT and E2EL;
- ``step`` (default 5%): the median |error| of the profile's price of every live step.

A check whose live runs were further apart than its tolerance is flagged ``noisy``: the live
engine did not reproduce itself within what is asked of the simulator, so a FAIL there says as
much about the device as about the simulator. The verdict stays binary; the flag is shown next
to it. Pure: hand-made numbers in, a :class:`Verdict` out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from experiments.validation.errors import metric_names, metric_spread

DEFAULT_TOLERANCES_PCT = {"mean": 10.0, "p99": 20.0, "step": 5.0}

CHECKED_METRICS = (
    ("mean_ttft_ms", "mean"), ("mean_tpot_ms", "mean"), ("mean_e2el_ms", "mean"),
    ("request_throughput", "mean"), ("output_throughput", "mean"),
    ("p99_ttft_ms", "p99"), ("p99_tpot_ms", "p99"), ("p99_e2el_ms", "p99"),
)
"""(summary key, tolerance) of every run metric the verdict checks."""
STEP_METRIC = "median_step_rel_error"
STEP_LABEL = "per-step median |error|"


@dataclass(frozen=True)
class Tolerances:
    """The largest accepted |relative error| of each group, in percent."""

    mean_pct: float = DEFAULT_TOLERANCES_PCT["mean"]
    p99_pct: float = DEFAULT_TOLERANCES_PCT["p99"]
    step_pct: float = DEFAULT_TOLERANCES_PCT["step"]

    def __post_init__(self) -> None:
        for name in ("mean_pct", "p99_pct", "step_pct"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                    or value <= 0:
                raise ValueError(f"{name}: must be a finite percentage > 0, got {value!r}")

    def fraction(self, group: str) -> float:
        """The tolerance of ``group`` (``mean``, ``p99`` or ``step``) as a fraction."""
        return float(getattr(self, f"{group}_pct")) / 100

    def to_dict(self) -> dict[str, float]:
        """``{"mean": 10.0, "p99": 20.0, "step": 5.0}`` (percent)."""
        return {name: float(getattr(self, f"{name}_pct")) for name in DEFAULT_TOLERANCES_PCT}

    @classmethod
    def parse(cls, specs: Sequence[str]) -> Tolerances:
        """From ``NAME:PCT`` strings (``mean:10``, ``p99:20``, ``step:5``); unnamed groups keep
        their defaults. Raises ValueError naming the bad spec and the known names."""
        values: dict[str, float] = {}
        known = ", ".join(DEFAULT_TOLERANCES_PCT)
        for spec in specs:
            name, sep, pct = spec.partition(":")
            name = name.strip()
            if not sep or name not in DEFAULT_TOLERANCES_PCT:
                raise ValueError(f"{spec!r}: expected NAME:PCT with NAME one of {known} (e.g. mean:10)")
            try:
                value = float(pct.rstrip("%"))
            except ValueError:
                raise ValueError(f"{spec!r}: {pct!r} is not a percentage (e.g. {name}:10)") from None
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{spec!r}: the tolerance must be a percentage > 0")
            values[f"{name}_pct"] = value
        return cls(**values)


@dataclass(frozen=True)
class Check:
    """One checked error against its tolerance."""

    metric: str
    label: str
    group: str
    error: float | None
    """(sim - live) / live, or the median |step error|; None when undefined (live 0, sim not)."""
    tolerance: float
    """As a fraction."""
    live_spread: float | None = None
    """(max - min) / mean over the live runs; None with one run (or for the step check)."""

    @property
    def passed(self) -> bool:
        return self.error is not None and math.isfinite(self.error) and abs(self.error) <= self.tolerance

    @property
    def noisy(self) -> bool:
        """The live runs were further apart than the tolerance."""
        return self.live_spread is not None and self.live_spread > self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"passed": self.passed, "noisy": self.noisy}

    def describe(self) -> str:
        """``mean TPOT +12.3% > 10%`` (signed for run metrics, absolute for the step median)."""
        if self.error is None:
            return f"{self.label} undefined (live 0)"
        value = f"{self.error * 100:.1f}%" if self.group == "step" else f"{self.error * 100:+.1f}%"
        return f"{self.label} {value} {'<=' if self.passed else '>'} {self.tolerance * 100:g}%"


@dataclass(frozen=True)
class Verdict:
    """Every check, and PASS when all passed."""

    checks: tuple[Check, ...]
    tolerances: Tolerances

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def label(self) -> str:
        return "PASS" if self.passed else "FAIL"

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def noisy(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.noisy)

    def check(self, metric: str) -> Check:
        for c in self.checks:
            if c.metric == metric:
                return c
        raise KeyError(metric)

    def tolerance_text(self) -> str:
        t = self.tolerances
        text = f"mean TTFT/TPOT/E2EL and throughput within {t.mean_pct:g}%, p99 TTFT/TPOT/E2EL within {t.p99_pct:g}%"
        if any(c.metric == STEP_METRIC for c in self.checks):  # an external engine's verdict has none
            return f"{text}, per-step median within {t.step_pct:g}%"
        return text

    def summary(self) -> str:
        """One paragraph: the verdict, what failed, and which live runs did not reproduce."""
        text = f"verdict: {self.label} ({self.tolerance_text()})"
        if self.failed:
            text += f"; failed: {', '.join(c.describe() for c in self.failed)}"
        if self.noisy:
            names = ", ".join(f"{c.label} {c.live_spread * 100:.0f}%" for c in self.noisy if c.live_spread is not None)
            text += (f". The live runs themselves were further apart than the tolerance on {names} (live spread): "
                     "the device did not reproduce itself; validate on an idle machine")
        return text

    def to_json(self) -> dict[str, Any]:
        """The keys ``validation.json`` gets: ``verdict``, ``tolerances_pct`` and ``checks``."""
        return {"verdict": self.label, "tolerances_pct": self.tolerances.to_dict(),
                "checks": {c.metric: c.to_dict() for c in self.checks}}


def judge(metrics: Mapping[str, Any], median_step_rel_error: float | None,
          tolerances: Tolerances | None = None) -> Verdict:
    """The verdict of a validation's compared ``metrics`` (``{key: {"rel_error", "live_runs"?}}``,
    as :func:`~experiments.validation.errors.compare_summaries` gives) and its per-step median
    |error| (None: a black box, whose steps are not seen; no step check)."""
    tol = tolerances or Tolerances()
    labels = dict(metric_names())
    checks = []
    for key, group in CHECKED_METRICS:
        m = metrics[key]
        checks.append(Check(key, labels[key].replace(" (ms)", ""), group, m["rel_error"], tol.fraction(group),
                            metric_spread(m)))
    if median_step_rel_error is not None:
        checks.append(Check(STEP_METRIC, STEP_LABEL, "step", float(median_step_rel_error), tol.fraction("step")))
    return Verdict(tuple(checks), tol)


def verdict_of(v: Any, tolerances: Tolerances | None = None) -> Verdict:
    """:func:`judge` of a :class:`~experiments.validation.result.Validation`."""
    return judge(v.metrics, v.steps.summary()[STEP_METRIC], tolerances)


def verdict_at_device_speed(v: Any, tolerances: Tolerances | None = None) -> Verdict | None:
    """:func:`judge` of a validation's comparison at the device's speed around its live runs
    (:class:`~experiments.validation.result.AtDeviceSpeed`); None when it has none."""
    at = v.at_device_speed
    if at is None:
        return None
    return judge(at.metrics, at.steps.summary()[STEP_METRIC] if at.steps.measured_s.size else None, tolerances)
