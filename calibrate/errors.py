"""The errors a calibration stops with, each with a message for people."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class CalibrationError(RuntimeError):
    """Calibration could not produce a profile (e.g. stopped before any step was measured)."""


class DriftError(CalibrationError):
    """The machine's speed changed during calibration beyond the threshold, even after one
    re-measurement; ``checkpoints`` holds every :class:`~calibrate.drift.Checkpoint` taken."""

    def __init__(self, message: str, checkpoints: Sequence[Any]) -> None:
        super().__init__(message)
        self.checkpoints = list(checkpoints)
