"""The demo's ``report.md``: the calibration's held-out error, the validation's table with its
verdict, the policy comparison, the plots, and the commands that reproduce each phase."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from experiments.comparison import Comparison
    from experiments.validation import Plan, Validation, Verdict

TRACE = "azure-conv"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
             + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def validation_markdown(v: Validation, verdict: Verdict | None = None) -> str:
    """The metrics table: live, simulated, error, the live runs' spread when repeated, and each
    checked metric's pass or fail when a verdict is given."""
    from experiments.validation import live_spread, metric_names
    from experiments.validation.report import check_cell, format_spread

    repeated = len(v.live_runs) > 1
    rows = []
    for key, label in metric_names():
        m = v.metrics[key]
        rows.append([label, f"{m['live']:.2f}", f"{m['sim']:.2f}", _pct(m["rel_error"])]
                    + ([format_spread(live_spread(v, key))] if repeated else [])
                    + ([check_cell(verdict, key) or "-"] if verdict is not None else []))
    head = ["metric", f"live (mean of {len(v.live_runs)} runs)" if repeated else "live", "simulated",
            "error (sim - live) / live"] + (["live spread (max - min) / mean"] if repeated else []) \
        + (["check"] if verdict is not None else [])
    return _md_table(head, rows)


def verdict_markdown(verdict: Verdict) -> str:
    """The verdict as the report's last section: PASS or FAIL, the tolerances, what failed, and
    where the live engine did not reproduce itself."""
    lines = [f"**{verdict.label}**: {verdict.tolerance_text()}."]
    if verdict.failed:
        lines += ["", "Failed: " + "; ".join(c.describe() for c in verdict.failed) + "."]
    if verdict.noisy:
        lines += ["", "The live runs were further apart than the tolerance on "
                  + ", ".join(f"{c.label} ({c.live_spread * 100:.0f}%)" for c in verdict.noisy
                              if c.live_spread is not None)
                  + ": the device did not reproduce itself there, so that part of the error is the machine's, not "
                    "only the simulator's. Run the demo on an otherwise idle machine."]
    return "\n".join(lines)


def comparison_markdown(cmp: Comparison) -> tuple[str, str, dict[str, float | None]]:
    """(throughput by rate, latency at the highest rate, ratio to static at the highest rate)."""
    from experiments.comparison import ratio_to_static

    assert cmp.rates is not None and cmp.saturation_rps is not None
    labels, rates = cmp.labels, cmp.rates
    rows = []
    for rate in rates:
        at = cmp.at_rate(rate)
        ratios = ratio_to_static(at)
        rows.append([f"{rate:g} ({rate / cmp.saturation_rps:.0%})"]
                    + [f"{r['output_throughput']:.0f} ({ratios.get(r['policy']) or 0:.2f}x)" for r in at])
    by_rate = _md_table(["request rate (req/s)", *labels], rows)
    top = cmp.at_rate(rates[-1])
    fields = [("request throughput (req/s)", "request_throughput", ".2f"),
              ("output throughput (tok/s)", "output_throughput", ".0f"),
              ("mean TTFT (s)", "mean_ttft_ms", "s"), ("p99 TTFT (s)", "p99_ttft_ms", "s"),
              ("mean TPOT (ms)", "mean_tpot_ms", ".1f"), ("p99 ITL (ms)", "p99_itl_ms", ".1f"),
              ("mean E2EL (s)", "mean_e2el_ms", "s"), ("preemptions", "num_preemptions", "d")]
    rows = []
    for label, key, fmt in fields:
        cells = []
        for r in top:
            value = r[key]
            cells.append(f"{value / 1000:.2f}" if fmt == "s" else str(int(value)) if fmt == "d" else
                         format(value, fmt))
        rows.append([label, *cells])
    return by_rate, _md_table(["", *labels], rows), ratio_to_static(top)


