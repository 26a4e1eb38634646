"""The cost model interface: what one engine step costs, in seconds.

Implementations: :class:`sim.roofline.RooflineCost` (from a model and a hardware preset) and
:class:`calibrate.profile.CalibratedCost` (a profile fitted to measured steps).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from sim.batch import STEP_FIELDS, StepShape, shape_values


class CostModel(Protocol):
    def step_time(self, shape: StepShape) -> float:
        """Seconds the whole engine step takes (scheduling, input preparation, forward pass,
        sampling, and any swap copies it carries). Never negative."""


def request_overhead_s(cost: CostModel) -> float:
    """Seconds a request spends between arriving and reaching the scheduler, the same for every
    request: a served engine's frontend (HTTP, input processing, the hand-off to the engine core),
    as a black-box calibration measures it. A cost model may carry ``request_overhead_s``; an
    engine stepped in process has none (0)."""
    overhead_s = float(getattr(cost, "request_overhead_s", 0.0))
    if not (math.isfinite(overhead_s) and overhead_s >= 0):
        raise ValueError(f"request_overhead_s must be finite and >= 0, got {overhead_s}")
    return overhead_s


def intake_gap_s(cost: CostModel) -> float:
    """The time a served engine's frontend takes to let one request in: it takes requests in one at
    a time, so a burst of ``n`` that arrive together is in ``n - 1`` gaps after its first (see
    :mod:`sim.engine`). The simulator hands such a burst to the scheduler whole once its last
    request is in, except that its first starts an idle engine alone at once. A cost model may
    carry ``intake_gap_s`` (:func:`calibrate.vllm_blackbox.burst_probe` measures it); none: 0
    (requests that arrive together are scheduled together)."""
    gap_s = float(getattr(cost, "intake_gap_s", 0.0))
    if not (math.isfinite(gap_s) and gap_s >= 0):
        raise ValueError(f"intake_gap_s must be finite and >= 0, got {gap_s}")
    return gap_s


def decode_run_times(cost: CostModel, shape: StepShape, n: int) -> list[float]:
    """Step times of ``shape`` repeated ``n`` times with every decode one token further.

    A cost model may provide ``decode_run_times(shape, n)`` computing the same values
    element-wise (a list or a numpy array; the simulator's fast path); otherwise each step is
    priced alone."""
    vectorised = getattr(cost, "decode_run_times", None)
    if vectorised is not None:
        times = vectorised(shape, n)
        return times if isinstance(times, list) else np.asarray(times, dtype=np.float64).tolist()
    return [cost.step_time(decode_run_step(shape, j)) for j in range(n)]


def decode_run_step(shape: StepShape, j: int) -> StepShape:
    """Step ``j`` (from 0) of a decode run from ``shape``: every decode ``j`` tokens further."""
    return replace(shape, decode_context_tokens=shape.decode_context_tokens + j * shape.decode_seqs)


class DecodeRun:
    """``shape`` over a decode run of ``n`` steps, for pricing the run in one evaluation.

    ``decode_context_tokens`` is the array (n,) of each step's context (step ``j`` is
    :func:`decode_run_step` ``(shape, j)``); every other field is ``shape``'s, and a property
    of :class:`StepShape` (``num_tokens``, ``attention_work``) is computed from this run's
    fields, the context array included. So an expression written for a ``StepShape`` evaluates
    here, element-wise, with the same operations on the same values: the same numbers.
    """

    def __init__(self, shape: StepShape, n: int) -> None:
        self.__dict__.update(zip(STEP_FIELDS, shape_values(shape), strict=True))
        self.decode_context_tokens = shape.decode_context_tokens + np.arange(n, dtype=np.int64) * shape.decode_seqs

    def __getattr__(self, name: str) -> Any:  # only for names that are not fields
        derived = getattr(StepShape, name, None)
        if isinstance(derived, property) and derived.fget is not None:
            return derived.fget(self)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


class ConstantCost:
    """Every step costs the same; for tests and for reasoning about step counts."""

    def __init__(self, step_s: float) -> None:
        if step_s <= 0:
            raise ValueError(f"step_s must be > 0, got {step_s}")
        self.step_s = step_s

    def step_time(self, shape: StepShape) -> float:
        return self.step_s

    def decode_run_times(self, shape: StepShape, n: int) -> np.ndarray:
        return np.full(n, self.step_s)


class ScaledCost:
    """``cost`` with every step ``factor`` times as long: a profile priced at the speed a device
    runs at now (``factor`` = step time now / at calibration, from re-timed control steps).

    A served engine's per-request frontend time (:func:`request_overhead_s`) is kept as it is:
    the control steps time the engine's steps, not its frontend; so is its intake
    (:func:`intake_gap_s`)."""

    def __init__(self, cost: CostModel, factor: float) -> None:
        if not (math.isfinite(factor) and factor > 0):
            raise ValueError(f"factor must be finite and > 0, got {factor}")
        self.cost = cost
        self.factor = float(factor)
        self.request_overhead_s = request_overhead_s(cost)
        self.intake_gap_s = intake_gap_s(cost)

    def step_time(self, shape: StepShape) -> float:
        return self.cost.step_time(shape) * self.factor

    def decode_run_times(self, shape: StepShape, n: int) -> np.ndarray:
        return np.asarray(decode_run_times(self.cost, shape, n), dtype=np.float64) * self.factor
