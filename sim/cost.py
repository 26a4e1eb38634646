"""The cost model interface: what one engine step costs, in seconds.

Implementations: :class:`sim.roofline.RooflineCost` (from a model and a hardware preset) and
:class:`calibrate.profile.CalibratedCost` (a profile fitted to measured steps).
"""

from __future__ import annotations

from typing import Protocol

from sim.batch import StepShape


class CostModel(Protocol):
    def step_time(self, shape: StepShape) -> float:
        """Seconds the whole engine step takes (scheduling, input preparation, forward pass,
        sampling, and any swap copies it carries). Never negative."""


class ConstantCost:
    """Every step costs the same; for tests and for reasoning about step counts."""

    def __init__(self, step_s: float) -> None:
        if step_s <= 0:
            raise ValueError(f"step_s must be > 0, got {step_s}")
        self.step_s = step_s

    def step_time(self, shape: StepShape) -> float:
        return self.step_s
