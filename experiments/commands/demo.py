"""``servesim demo``: the whole story on this machine, with no arguments.

1. calibrate the ``tiny`` model on this CPU (quick grid), or take the shipped profile;
2. validate: a slice of azure-conv served live and simulated (continuous, ~70% load);
3. compare static, continuous, chunked and chunked+swap on the whole azure-conv trace,
   simulated with the profile, at rates around and above this device's saturation;
4. write ``report.md`` with the tables and plots.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from experiments.comparison import Comparison
from experiments.options import progress_option, resolve_progress
from experiments.output import write_json
from experiments.validation.plan import TINY_MAX_OUTPUT_TOKENS, TINY_MAX_PROMPT_TOKENS
from sim.config import KVConfig, SimConfig, parse_policy
from sim.hardware import GIB
from sim.policies.base import SchedulerConfig
from sim.workload import TraceReplay

if TYPE_CHECKING:
    from experiments.validation import Plan, Validation

MODEL = "tiny"
TRACE = "azure-conv"
POLICIES = ("static", "continuous", "chunked", "chunked+swap")
RATE_FRACTIONS = (0.5, 0.75, 1.0, 1.25, 1.5)
"""Compare at these fractions of the best saturation request throughput."""


@dataclass(frozen=True)
class Sizes:
    """How big each phase is; ``compare_requests`` None is the whole trace."""

    validation_requests: int
    max_prompt_tokens: int
    max_output_tokens: int
    compare_requests: int | None
    rate_fractions: tuple[float, ...]
    live_repeats: int
    """Live runs the validation compares with (their mean)."""


FULL = Sizes(200, TINY_MAX_PROMPT_TOKENS, TINY_MAX_OUTPUT_TOKENS, None, RATE_FRACTIONS, 3)
QUICK = Sizes(12, 128, 32, 300, (0.75, 1.5), 1)
"""``--quick``: a demo of seconds, for tests."""


def scaled_trace(path: Path, prompt_scale: float, output_scale: float, max_prompt_tokens: int,
                 max_output_tokens: int, num_requests: int | None) -> tuple[Path, int]:
    """Write azure-conv with lengths scaled as in the validation slice (same factors) and
    clamped to the same maxima, as a servesim CSV; returns it and how many rows were clamped."""
    from sim.traces import load_trace

    trace = load_trace(TRACE)
    n = len(trace) if num_requests is None else min(num_requests, len(trace))
    assert trace.arrival_s is not None
    clamped = 0
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["arrival_s", "prompt_tokens", "output_tokens"])
        for i in range(n):
            p = max(1, round(int(trace.prompt_tokens[i]) * prompt_scale))
            o = max(1, round(int(trace.output_tokens[i]) * output_scale))
            if p > max_prompt_tokens or o > max_output_tokens:
                clamped += 1
            w.writerow([repr(float(trace.arrival_s[i] - trace.arrival_s[0])), min(p, max_prompt_tokens),
                        min(o, max_output_tokens)])
    return path, clamped


def compare_policies(profile_path: Path, trace_path: Path, block_size: int, kv_blocks: int, kv_bytes: int,
                     rate_fractions: tuple[float, ...], jobs: int | None,
                     progress: bool) -> tuple[Comparison, dict[str, SimConfig]]:
    """Simulate every policy at fractions of the best saturation; returns the comparison and the configs."""
    from experiments.comparison import run_comparison

    swap_gib = kv_blocks * block_size * kv_bytes / GIB * (1 + 1e-9)  # host pool = device pool, in blocks
    configs = []
    for label in POLICIES:
        name, preempt = parse_policy(label)
        sched = SchedulerConfig(policy=name, preempt=preempt)
        configs.append((label, SimConfig(scheduler=sched, kv=KVConfig(num_blocks=kv_blocks, block_size=block_size,
                                                                      swap_gib=swap_gib if preempt == "swap" else 0),
                                         model=MODEL, profile=str(profile_path))))
    cmp = run_comparison(configs, TraceReplay(trace=str(trace_path)), fractions=rate_fractions, jobs=jobs,
                         progress=progress)
    return cmp, dict(configs)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
             + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}%"


def validation_markdown(v: Validation) -> str:
    from experiments.validation import live_spread, metric_names
    from experiments.validation.report import format_spread

    repeated = len(v.live_runs) > 1
    rows = []
    for key, label in metric_names():
        m = v.metrics[key]
        rows.append([label, f"{m['live']:.2f}", f"{m['sim']:.2f}", _pct(m["rel_error"])]
                    + ([format_spread(live_spread(v, key))] if repeated else []))
    head = ["metric", f"live (mean of {len(v.live_runs)} runs)" if repeated else "live", "simulated",
            "error (sim - live) / live"] + (["live spread (max - min) / mean"] if repeated else [])
    return _md_table(head, rows)


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


def write_report(out: Path, info: DemoRun) -> Path:
    """report.md from what the phases left in ``info``."""
    from calibrate.fit import format_error_table
    from experiments.validation import drift_warning, format_speeds

    v, plan, cmp = info.validation, info.plan, info.compare
    assert cmp.rates is not None and cmp.saturation_rps is not None
    n_slice = len(v.live.requests)
    prof = plan.profile
    steps = v.steps.summary()
    served = "once on the live engine"
    if len(v.live_runs) > 1:
        served = (f"{len(v.live_runs)} times on the live engine (the live column is their mean: on a shared CPU "
                  "the live engine does not reproduce itself, see the spread)")
    by_rate, at_top, ratios = comparison_markdown(cmp)
    top_rate = cmp.rates[-1]
    ratio_text = ", ".join(f"{label} {ratios[label]:.2f}x" for label in cmp.labels if ratios.get(label))
    held = prof.errors.get("held_out") if prof.errors else None
    speed_text = ""
    if v.speed_before is not None:
        speed_text = (f"The profile's own steps, timed again just before and after the live run, ran "
                      f"{format_speeds(v.speed_before, v.speed_after)}.")
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
        f"Machine: {prof.device}; model `{MODEL}` ({prof.dtype}, random weights, "
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
        f"output lengths x {plan.output_scale:.3f} to fit the tiny model), time-scaled x "
        f"{plan.workload.time_scale:.3g} to {plan.load:.0%} of the simulated saturation throughput "
        f"({plan.capacity_rps:.2f} req/s), served by policy `{plan.scheduler.policy}` with "
        f"{plan.capacity.num_blocks} KV blocks of {plan.capacity.block_size} tokens: {served}, once in the "
        "simulator priced by the profile. Same requests, seed, policy and KV pool.",
        "",
        validation_markdown(v),
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
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


@click.command("demo")
@click.option("--skip-calibration", is_flag=True,
              help="Use the shipped profiles/tiny-cpu.json instead of calibrating this machine.")
@click.option("--profile", "profile_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Use this profile instead of calibrating.")
@click.option("-o", "--output", default="servesim-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Report directory.")
@click.option("--num-requests", default=None, type=click.IntRange(min=2), hidden=True,
              help="Requests in the validation slice.")
@click.option("--compare-requests", default=None, type=click.IntRange(min=2), hidden=True,
              help="Trace rows in the comparison (default: all).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1), hidden=True,
              help="torch CPU threads for calibration and the live engine.")
@click.option("--quick", is_flag=True, hidden=True, help="A demo of seconds (small everything), for tests.")
@click.option("--jobs", "-j", default=None, type=click.IntRange(min=1), hidden=True,
              help="Simulations at once in the comparison.")
@progress_option
def demo(skip_calibration: bool, profile_path: Path | None, output: Path, num_requests: int | None,
         compare_requests: int | None, threads: int, quick: bool, jobs: int | None, progress: bool | None) -> None:
    """Calibrate, validate and compare policies on this machine, and write a report.

    Runs the tiny model on CPU with the embedded Azure conversation trace: calibrates a cost
    profile (--skip-calibration: the shipped one), checks the simulator against the live
    engine on a trace slice, compares static, continuous, chunked and chunked+swap on the
    whole trace, and writes OUTPUT/report.md.
    """
    from experiments.validation.output import execute
    from experiments.validation.plan import make_plan, shipped_profile

    progress = resolve_progress(progress)
    if skip_calibration and profile_path is not None:
        raise click.UsageError("give --skip-calibration or --profile, not both")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException("the demo runs the live engine, which needs torch "
                                   "(pip install 'servesim[runtime]')") from None
    t_start = time.perf_counter()
    phase_s: dict[str, float] = {}
    output.mkdir(parents=True, exist_ok=True)
    sizes = QUICK if quick else FULL
    mp, mo = sizes.max_prompt_tokens, sizes.max_output_tokens
    n_val = num_requests or sizes.validation_requests
    n_cmp = compare_requests or sizes.compare_requests
    fractions = sizes.rate_fractions
    commands = []

    # 1. calibration
    t0 = time.perf_counter()
    if profile_path is not None or skip_calibration:
        if profile_path is None:
            profile_path = shipped_profile(MODEL)
            if profile_path is None:
                raise click.ClickException("--skip-calibration: the shipped profiles/tiny-cpu.json was not found "
                                           "(run from the source tree, or drop the flag to calibrate)")
        if not profile_path.is_file():
            raise click.BadParameter(f"{profile_path} does not exist", param_hint="--profile")
        origin = "given" if not skip_calibration else "shipped, not calibrated on this machine"
        click.echo(f"[1/4] calibration skipped: using {profile_path}")
    else:
        from calibrate.calibration import CalibrationError, run_calibration
        from calibrate.profile import save_profile

        click.echo(f"[1/4] calibrating {MODEL} on this CPU (quick grid, {threads} thread(s)) ...")
        try:
            calibrated = run_calibration(MODEL, quick=True, threads=threads, device="cpu", progress=progress)
        except (ValueError, CalibrationError) as e:
            raise click.ClickException(str(e)) from None
        profile_path = output / "profile.json"
        save_profile(calibrated, profile_path)
        origin = "calibrated on this machine by this demo"
        click.echo(f"      {len(calibrated.samples)} steps in {calibrated.calibration_s:.0f} s -> {profile_path}")
        commands.append(f"servesim calibrate --model {MODEL} --quick --threads {threads} -o profile.json")
    phase_s["calibration"] = time.perf_counter() - t0

    profile_rel = _relative(profile_path, output)

    # 2. validation
    t0 = time.perf_counter()
    click.echo(f"[2/4] validating: {n_val} requests of {TRACE}, continuous, 70% load, live vs simulated ...")
    workload = TraceReplay(trace=TRACE, num_requests=n_val, max_prompt_tokens=mp, max_output_tokens=mo)
    try:
        plan = make_plan(profile_path, MODEL, "cpu", None, threads, workload, SchedulerConfig(), None, 0.7, 0)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    v = execute(plan, output / "validation", progress, echo=_indented, repeats=sizes.live_repeats)
    phase_s["validation"] = time.perf_counter() - t0
    commands.append(f"servesim validate --profile {profile_rel} -n {n_val} --max-prompt-tokens {mp} "
                    f"--max-output-tokens {mo} --threads {threads} --load 0.7 --repeats {sizes.live_repeats} "
                    "-o validation")

    # 3. comparison
    t0 = time.perf_counter()
    from experiments.output import write_runs_csv
    from experiments.plots import comparison_plots
    from experiments.report import throughput_table

    trace_path, clamped = scaled_trace(output / "azure-conv-tiny.csv", plan.prompt_scale, plan.output_scale, mp, mo,
                                       n_cmp)
    n_rows = sum(1 for _ in trace_path.open()) - 1
    click.echo(f"[3/4] comparing {', '.join(POLICIES)} on {n_rows:,} requests of {TRACE} (simulated) ...")
    cmp, configs = compare_policies(profile_path, trace_path, plan.capacity.block_size, plan.capacity.num_blocks,
                                    plan.capacity.kv_bytes_per_token, fractions, jobs, progress)
    assert cmp.rates is not None
    cmp_dir = output / "compare"
    cmp_dir.mkdir(exist_ok=True)
    write_json(cmp_dir / "compare.json", {"command": "demo", "labels": list(cmp.labels), "rates": list(cmp.rates),
                                          "saturation_rps": cmp.saturation_rps,
                                          "configs": {label: c.to_dict() for label, c in configs.items()},
                                          "runs": list(cmp.runs)})
    write_runs_csv(cmp_dir / "compare.csv", cmp.runs)
    comparison_plots(cmp_dir, cmp.runs, cmp.labels, False)
    click.echo(f"      saturation ~{cmp.saturation_rps:.2f} req/s; output throughput (tok/s) by rate:")
    _indented(throughput_table(cmp.runs, cmp.labels, cmp.rates))
    phase_s["comparison"] = time.perf_counter() - t0
    swap_gib = configs["chunked+swap"].kv.swap_gib
    commands.append(f"servesim compare --trace azure-conv-tiny.csv --profile {profile_rel} --model {MODEL} "
                    f"--kv-blocks {plan.capacity.num_blocks} --swap-gib {swap_gib:.6f} "
                    f"--policies {','.join(POLICIES)} --rates {','.join(f'{r:g}' for r in cmp.rates)}")

    # 4. report
    click.echo("[4/4] writing the report ...")
    info = DemoRun(v, plan, cmp, phase_s, clamped, n_rows, commands, origin, profile_rel,
                   time.perf_counter() - t_start)
    report = write_report(output, info)
    click.echo(f"done in {time.perf_counter() - t_start:.0f} s: {report}")


def _indented(text: str) -> None:
    click.echo("\n".join("      " + line for line in text.splitlines()))


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)

