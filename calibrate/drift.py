"""Control steps: a few fixed grid points re-timed at checkpoints of a calibration, so that a
machine that changed under it (another process took the cores, a clock throttled, a noisy
neighbour came and went) is caught instead of fitted.

A calibration is cut into segments (the grid's first and second half, the live phase's first
and second half of runs). The control steps are timed before the first segment (the
reference) and after each one; a checkpoint's drift is the mean over control steps of
(time now / reference time) - 1. A segment whose end checkpoint drifted beyond the threshold
is measured again once, bracketed by fresh checkpoints; if either of those is still beyond
the threshold, the calibration stops with :class:`DriftError`, whose message names every
checkpoint's drift. The logic takes the timer as a function, so it is tested with scripted
timings; :func:`calibrate.measure.time_controls` is the real one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from calibrate.errors import DriftError
from calibrate.grid import GridPoint

DRIFT_THRESHOLD = 0.30
"""Largest accepted |drift| of a checkpoint. Back-to-back checkpoints of the tiny model's
control steps (one thread, each step the median of >= 5 runs and >= 200 ms;
``experiments/calibration_drift.py --parts noise``) drifted by a median of 2.9% (single ones
18%) on this project's 2-core CPU while other jobs kept its load near 4; but a quick tiny
calibration on the same machine with nothing else running saw its mid-grid checkpoint 20-27%
off the start in four of four attempts (the step times of a model this small move with the
process's own state, not only with the machine), so 10% stopped good calibrations. A busy loop
on every core slows the one-thread engine by 100-250% (``--parts hog``, and the slow test in
``tests/test_calibrate_drift.py``): 30% sits above what an idle machine does to tiny and well
below what a second workload does."""
CONTROL_KINDS = ("prefill", "decode", "mixed")
CONTROL_QUANTILE = 0.25
"""Control steps sit a quarter of the way up their kind's sizes: cheap to re-time many times,
yet large enough that the model's work, not the interpreter, sets their time."""

T = TypeVar("T")


def control_points(grid: Sequence[GridPoint]) -> list[GridPoint]:
    """One point per kind present in ``grid``: the one at :data:`CONTROL_QUANTILE` of the
    kind's points ordered by size (tokens computed, then decode context)."""
    out = []
    for kind in CONTROL_KINDS:
        points = sorted((p for p in grid if p.kind == kind),
                        key=lambda p: (sum(c for c, _ in p.prefill) + len(p.decode), sum(p.decode),
                                       p.prefill, p.decode))
        if points:
            out.append(points[int(CONTROL_QUANTILE * (len(points) - 1))])
    return out


def describe(point: GridPoint) -> str:
    """``prefill 64+0``, ``decode 16x(32..256)``, ``mixed ...``: a control step for people."""
    parts = []
    if point.prefill:
        parts.append("prefill " + ", ".join(f"{c}+{ctx}" for c, ctx in point.prefill))
    if point.decode:
        lo, hi = min(point.decode), max(point.decode)
        parts.append(f"decode {len(point.decode)}x" + (f"{lo}" if lo == hi else f"({lo}..{hi})"))
    return " + ".join(parts)


@dataclass(frozen=True)
class Checkpoint:
    """The control steps' times at one moment of the calibration."""

    name: str
    control_ms: tuple[float, ...]
    """Each control step's median time, in :func:`control_points` order."""
    drift: float
    """Mean over control steps of control_ms / the reference's - 1 (0 for the reference)."""

    def to_dict(self) -> dict:
        return {"name": self.name, "control_ms": list(self.control_ms), "drift_pct": 100 * self.drift}


@dataclass
class DriftMonitor:
    """Checkpoints of one calibration. ``measure`` times the control steps (ms each)."""

    measure: Callable[[], Sequence[float]]
    controls: Sequence[str] = ()
    """What each control step is (:func:`describe`), for the record and the messages."""
    threshold: float = DRIFT_THRESHOLD
    points: Sequence[GridPoint] = ()
    """The control steps themselves, recorded so that a validation can time them again."""
    checkpoints: list[Checkpoint] = field(default_factory=list)
    remeasured: list[str] = field(default_factory=list)
    """Segments measured a second time because of drift (and kept from that second time)."""

    def __post_init__(self) -> None:
        if not 0 < self.threshold < 1:
            raise ValueError(f"drift threshold must be in (0, 1), got {self.threshold}")

    def warm_up(self) -> None:
        """Time the control steps once and forget it, before the reference: the first timing
        after the model is built is the slowest of a calibration (the small model's control
        steps took 180, 130 and 234 ms then, and 125-167, 80-100 and 159-212 ms for the rest
        of it, 2026-12-02), and a reference taken then made a quiet machine look 34% faster at
        the middle checkpoint, so half the grid was measured again."""
        self.measure()

    def check(self, name: str) -> Checkpoint:
        """Time the control steps now; the first checkpoint is the reference."""
        ms = tuple(float(x) for x in self.measure())
        if not ms or any(not x > 0 for x in ms):
            raise ValueError(f"control steps must take > 0 ms, got {ms}")
        if self.checkpoints:
            ref = self.checkpoints[0].control_ms
            if len(ref) != len(ms):
                raise ValueError(f"checkpoint {name!r}: {len(ms)} control times, the reference has {len(ref)}")
            drift = sum(x / r for x, r in zip(ms, ref, strict=True)) / len(ms) - 1
        else:
            drift = 0.0
        point = Checkpoint(name, ms, drift)
        self.checkpoints.append(point)
        return point

    def steady(self, point: Checkpoint) -> bool:
        return abs(point.drift) <= self.threshold

    def segment(self, name: str, end: str, run: Callable[[], T]) -> T:
        """Run segment ``name`` (the last checkpoint is its start), then checkpoint ``end``.
        Beyond the threshold: run it again between a fresh start and end checkpoint and keep
        that result; if either is beyond it too, raise :class:`DriftError`."""
        if not self.checkpoints:
            raise RuntimeError("take the reference checkpoint (check) before the first segment")
        result = run()
        if self.steady(self.check(end)):
            return result
        start = self.check(f"{end}, before measuring again")
        result = run()
        after = self.check(f"{end}, measured again")
        if self.steady(start) and self.steady(after):
            self.remeasured.append(name)
            return result
        raise DriftError(self.message(name), self.checkpoints)

    def message(self, name: str) -> str:
        lines = [f"the machine's speed drifted during calibration ({name}), beyond the {100 * self.threshold:.0f}% "
                 f"threshold even after re-measuring it once; no profile written. Control steps "
                 f"({'; '.join(self.controls) or 'fixed grid points'}), time relative to the start:"]
        lines += [f"  {p.name:<36} {100 * p.drift:+7.1f}%  ({', '.join(f'{x:.3g}' for x in p.control_ms)} ms)"
                  for p in self.checkpoints]
        lines.append("Another process probably took the CPU (or the device throttled): calibrate on an idle "
                     "machine, or raise --drift-threshold.")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"threshold_pct": 100 * self.threshold, "control_steps": list(self.controls),
                "checkpoints": [p.to_dict() for p in self.checkpoints],
                "max_drift_pct": 100 * max((abs(p.drift) for p in self.checkpoints), default=0.0),
                "remeasured": list(self.remeasured)} | (
                    {"control_points": [p.to_dict() for p in self.points]} if self.points else {})


def format_drift(record: dict) -> str:
    """A profile's ``drift`` record (:meth:`DriftMonitor.to_dict`): a headline, then one line
    per checkpoint."""
    again = f"; measured again: {', '.join(record['remeasured'])}" if record["remeasured"] else ""
    lines = [f"control steps ({'; '.join(record['control_steps'])}): largest drift {record['max_drift_pct']:.1f}% "
             f"(threshold {record['threshold_pct']:g}%){again}"]
    lines += [f"  {c['name']:<36} {c['drift_pct']:+6.1f}%" for c in record["checkpoints"]]
    return "\n".join(lines)
