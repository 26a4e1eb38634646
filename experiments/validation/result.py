"""One validation: the same requests served live and simulated, and the comparison of the two
(:class:`Validation`, written as ``validation.json``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from experiments.validation.errors import (
    PERCENTILES,
    StepErrors,
    compare_summaries,
    mean_summary,
    profile_live_error,
    step_errors,
)
from experiments.validation.runs import LiveRun, SpeedReference, live_run, sim_pool, simulate_run
from sim.cost import CostModel, ScaledCost
from sim.engine import SimResult
from sim.metrics import summarize
from sim.request import Request

if TYPE_CHECKING:
    from runtime.config import LiveConfig
    from runtime.engine import LiveResult


@dataclass(frozen=True)
class AtDeviceSpeed:
    """The same requests simulated once more with the profile priced at the device's speed
    around the live runs (:class:`~sim.cost.ScaledCost` by ``factor``, the median of the speed
    checks: the calibration's control steps timed again, never the workload's), compared with the same
    live runs. It separates the cost model's error from the device's drift since calibration:
    the plain comparison is what a user gets from a profile made earlier; this one is what the
    model gives at the speed the device ran at."""

    factor: float
    """Step time now / at calibration (1.05: the device ran 5% slower)."""
    speed_checks: tuple[float, ...]
    sim_summary: dict[str, Any]
    metrics: dict[str, Any]
    steps: StepErrors

    def to_json(self) -> dict[str, Any]:
        steps = self.steps.summary() if self.steps.measured_s.size else {}  # a black box's: none seen
        return {"factor": self.factor, "speed_checks": list(self.speed_checks), **self.metrics, **steps}


@dataclass(frozen=True)
class StreamStepErrors:
    """A server's steps as its streams show them (:mod:`calibrate.stream_steps`), priced by the
    profile: a black box's per-step error, which the verdict leaves out (the steps are the ones
    seen whole, timed by the client)."""

    steps: StepErrors
    paces: tuple[float, ...]
    """Each live run's clean steps' summed time over the profile's price of them."""
    left_out: dict[str, int]
    """Bursts that were not priced, by reason, over every live run."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"steps": int(self.steps.measured_s.size), "left_out": self.left_out,
                               "run_paces": list(self.paces)}
        if self.steps.measured_s.size:
            out |= self.steps.summary() | {"total_step_time_rel_error": self.steps.total_rel_error}
        return out


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
    paces: tuple[float, ...] = ()
    """Each kept live run's :func:`run_pace`."""
    replaced: tuple[dict[str, Any], ...] = ()
    """Live runs served again because their pace left the others' (:func:`off_pace`): which run,
    its pace, and the median pace it was compared with."""
    at_device_speed: AtDeviceSpeed | None = None
    """The comparison again at the device's speed around the live runs; None without speed checks."""
    speed_source: str | None = None
    """What the speed checks timed (:attr:`~experiments.validation.runs.SpeedReference.source`)."""
    stream_steps: StreamStepErrors | None = None
    """A server's steps read from its streams; None for servesim's own engine (its steps are logged)."""

    def to_json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``validation.json``: each metric's live, sim and rel_error, then the step errors."""
        out: dict[str, Any] = dict(self.metrics)
        if self.steps.measured_s.size:  # none seen from an external engine: no errors to claim
            out.update(self.steps.summary())
            out["total_step_time_rel_error"] = self.steps.total_rel_error
        out["num_steps"] = int(self.steps.measured_s.size)
        out["completed"] = {"live": self.live_summary["completed"], "sim": self.sim_summary["completed"]}
        out["device_speed_vs_profile"] = {"before": self.speed_before, "after": self.speed_after}
        out["device_speed_source"] = self.speed_source
        out["profile_live_step_error"] = self.profile_live
        out["live_runs"] = max(1, len(self.live_runs))
        out["live_run_paces"] = list(self.paces)
        out["replaced_live_runs"] = list(self.replaced)
        out["at_device_speed"] = self.at_device_speed.to_json() if self.at_device_speed else None
        if self.stream_steps is not None:
            out["stream_steps"] = self.stream_steps.to_json()
        return out | (extra or {})

    @property
    def drift(self) -> float:
        """The live steps' median signed error beyond the profile's own on its live samples
        (the device running slower, negative, or faster than when it was calibrated)."""
        own = self.profile_live["median_step_signed_error"] if self.profile_live else 0.0
        return self.steps.summary()["median_step_signed_error"] - own


