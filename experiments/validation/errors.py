"""The errors of a validation: per metric, ``(sim - live) / live`` of the whole run; per step,
every step the live engine ran (its :class:`~sim.batch.StepShape` from the step log) priced by
the cost model against its measured time, which isolates the cost model from the queueing that
amplifies or hides its error in the run metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.batch import StepShape
from sim.cost import CostModel

PERCENTILES = (90.0, 99.0)


LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))


STATS = ("mean", "median", "p90", "p99")


SCALARS = (("request_throughput", "request throughput (req/s)"),
           ("output_throughput", "output throughput (tok/s)"),
           ("num_preemptions", "preemptions"))



def metric_names() -> list[tuple[str, str]]:
    """(summary key, label) of every compared metric, in table order."""
    out = [(f"{stat}_{key}_ms", f"{stat} {label} (ms)") for key, label in LATENCIES for stat in STATS]
    return out + list(SCALARS)


def rel_error(live: float, sim: float) -> float | None:
    """(sim - live) / live; 0 when both are 0, None when only live is."""
    if live == 0:
        return 0.0 if sim == 0 else None
    return (sim - live) / live


def step_kind(shape: StepShape) -> str:
    """``prefill``, ``decode`` or ``mixed`` (a prefill chunk among decodes)."""
    if shape.prefill_tokens and shape.decode_seqs:
        return "mixed"
    return "prefill" if shape.prefill_tokens else "decode"


BATCH_BANDS = ((1, 1), (2, 3), (4, 15), (16, 63), (64, None))
"""Decode batch sizes (sequences, inclusive; None: no upper end) whose steps are summarised
together: a light-load run is mostly single decodes, while the few large batches carry the time
(and the TPOT) of a loaded one, and a cost model can be right on one and off on the other."""



@dataclass(frozen=True)
class StepErrors:
    """Measured and predicted seconds of every live step, their kinds, decode batch sizes,
    and relative errors."""

    measured_s: np.ndarray
    predicted_s: np.ndarray
    kinds: tuple[str, ...] = ()
    decode_seqs: tuple[int, ...] = ()

    @property
    def rel_errors(self) -> np.ndarray:
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def total_rel_error(self) -> float:
        """(predicted - measured) / measured of the summed step time: the bias the run metrics
        feel, tails included (a median can be right while slow outliers add up)."""
        measured = float(self.measured_s.sum())
        return float(self.predicted_s.sum()) / measured - 1 if measured > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Median and p90 of |relative error|, the median signed error (the bias), and the
        same per kind of step."""
        out: dict[str, Any] = _error_stats(self.rel_errors)
        kinds = np.asarray(self.kinds)
        out["step_errors_by_kind"] = {
            kind: {"steps": int((kinds == kind).sum()), **_error_stats(self.rel_errors[kinds == kind])}
            for kind in ("prefill", "decode", "mixed") if (kinds == kind).any()}
        out["step_errors_by_batch"] = self.by_batch()
        return out

    def by_batch(self) -> dict[str, dict[str, float]]:
        """Per band of :data:`BATCH_BANDS` (steps with decodes, prefill chunks or not): steps,
        share of the measured time, median signed error and the summed time's error."""
        seqs = np.asarray(self.decode_seqs, dtype=np.int64)
        total = float(self.measured_s.sum())
        out: dict[str, dict[str, float]] = {}
        if seqs.size != self.measured_s.size or total <= 0:
            return out
        for lo, hi in BATCH_BANDS:
            sel = (seqs >= lo) & (seqs <= (hi if hi is not None else seqs.max()))
            if not sel.any():
                continue
            name = str(lo) if lo == hi else f"{lo}-{hi}" if hi is not None else f"{lo}+"
            measured = float(self.measured_s[sel].sum())
            out[name] = {"steps": int(sel.sum()), "time_share": measured / total,
                         "median_step_signed_error": float(np.median(self.rel_errors[sel])),
                         "total_rel_error": float(self.predicted_s[sel].sum()) / measured - 1}
        return out


def _error_stats(err: np.ndarray) -> dict[str, float]:
    if err.size == 0:
        return {"median_step_rel_error": 0.0, "p90_step_rel_error": 0.0, "median_step_signed_error": 0.0}
    return {"median_step_rel_error": float(np.median(np.abs(err))),
            "p90_step_rel_error": float(np.percentile(np.abs(err), 90)),
            "median_step_signed_error": float(np.median(err))}


def profile_live_error(samples: Sequence[Any], cost: CostModel) -> dict[str, float] | None:
    """The cost model's error on the profile's own live samples (the steps the live engine ran
    during calibration), in the units of :meth:`StepErrors.summary`; None without live samples.

    It is what a validation's per-step error compares with: no model fits noisy steps exactly,
    and the jitter of short steps is skewed (a few much slower), so even on its own samples
    the prediction is off by a few percent and a little above the median step. A validation
    whose median signed error matches it shows no drift; the difference is the device's."""
    live = [s for s in samples if getattr(s, "origin", None) == "live"]
    if not live:
        return None
    measured = np.array([s.step_ms / 1000 for s in live])
    predicted = np.array([cost.step_time(s.shape) for s in live])
    return {"steps": len(live), **_error_stats((predicted - measured) / measured)}


def step_errors(step_log: Sequence[tuple[StepShape, float]], cost: CostModel) -> StepErrors:
    """Price every logged live step ``(shape, measured_s)`` with ``cost``."""
    measured = np.array([s for _, s in step_log], dtype=np.float64)
    predicted = np.array([cost.step_time(shape) for shape, _ in step_log], dtype=np.float64)
    return StepErrors(measured, predicted, tuple(step_kind(shape) for shape, _ in step_log),
                      tuple(shape.decode_seqs for shape, _ in step_log))


def compare_summaries(live: dict[str, Any], sim: dict[str, Any],
                      live_runs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``{metric: {"live", "sim", "rel_error"}}`` for every metric of :func:`metric_names`; with
    several live runs (``live`` their mean), each entry also lists them under ``live_runs``."""
    out: dict[str, Any] = {}
    for key, _ in metric_names():
        out[key] = {"live": float(live[key]), "sim": float(sim[key]), "rel_error": rel_error(live[key], sim[key])}
        if len(live_runs) > 1:
            out[key]["live_runs"] = [float(run[key]) for run in live_runs]
    return out


def mean_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several runs' summaries, key by key (numbers only; other values from the first)."""
    out = dict(summaries[0])
    for key in list(out):
        values = [s.get(key) for s in summaries]
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
            out[key] = float(np.mean(values))  # type: ignore[arg-type]
    return out


def metric_spread(metric: dict[str, Any]) -> float | None:
    """(max - min) / mean of one compared metric over the live runs (its ``live_runs``): how far
    the live engine is from reproducing itself; None with a single run."""
    runs = metric.get("live_runs")
    if not runs or len(runs) < 2:
        return None
    mean = float(np.mean(runs))
    return (max(runs) - min(runs)) / mean if mean else 0.0
