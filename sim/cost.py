"""The cost model interface: what one engine step costs, in seconds.

Implementations: :class:`sim.roofline.RooflineCost` (from a model and a hardware preset) and
:class:`calibrate.profile.CalibratedCost` (a profile fitted to measured steps).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import numpy as np

from sim.batch import StepShape


class CostModel(Protocol):
    def step_time(self, shape: StepShape) -> float:
        """Seconds the whole engine step takes (scheduling, input preparation, forward pass,
        sampling, and any swap copies it carries). Never negative."""


def decode_run_times(cost: CostModel, shape: StepShape, n: int) -> list[float]:
    """Step times of ``shape`` repeated ``n`` times with every decode one token further.

    A cost model may provide ``decode_run_times(shape, n)`` computing the same values
    element-wise (a list or a numpy array; the simulator's fast path); otherwise each step is
    priced alone."""
    vectorised = getattr(cost, "decode_run_times", None)
    if vectorised is not None:
        times = vectorised(shape, n)
        return times if isinstance(times, list) else np.asarray(times, dtype=np.float64).tolist()
    seqs, context = shape.decode_seqs, shape.decode_context_tokens
    return [cost.step_time(replace(shape, decode_context_tokens=context + j * seqs)) for j in range(n)]


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