RUN_PACE_TOLERANCE = 0.08
"""A live run whose steps ran this much faster or slower than the median run's, priced by the
same profile, ran on a device that changed under it. Three runs of the small model's demo slice
(2026-12-02, 2-core VM) took their steps at -5.2%, -15.5% and -2.0% of the profile's price: the
two alike agree on mean TPOT to 0.1 ms, the third was 33% slower on it."""


def run_pace(result: LiveResult, cost: CostModel) -> float:
    """The run's summed step time over the profile's price of the same steps (1.1: the device
    took 10% longer than the profile says); nan without steps."""
    measured = sum(s for _, s in result.step_log)
    predicted = sum(cost.step_time(shape) for shape, _ in result.step_log)
    return measured / predicted if predicted > 0 else float("nan")


def off_pace(paces: Sequence[float], tolerance: float = RUN_PACE_TOLERANCE) -> list[int]:
    """The runs whose pace is beyond ``tolerance`` of the median run's; none with fewer than 3
    runs (two cannot say which one moved) or without paces."""
    if len(paces) < 3 or any(p != p for p in paces):
        return []
    median = float(np.median(paces))
    return [k for k, p in enumerate(paces) if abs(p / median - 1) > tolerance]


def validate(requests: Sequence[Request], live: LiveConfig, cost: CostModel, progress: bool = True,
             profile_samples: Sequence[Any] = (), repeats: int = 1,
             speed: SpeedReference | None = None) -> Validation:
    """Run ``requests`` on the live engine of ``live`` ``repeats`` times and in the simulator
    once, with the same scheduler and exactly the same KV pool (each on fresh copies), and
    compare the simulation with the live runs' mean (a live engine on a shared or throttled
    device does not reproduce itself; the simulator is deterministic); the per-step error pools
    every live step. With a ``speed`` reference, also check the device's speed
    (:func:`~experiments.validation.runs.speed_check`) before and after the first run and the
    last, and simulate once more at that speed (:class:`AtDeviceSpeed`). ``profile_samples``
    give the profile's own error on its calibration live steps.

    A run whose pace left the others' (:func:`off_pace`, three runs or more) is served once more
    and replaced, whatever the second pace: the record keeps which run it was and both paces."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sim_pool(live)  # the pool must be given in full, before anything runs

    def serve(k: int) -> LiveRun:
        return live_run([dataclasses.replace(r) for r in requests], live, progress,
                        speed if k in (0, repeats - 1) else None)

    runs = [serve(k) for k in range(repeats)]
    paces = [run_pace(run.result, cost) for run in runs]
    replaced = []
    median = float(np.median(paces))
    for k in off_pace(paces):
        replaced.append({"run": k + 1, "pace": paces[k], "median_pace": median})
        runs[k] = serve(k)
        paces[k] = run_pace(runs[k].result, cost)
        replaced[-1]["pace_again"] = paces[k]
    results = tuple(run.result for run in runs)
    sim = simulate_run([dataclasses.replace(r) for r in requests], live, cost)
    summaries = [summarize(r.requests, r.itl(), PERCENTILES, None, r.num_preemptions) for r in results]
    live_summary = mean_summary(summaries)
    sim_summary = summarize(sim.requests, sim.itl(), PERCENTILES, None, sim.num_preemptions)
    steps = step_errors([step for r in results for step in r.step_log], cost)
    metrics = compare_summaries(live_summary, sim_summary, summaries)
    speeds = tuple(x for run in runs for x in (run.speed_before, run.speed_after) if x is not None)
    return Validation(results[0], sim, live_summary, sim_summary, metrics, steps, runs[0].speed_before,
                      runs[-1].speed_after, profile_live_error(profile_samples, cost), results, tuple(paces),
                      tuple(replaced), at_device_speed(requests, live, cost, speeds, results, summaries),
                      speed.source if speed is not None else None)


def at_device_speed(requests: Sequence[Request], live: LiveConfig, cost: CostModel, speeds: Sequence[float],
                    results: Sequence[LiveResult], summaries: Sequence[dict[str, Any]]) -> AtDeviceSpeed | None:
    """:class:`AtDeviceSpeed` from the speed checks around the live runs; None without any."""
    if not speeds:
        return None
    factor = float(np.median(speeds))
    scaled = ScaledCost(cost, factor)
    sim = simulate_run([dataclasses.replace(r) for r in requests], live, scaled)
    sim_summary = summarize(sim.requests, sim.itl(), PERCENTILES, None, sim.num_preemptions)
    metrics = compare_summaries(mean_summary(summaries), sim_summary, summaries)
    steps = step_errors([step for r in results for step in r.step_log], scaled)
    return AtDeviceSpeed(factor, tuple(speeds), sim_summary, metrics, steps)
