"""A validation printed for people: the metrics table with the step errors, and the warning
when the device did not run at its calibrated speed."""

from __future__ import annotations

import math

from experiments.validation.errors import metric_names, metric_spread
from experiments.validation.result import Validation
from experiments.validation.verdict import CHECKED_METRICS, Verdict, verdict_at_device_speed

DRIFT_WARN = 0.10
"""A device speed change (re-timed profile steps, or the live steps' median signed error)
beyond this is reported with the results."""


def format_spread(spread: float | None) -> str:
    return "-" if spread is None else f"{spread * 100:.1f}%"


def live_spread(v: Validation, key: str) -> float | None:
    """(max - min) / mean of a metric over the live runs: how far the live engine is from
    reproducing itself; None with a single run."""
    return metric_spread(v.metrics[key])


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if pct:
        return f"{value * 100:+.1f}%"
    return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.4g}"


def check_cell(verdict: Verdict | None, key: str) -> str:
    """``ok <=10%`` / ``FAIL >10%`` for a checked metric, ``""`` for one the verdict ignores."""
    if verdict is None:
        return ""
    try:
        c = verdict.check(key)
    except KeyError:
        return ""
    return f"{'ok <=' if c.passed else 'FAIL >'}{c.tolerance * 100:g}%"


def replaced_lines(v: Validation) -> list[str]:
    """A sentence per live run served again because its pace left the others'."""
    from experiments.validation.result import RUN_PACE_TOLERANCE

    return [f"live run {r['run']} was served again: its steps took {(r['pace'] / r['median_pace'] - 1) * 100:+.0f}% "
            f"against the median run's (beyond {RUN_PACE_TOLERANCE * 100:g}%: the device changed under it); "
            f"served again, {(r['pace_again'] / r['median_pace'] - 1) * 100:+.0f}%, and that run is the one kept"
            for r in v.replaced]


def format_table(v: Validation, verdict: Verdict | None = None) -> str:
    """The metrics table (live, sim, relative error; with repeated live runs ``live`` is their
    mean and ``live spread`` their (max - min) / mean; with a verdict, each checked metric's
    pass or fail against its tolerance), the step error lines, and the verdict last."""
    label_w = max(len(label) for _, label in metric_names())
    repeated = len(v.live_runs) > 1
    head = f"{'metric':<{label_w}}  {'live':>10}  {'sim':>10}  {'error':>8}"
    rule = f"{'-' * label_w}  {'-' * 10}  {'-' * 10}  {'-' * 8}"
    if repeated:
        head, rule = head + f"  {'live spread':>11}", rule + f"  {'-' * 11}"
    if verdict is not None:
        head, rule = head + f"  {'check':<10}", rule + f"  {'-' * 10}"
    lines = [head.rstrip(), rule]
    for key, label in metric_names():
        m = v.metrics[key]
        row = f"{label:<{label_w}}  {_fmt(m['live']):>10}  {_fmt(m['sim']):>10}  {_fmt(m['rel_error'], pct=True):>8}"
        if repeated:
            row += f"  {format_spread(live_spread(v, key)):>11}"
        if verdict is not None:
            row += f"  {check_cell(verdict, key)}"
        lines.append(row.rstrip())
    if repeated:
        lines.append(f"live: the mean of {len(v.live_runs)} runs of the same requests; live spread: how far apart "
                     "they were ((max - min) / mean)")
    lines += [f"  {line}" for line in replaced_lines(v)]
    if not v.steps.measured_s.size:
        lines += stream_step_lines(v)
        if v.speed_before is not None or v.speed_after is not None:
            lines.append(f"server speed ({v.speed_source} sent again): {format_speeds(v.speed_before, v.speed_after)}")
        lines += at_device_speed_lines(v, verdict)
        if verdict is not None:
            lines.append(verdict.summary())
        return "\n".join(lines)
    s = v.steps.summary()
    lines.append(f"per-step error over {v.steps.measured_s.size} live steps: median |err| "
                 f"{s['median_step_rel_error'] * 100:.1f}%, p90 |err| {s['p90_step_rel_error'] * 100:.1f}%, "
                 f"median signed {s['median_step_signed_error'] * 100:+.1f}%; summed step time "
                 f"{v.steps.total_rel_error * 100:+.1f}%")
    lines += breakdown_lines(s)
    if v.profile_live is not None:
        own = v.profile_live
        lines.append(f"  the profile on its own {own['steps']} calibration live steps: median |err| "
                     f"{own['median_step_rel_error'] * 100:.1f}%, median signed "
                     f"{own['median_step_signed_error'] * 100:+.1f}% (no model fits noisy steps "
                     "exactly; beyond this, the run's error is the device's drift)")
    if v.speed_before is not None or v.speed_after is not None:
        lines.append(f"device speed ({v.speed_source or 'profile steps'} timed again): "
                     f"{format_speeds(v.speed_before, v.speed_after)}")
    warning = drift_warning(v)
    if warning:
        lines.append(f"warning: {warning}")
    lines += at_device_speed_lines(v, verdict)
    if verdict is not None:
        step = verdict.check("median_step_rel_error")
        lines.append(f"per-step check: {step.describe()}")
        lines.append(verdict.summary())
    return "\n".join(lines)


