"""One validation: the same requests served live and simulated, and the comparison of the two
(:class:`Validation`, written as ``validation.json``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from experiments.validation.errors import (
    PERCENTILES,
    StepErrors,
    compare_summaries,
    mean_summary,
    profile_live_error,
    step_errors,
)
from experiments.validation.runs import live_run, sim_pool, simulate_run
from sim.cost import CostModel
from sim.engine import SimResult
from sim.metrics import summarize
from sim.request import Request

if TYPE_CHECKING:
    from runtime.config import LiveConfig
    from runtime.engine import LiveResult


@dataclass(frozen=True)
class Validation:
    """Both executors' runs, their summaries, and the errors."""

    live: LiveResult
    """The live engine's result (the first run's when it was repeated)."""
    sim: SimResult
    live_summary: dict[str, Any]
    """The live summary (the mean over the runs when repeated)."""
    sim_summary: dict[str, Any]
    metrics: dict[str, Any]
    steps: StepErrors
    speed_before: float | None = None
    speed_after: float | None = None
    profile_live: dict[str, float] | None = None
    """:func:`profile_live_error`: the same model on the profile's own live steps."""
    live_runs: tuple[LiveResult, ...] = ()
    """Every live run's result (``live`` is the first)."""

    def to_json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``validation.json``: each metric's live, sim and rel_error, then the step errors."""
        out: dict[str, Any] = dict(self.metrics)
        if self.steps.measured_s.size:  # none seen from an external engine: no errors to claim
            out.update(self.steps.summary())
            out["total_step_time_rel_error"] = self.steps.total_rel_error
        out["num_steps"] = int(self.steps.measured_s.size)
        out["completed"] = {"live": self.live_summary["completed"], "sim": self.sim_summary["completed"]}
        out["device_speed_vs_profile"] = {"before": self.speed_before, "after": self.speed_after}
        out["profile_live_step_error"] = self.profile_live
        out["live_runs"] = max(1, len(self.live_runs))
        return out | (extra or {})

    @property
    def drift(self) -> float:
        """The live steps' median signed error beyond the profile's own on its live samples
        (the device running slower, negative, or faster than when it was calibrated)."""
        own = self.profile_live["median_step_signed_error"] if self.profile_live else 0.0
        return self.steps.summary()["median_step_signed_error"] - own


def validate(requests: Sequence[Request], live: LiveConfig, cost: CostModel, progress: bool = True,
             profile_samples: Sequence[Any] = (), repeats: int = 1) -> Validation:
    """Run ``requests`` on the live engine of ``live`` ``repeats`` times and in the simulator
    once, with the same scheduler and exactly the same KV pool (each on fresh copies), and
    compare the simulation with the live runs' mean (a live engine on a shared or throttled
    device does not reproduce itself; the simulator is deterministic); the per-step error pools
    every live step. With the profile's samples, also check the device's speed against them
    before the first run and after the last."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sim_pool(live)  # the pool must be given in full, before anything runs
    runs = [live_run([dataclasses.replace(r) for r in requests], live, progress,
                     profile_samples if k in (0, repeats - 1) else ()) for k in range(repeats)]
    results = tuple(run.result for run in runs)
    sim = simulate_run([dataclasses.replace(r) for r in requests], live, cost)
    summaries = [summarize(r.requests, r.itl(), PERCENTILES, None, r.num_preemptions) for r in results]
    live_summary = mean_summary(summaries)
    sim_summary = summarize(sim.requests, sim.itl(), PERCENTILES, None, sim.num_preemptions)
    steps = step_errors([step for r in results for step in r.step_log], cost)
    metrics = compare_summaries(live_summary, sim_summary, summaries)
    return Validation(results[0], sim, live_summary, sim_summary, metrics, steps, runs[0].speed_before,
                      runs[-1].speed_after, profile_live_error(profile_samples, cost), results)