@dataclass(frozen=True)
class DemoRun:
    """What the phases of a demo left for its report."""

    validation: Validation
    verdict: Verdict
    plan: Plan
    compare: Comparison
    phase_s: dict[str, float]
    clamped: int
    """Comparison trace rows whose lengths were clamped to the validation's maxima."""
    compare_requests: int
    commands: list[str]
    """The commands that reproduce each phase, from the report's directory."""
    profile_origin: str
    profile_rel: str
    wall_s: float
    model: str = "small"


def write_report(out: Path, info: DemoRun) -> Path:
    """report.md from what the phases left in ``info``."""
    from calibrate.fit import format_error_table
    from experiments.validation import drift_warning, format_speeds
    from experiments.validation.report import replaced_lines
    from experiments.validation.verdict import verdict_at_device_speed

    v, plan, cmp = info.validation, info.plan, info.compare
    assert cmp.rates is not None and cmp.saturation_rps is not None
    n_slice = len(v.live.requests)
    prof = plan.profile
    steps = v.steps.summary()
    served = "once on the live engine"
    if len(v.live_runs) > 1:
        served = (f"{len(v.live_runs)} times on the live engine (the live column is their mean: on a shared CPU "
                  "the live engine does not reproduce itself, see the spread)")
        served += "".join(f"; {line}" for line in replaced_lines(v))
    by_rate, at_top, ratios = comparison_markdown(cmp)
    top_rate = cmp.rates[-1]
    ratio_text = ", ".join(f"{label} {ratios[label]:.2f}x" for label in cmp.labels if ratios.get(label))
    held = prof.errors.get("held_out") if prof.errors else None
    speed_text = ""
    if v.speed_before is not None:
        speed_text = (f"{(v.speed_source or 'the profile steps').capitalize()}, timed again just before and after "
                      f"the live runs, ran {format_speeds(v.speed_before, v.speed_after)}.")
    at_verdict = verdict_at_device_speed(v, info.verdict.tolerances)
    if at_verdict is not None and v.at_device_speed is not None:
        failed = "; failed: " + "; ".join(c.describe() for c in at_verdict.failed) if at_verdict.failed else ""
        speed_text += (f" Simulated again with every step priced at that speed (x{v.at_device_speed.factor:.3f}), "
                       f"the verdict would be **{at_verdict.label}**{failed}: the verdict at the end is the profile's "
                       "as calibrated.")
    if v.profile_live is not None:
        own = v.profile_live
        speed_text += (f" For reference, the profile on its own {own['steps']} calibration live steps: median |error| "
                       f"{own['median_step_rel_error'] * 100:.1f}%, median signed "
                       f"{own['median_step_signed_error'] * 100:+.1f}% (no model fits noisy steps exactly; this run's "
                       "per-step error beyond that is the device's drift).")
    warning = drift_warning(v)
    if warning:
        speed_text += f"\n\n**Warning:** {warning}"
    lines = [
        "# servesim demo",
        "",
        f"Machine: {prof.device}; model `{info.model}` ({prof.dtype}, random weights, "
        f"{prof.torch_threads or 'default'} torch thread(s)). Total wall time {info.wall_s:.0f} s "
        f"({', '.join(f'{k} {s:.0f} s' for k, s in info.phase_s.items())}).",
        "",
        "## 1. Calibration",
        "",
        f"Profile: `{info.profile_rel}` ({info.profile_origin}; grid `{prof.grid}`, "
        f"{len(prof.samples)} measured steps, created {prof.created_utc}). "
        "Held-out error of the fitted step-cost model (5-fold cross-validation, absolute % of step time):",
        "",
        "```",
        format_error_table(held) if held else "too few samples to cross-validate",
        "```",
        "",
        "## 2. Validation: the simulator against the live engine",
        "",
        f"{n_slice} requests of `{TRACE}` (rows {plan.workload.start}-"
        f"{plan.workload.start + n_slice - 1}; prompt lengths x {plan.prompt_scale:.3f}, "
        f"output lengths x {plan.output_scale:.3f} to keep the `{info.model}` model's live runs short), "
        "time-scaled x "
        f"{plan.workload.time_scale:.3g} to {plan.load:.0%} of the simulated saturation throughput "
        f"({plan.capacity_rps:.2f} req/s), served by policy `{plan.scheduler.policy}` with "
        f"{plan.capacity.num_blocks} KV blocks of {plan.capacity.block_size} tokens: {served}, once in the "
        "simulator priced by the profile. Same requests, seed, policy and KV pool.",
        "",
        validation_markdown(v, info.verdict),
        "",
        f"Verdict: **{info.verdict.label}** ({info.verdict.tolerance_text()}; details at the end).",
        "",
        f"Per-step error: every one of the {v.steps.measured_s.size} steps the live engine ran, priced by the "
        f"profile from its shape: median |error| {steps['median_step_rel_error'] * 100:.1f}%, p90 "
        f"{steps['p90_step_rel_error'] * 100:.1f}% (median signed {steps['median_step_signed_error'] * 100:+.1f}%; "
        f"summed over the run {v.steps.total_rel_error * 100:+.1f}%). {speed_text}",
        "",
        "By decode batch size (a loaded engine spends most of its time, and its requests most of their decode, "
        "in the larger batches): " + ", ".join(
            f"{name} sequence(s): {b['time_share']:.0%} of the time, summed error {b['total_rel_error'] * 100:+.1f}%"
            for name, b in steps["step_errors_by_batch"].items()) + ".",
        "",
        "At 70% load queueing amplifies a cost error two to three times in the latencies: a device running 5% "
        "slower than when it was calibrated shows as 10-15% in TPOT and E2EL.",
        "",
        "![TTFT CDF](validation/ttft-cdf.png)",
        "",
        "TTFT distribution, live against simulated: where the curves overlap, the simulator predicts not only "
        "the mean but the queueing tail.",
        "",
        "![E2EL CDF](validation/e2el-cdf.png)",
        "",
        "End-to-end latency distribution, live against simulated: it adds up every step a request lives "
        "through, so a bias in the cost model shows here first.",
        "",
        "![Per-step predicted vs measured](validation/step-scatter.png)",
        "",
        "Each live step's predicted time against its measured time (log-log; the band is +/-10%): points on "
        "the diagonal mean the profile prices real steps, not just the calibration grid.",
        "",
        "## 3. Policy comparison on the whole trace (simulated)",
        "",
        f"All {info.compare_requests:,} requests of `{TRACE}`, lengths scaled by the same factors "
        f"(and clamped to {plan.workload.max_prompt_tokens} / {plan.workload.max_output_tokens} tokens: "
        f"{info.clamped} requests), replayed time-scaled to each request rate, simulated with the profile. "
        f"Saturation here is {cmp.saturation_rps:.2f} req/s: the best request throughput of any policy with "
        "every request queued at once. Output throughput (tok/s) and its ratio to static:",
        "",
        by_rate,
        "",
        f"At {top_rate:g} req/s (every policy saturated), throughput relative to static: {ratio_text}.",
        "",
        at_top,
        "",
        "![Latency vs throughput](compare/latency-vs-throughput.png)",
        "",
        "Mean and p99 TTFT and E2EL against output throughput, one point per rate: the curve that stays low "
        "furthest to the right serves the most traffic at a given latency.",
        "",
        "![Throughput vs rate](compare/throughput-vs-rate.png)",
        "",
        "Output throughput against offered rate: each policy follows the offered load until it saturates; "
        "the plateau is its capacity on this device.",
        "",
        "## Reproduce",
        "",
        "From this directory:",
        "",
        "```",
        *info.commands,
        "```",
        "",
        "## Verdict",
        "",
        verdict_markdown(info.verdict),
        "",
        *([f"**Warning:** {warning}", ""] if warning else []),
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