def stream_step_lines(v: Validation) -> list[str]:
    """A black box's step error: the steps its streams show whole, priced; not in the verdict."""
    stream = v.stream_steps
    if stream is None or not stream.steps.measured_s.size:
        return ["per-step error: not available from a black box (no step of its streams was seen whole); "
                "the step-median check is left out of the verdict"]
    s = stream.steps.summary()
    left = sum(stream.left_out.values())
    paces = ", ".join(f"x{p:.2f}" for p in stream.paces)
    lines = [f"per-step error over {stream.steps.measured_s.size} steps read from the streams "
             f"({left} more left out: not seen whole): median |err| {s['median_step_rel_error'] * 100:.1f}%, "
             f"p90 |err| {s['p90_step_rel_error'] * 100:.1f}%, median signed "
             f"{s['median_step_signed_error'] * 100:+.1f}%; summed step time "
             f"{stream.steps.total_rel_error * 100:+.1f}%; each run's steps took {paces} of their price "
             "(client-timed; the step-median check is left out of the verdict)"]
    return lines + breakdown_lines(s)


def breakdown_lines(summary: dict) -> list[str]:
    """The step errors per kind of step and per decode batch band (:meth:`StepErrors.summary`)."""
    kinds = ", ".join(f"{kind} {k['median_step_signed_error'] * 100:+.1f}% (n={k['steps']})"
                      for kind, k in summary["step_errors_by_kind"].items())
    lines = [f"  median signed per kind: {kinds}"]
    bands = ", ".join(f"{name} {b['total_rel_error'] * 100:+.1f}% ({b['time_share'] * 100:.0f}% of time)"
                      for name, b in summary["step_errors_by_batch"].items())
    if bands:
        lines.append(f"  summed step time by decode batch size: {bands}")
    return lines


def at_device_speed_lines(v: Validation, verdict: Verdict | None) -> list[str]:
    """The checked errors again with the profile priced at the device's speed around the live
    runs, and their verdict: how much of the error is the model's and how much the device's drift."""
    at = v.at_device_speed
    if at is None:
        return []
    labels = dict(metric_names())
    errors = ", ".join(f"{labels[key].replace(' (ms)', '')} {_fmt(at.metrics[key]['rel_error'], pct=True)}"
                       for key, _ in CHECKED_METRICS)
    step = (f", per-step median {at.steps.summary()['median_step_rel_error'] * 100:.1f}%"
            if at.steps.measured_s.size else "")
    lines = [f"at the device's speed around the live runs (every step priced x{at.factor:.3f}, the median of "
             f"{len(at.speed_checks)} speed checks of {v.speed_source or 'profile steps'}; the workload's steps "
             f"are not used): {errors}{step}"]
    at_verdict = verdict_at_device_speed(v, verdict.tolerances) if verdict is not None else None
    if at_verdict is not None:
        failed = "; failed: " + ", ".join(c.describe() for c in at_verdict.failed) if at_verdict.failed else ""
        lines.append(f"  verdict at that speed: {at_verdict.label}{failed} (the verdict below is the profile's "
                     "as calibrated)")
    return lines


def format_speed(ratio: float | None) -> str:
    """A device's speed from ``ratio`` = step time now / step time at calibration: 1.1 is
    "10% slower", 0.5 "100% faster" (twice the speed), 1.0 "as fast"."""
    if ratio is None:
        return "-"
    if round(abs(ratio - 1) * 100) == 0:
        return "as fast"
    return f"{(ratio - 1) * 100:.0f}% slower" if ratio > 1 else f"{(1 / ratio - 1) * 100:.0f}% faster"


def format_speeds(before: float | None, after: float | None) -> str:
    """The re-timed profile steps before and after the live run, said once when they agree."""
    a, b = format_speed(before), format_speed(after)
    if a == b:
        return f"{a} {'as' if a == 'as fast' else 'than'} at calibration, before and after the live run"
    return f"{a} before the live run and {b} after, against calibration"


def format_bias(signed_error: float) -> str:
    """A median signed step error (predicted / measured - 1) in words."""
    if signed_error >= 0:
        return f"the profile predicts {signed_error * 100:.0f}% more time than the live steps took"
    return f"the profile predicts {-signed_error * 100:.0f}% less time than the live steps took"


def drift_warning(v: Validation) -> str | None:
    """A warning when the device ran at another speed than when it was calibrated: the
    profile's steps re-timed, or the live steps uniformly off. The run metrics then measure
    that change, not the simulator (at 70% load a 5% slower device adds ~15% to latency)."""
    speeds = [x - 1 for x in (v.speed_before, v.speed_after) if x is not None]
    bias = v.drift
    if max([abs(x) for x in speeds] + [0.0]) <= DRIFT_WARN and abs(bias) <= DRIFT_WARN:
        return None
    timed = ""
    if speeds:
        timed = f"re-timed profile steps ran {format_speeds(v.speed_before, v.speed_after)}; "
    return (f"the device did not run at its calibrated speed ({timed}at the median {format_bias(bias)}, beyond "
            "the profile's own offset on its calibration live steps). Other processes or a throttled CPU? "
            "Recalibrate just before validating, on an otherwise idle machine.")
