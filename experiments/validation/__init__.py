"""Sim-vs-live validation: the same requests, policy, seed and KV pool served twice, once by
the live engine (:mod:`runtime`) and once by the simulator priced with a calibrated profile,
then compared metric by metric and step by step.

Two errors are reported:

- per metric (TTFT, TPOT, ITL, E2EL: mean, median, p90, p99; throughputs; preemptions): the
  relative error ``(sim - live) / live`` of the whole run;
- per step: every step the live engine ran (its :class:`~sim.batch.StepShape` from the step
  log) priced by the profile, against the measured time. This isolates the cost model from
  the queueing that amplifies or hides its error in the run metrics.

Both executors are configured by one :class:`~runtime.config.LiveConfig`: the simulator's
scheduler sees exactly the live engine's scheduler settings and the blocks its pool has.
Before and after the live run a few of the profile's own grid steps are timed again
(:func:`~experiments.validation.runs.speed_check`): near saturation queueing
amplifies a cost error several times, so a device running slower than when it was calibrated
(another process, a throttled CPU) must be told apart from an error of the simulator.

One module per job: :mod:`~experiments.validation.plan` (the resolved validation, before
anything runs), :mod:`~experiments.validation.runs` (the two executors and the speed check),
:mod:`~experiments.validation.errors` (metric and step errors), :mod:`~experiments.validation.result`
(one validation), :mod:`~experiments.validation.verdict` (PASS or FAIL against stated tolerances),
:mod:`~experiments.validation.report` (the table and the drift warning) and
:mod:`~experiments.validation.output` (its files).
"""

from __future__ import annotations

from experiments.validation.errors import (
    PERCENTILES,
    StepErrors,
    metric_names,
    metric_spread,
    profile_live_error,
    rel_error,
    step_errors,
)
from experiments.validation.plan import Plan, make_plan, shipped_profile
from experiments.validation.report import drift_warning, format_speed, format_speeds, format_table, live_spread
from experiments.validation.result import Validation, validate
from experiments.validation.verdict import Check, Tolerances, Verdict, judge, verdict_of

__all__ = [
    "PERCENTILES",
    "Check",
    "Plan",
    "StepErrors",
    "Tolerances",
    "Validation",
    "Verdict",
    "drift_warning",
    "format_speed",
    "format_speeds",
    "format_table",
    "judge",
    "live_spread",
    "make_plan",
    "metric_names",
    "metric_spread",
    "profile_live_error",
    "rel_error",
    "shipped_profile",
    "step_errors",
    "validate",
    "verdict_of",
]
