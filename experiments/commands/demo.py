"""``servesim demo``: the whole story on this machine, with no arguments.

1. calibrate the ``small`` model (100 M parameters; ``--model tiny``: the fast one) on this CPU
   (quick grid, up to 1,024 positions), or take a given or shipped profile;
2. validate: a slice of azure-conv served live (3 times) and simulated (continuous, ~70% load),
   with its verdict against the default tolerances;
3. compare static, continuous, chunked and chunked+swap on the whole azure-conv trace,
   simulated with the profile, at rates around and above this device's saturation;
4. write ``report.md`` (:mod:`experiments.demo_report`) with the tables and plots, ending with
   the verdict, which the demo prints last.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from experiments.comparison import Comparison
from experiments.demo_report import TRACE, DemoRun, write_report
from experiments.options import progress_option, resolve_progress
from experiments.output import write_json
from experiments.validation.plan import DEFAULT_MAX_LENGTHS
from sim.config import KVConfig, SimConfig, parse_policy
from sim.hardware import GIB
from sim.policies.base import SchedulerConfig
from sim.workload import TraceReplay

MODEL = "small"
"""Calibrated and validated by default: its steps cost compute (``tiny``'s are mostly
interpreter jitter). Its quick calibration took 147-149 s on this project's 2-core VM
(2026-12-02) and the whole demo 251 s, within the 5-minute budget."""
MODELS = ("small", "tiny")
LOAD = 0.7
POLICIES = ("static", "continuous", "chunked", "chunked+swap")
RATE_FRACTIONS = (0.5, 0.75, 1.0, 1.25, 1.5)
"""Compare at these fractions of the best saturation request throughput."""


SMALL_VALIDATION_REQUESTS = 60
"""About 8 s of engine time per live run at 70% load on a 2-core CPU (small at 256 / 64 tokens:
the demo on 2026-12-02 found ~13.9 req/s saturation; earlier calibrations said ~3.7)."""


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
    threads: int | None = 1
    """torch CPU threads for calibration and the live engine (None: torch's default, every core)."""
    calibration_max_len: int | None = None
    """Longest sequence the calibration times (None: the model's positions)."""


SMALL_CALIBRATION_MAX_LEN = 1024
"""The small model's calibration stops at 1,024 positions (its 4,096 would take a CPU tens of
minutes); the demo's requests stay within 256 + 64 tokens."""
SIZES = {"small": Sizes(SMALL_VALIDATION_REQUESTS, *DEFAULT_MAX_LENGTHS["small"], None, RATE_FRACTIONS, 3,
                        threads=None, calibration_max_len=SMALL_CALIBRATION_MAX_LEN),
         "tiny": Sizes(200, *DEFAULT_MAX_LENGTHS["tiny"], None, RATE_FRACTIONS, 3)}
"""The demo's phases per model, sized so that the whole demo takes under 5 minutes on a 2-core
CPU (calibration included)."""
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


def compare_policies(model: str, profile_path: Path, trace_path: Path, block_size: int, kv_blocks: int,
                     kv_bytes: int, rate_fractions: tuple[float, ...], jobs: int | None,
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
                                         model=model, profile=str(profile_path))))
    cmp = run_comparison(configs, TraceReplay(trace=str(trace_path)), fractions=rate_fractions, jobs=jobs,
                         progress=progress)
    return cmp, dict(configs)


@click.command("demo")
@click.option("--model", default=MODEL, show_default=True, type=click.Choice(MODELS),
              help="Model to calibrate (a given or shipped profile brings its own).")
@click.option("--skip-calibration", is_flag=True,
              help="Use the shipped profiles/tiny-cpu.json (model tiny) instead of calibrating this machine.")
@click.option("--profile", "profile_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Use this profile (and its model) instead of calibrating.")
@click.option("--accept-poor-fit", is_flag=True,
              help="Go on with a calibration whose held-out error is beyond the limits (it stops otherwise).")
@click.option("-o", "--output", default="servesim-demo", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Report directory.")
@click.option("--num-requests", default=None, type=click.IntRange(min=2), hidden=True,
              help="Requests in the validation slice.")
@click.option("--compare-requests", default=None, type=click.IntRange(min=2), hidden=True,
              help="Trace rows in the comparison (default: all).")
@click.option("--threads", default=None, type=click.IntRange(1), hidden=True,
              help="torch CPU threads for calibration and the live engine (default: 1 for tiny, every core for small).")
@click.option("--quick", is_flag=True, hidden=True, help="A demo of seconds (small everything), for tests.")
@click.option("--jobs", "-j", default=None, type=click.IntRange(min=1), hidden=True,
              help="Simulations at once in the comparison.")
@progress_option
def demo(model: str, skip_calibration: bool, profile_path: Path | None, accept_poor_fit: bool, output: Path,
         num_requests: int | None, compare_requests: int | None, threads: int | None, quick: bool, jobs: int | None,
         progress: bool | None) -> None:
    """Calibrate, validate and compare policies on this machine, and write a report.

    Runs the small model (100 M parameters) on CPU with the embedded Azure conversation trace:
    calibrates a cost profile, checks the simulator against the live engine on a trace slice
    (served 3 times) with a PASS / FAIL verdict, compares static, continuous, chunked and
    chunked+swap on the whole trace, and writes OUTPUT/report.md. About 5 minutes.
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
    commands = []

    # 1. calibration
    t0 = time.perf_counter()
    if profile_path is not None or skip_calibration:
        if profile_path is None:
            profile_path = shipped_profile("tiny")
            if profile_path is None:
                raise click.ClickException("--skip-calibration: the shipped profiles/tiny-cpu.json was not found "
                                           "(run from the source tree, or drop the flag to calibrate)")
        if not profile_path.is_file():
            raise click.BadParameter(f"{profile_path} does not exist", param_hint="--profile")
        model = _profile_model(profile_path)
        origin = "given" if not skip_calibration else "shipped, not calibrated on this machine"
        click.echo(f"[1/4] calibration skipped: using {profile_path} (model {model})")
    else:
        profile_path = output / "profile.json"
        sized = SIZES[model]
        threads = threads or sized.threads
        _calibrate(model, threads, sized.calibration_max_len, progress, accept_poor_fit, profile_path)
        origin = "calibrated on this machine by this demo"
        commands.append(f"servesim calibrate --model {model} --quick"
                        + (f" --threads {threads}" if threads else "")
                        + (f" --max-model-len {sized.calibration_max_len}" if sized.calibration_max_len else "")
                        + " -o profile.json")
    phase_s["calibration"] = time.perf_counter() - t0

    sizes = QUICK if quick else SIZES[model]
    threads = threads or sizes.threads
    mp, mo = sizes.max_prompt_tokens, sizes.max_output_tokens
    n_val = num_requests or sizes.validation_requests
    n_cmp = compare_requests or sizes.compare_requests
    profile_rel = _relative(profile_path, output)

    # 2. validation
    t0 = time.perf_counter()
    times = f"{sizes.live_repeats} times" if sizes.live_repeats > 1 else "once"
    click.echo(f"[2/4] validating: {n_val} requests of {TRACE}, continuous, {LOAD:.0%} load, served live {times} "
               "and simulated ...")
    workload = TraceReplay(trace=TRACE, num_requests=n_val, max_prompt_tokens=mp, max_output_tokens=mo)
    try:
        plan = make_plan(profile_path, model, "cpu", None, threads, workload, SchedulerConfig(), None, LOAD, 0)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    v, verdict = execute(plan, output / "validation", progress, echo=_indented, repeats=sizes.live_repeats)
    phase_s["validation"] = time.perf_counter() - t0
    commands.append(f"servesim validate --profile {profile_rel} -n {n_val} --max-prompt-tokens {mp} "
                    f"--max-output-tokens {mo}" + (f" --threads {threads}" if threads else "")
                    + f" --load {LOAD} --repeats {sizes.live_repeats} "
                    "-o validation")

    # 3. comparison
    t0 = time.perf_counter()
    from experiments.output import write_runs_csv
    from experiments.plots import comparison_plots
    from experiments.report import throughput_table

    trace_name = f"azure-conv-{model}.csv"
    trace_path, clamped = scaled_trace(output / trace_name, plan.prompt_scale, plan.output_scale, mp, mo, n_cmp)
    n_rows = sum(1 for _ in trace_path.open()) - 1
    click.echo(f"[3/4] comparing {', '.join(POLICIES)} on {n_rows:,} requests of {TRACE} (simulated) ...")
    cmp, configs = compare_policies(model, profile_path, trace_path, plan.capacity.block_size,
                                    plan.capacity.num_blocks, plan.capacity.kv_bytes_per_token, sizes.rate_fractions,
                                    jobs, progress)
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
    commands.append(f"servesim compare --trace {trace_name} --profile {profile_rel} --model {model} "
                    f"--kv-blocks {plan.capacity.num_blocks} --swap-gib {swap_gib:.6f} "
                    f"--policies {','.join(POLICIES)} --rates {','.join(f'{r:g}' for r in cmp.rates)}")

    # 4. report
    click.echo("[4/4] writing the report ...")
    info = DemoRun(v, verdict, plan, cmp, phase_s, clamped, n_rows, commands, origin, profile_rel,
                   time.perf_counter() - t_start, model)
    report = write_report(output, info)
    click.echo(f"done in {time.perf_counter() - t_start:.0f} s: {report}")
    click.echo(verdict.summary())


def _calibrate(model: str, threads: int | None, max_model_len: int | None, progress: bool, accept_poor_fit: bool,
               path: Path) -> None:
    """The quick calibration of ``model``, written to ``path``. A machine that drifted is
    calibrated again once; a second drift or a poor fit stops the demo with the numbers (a poor
    fit goes on with ``accept_poor_fit``, recorded)."""
    from calibrate.calibration import CalibrationError, DriftError, poor_fit_problems, run_calibration
    from calibrate.profile import save_profile

    click.echo(f"[1/4] calibrating {model} on this CPU (quick grid, "
               f"{f'{threads} thread(s)' if threads else 'every core'}) ...")
    def calibrate():
        return run_calibration(model, quick=True, threads=threads, device="cpu", progress=progress,
                               max_model_len=max_model_len)

    try:
        try:
            calibrated = calibrate()
        except DriftError as e:  # a passing burst of another process: one more try before giving up
            click.echo(f"      {str(e).splitlines()[0]}\n      calibrating again, once ...", err=True)
            calibrated = calibrate()
    except (ValueError, CalibrationError) as e:
        raise click.ClickException(str(e)) from None
    check = calibrated.fit_check or {}
    problems = poor_fit_problems(check) if check else []
    if problems:
        if not accept_poor_fit:
            raise click.ClickException(
                f"poor fit: {'; '.join(problems)}. The calibration was not used: the machine was probably busy "
                "(run the demo on an idle one), or pass --accept-poor-fit to go on with it.")
        calibrated = dataclasses.replace(calibrated, fit_check=check | {"accepted_poor_fit": True})
        click.echo(f"      poor fit accepted (--accept-poor-fit): {'; '.join(problems)}", err=True)
    save_profile(calibrated, path)
    click.echo(f"      {len(calibrated.samples)} steps in {calibrated.calibration_s:.0f} s -> {path}")


def _profile_model(path: Path) -> str:
    """The demo's model from a profile: its ``model`` when it is one the demo runs, else an error."""
    try:
        model = json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        raise click.BadParameter(f"{path} is not a profile JSON", param_hint="--profile") from None
    if model not in MODELS:
        raise click.BadParameter(f"{path} was calibrated for model {model!r}; the demo runs {' or '.join(MODELS)}",
                                 param_hint="--profile")
    return str(model)


def _indented(text: str) -> None:
    click.echo("\n".join("      " + line for line in text.splitlines()))


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path)
