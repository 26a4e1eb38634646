"""``servesim calibrate``: time the real engine over a grid of steps and write a profile;
``servesim calibrate fit``: fit a profile to step timings measured elsewhere."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import click
from click.core import ParameterSource

from calibrate.calibration import FIT_LIMITS_PCT, poor_fit_problems
from calibrate.drift import DRIFT_THRESHOLD, format_drift
from experiments.options import progress_option, resolve_progress
from sim.models import MODELS, get_model


def _print_errors(errors: dict) -> None:
    from calibrate.fit import format_error_table

    if errors.get("held_out"):
        click.echo(f"held-out error ({errors['folds']}-fold cross-validation, absolute % of step time):")
        click.echo(format_error_table(errors["held_out"]))
    else:
        click.echo("held-out error: too few samples to cross-validate")


@click.group("calibrate", invoke_without_command=True)
@click.option("--model", default=None, help=f"Architecture preset: {', '.join(MODELS)}.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face checkpoint (safetensors); default: random weights (timing does not depend on them).")
@click.option("--device", default="auto", show_default=True,
              help="auto | cpu | cuda[:N]; with --url, the device the server runs on (recorded in the profile; "
                   "a black box does not say).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--block-size", type=int, default=16, show_default=True, help="KV block size in tokens.")
@click.option("--quick", is_flag=True,
              help="A coarse grid (~70 steps) and a short live phase: for CPUs and tests (about a minute on CPU).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Weights, token ids, measuring order and the cross-validation split.")
@click.option("--repeats", type=click.IntRange(1), default=3, show_default=True,
              help="Timed runs of a step per visit, back to back (the median over all visits is kept).")
@click.option("--warmup", type=click.IntRange(0), default=1, show_default=True,
              help="Untimed runs of a step before each visit's timed ones.")
@click.option("--passes", type=click.IntRange(1), default=2, show_default=True,
              help="Visits of the whole grid, each in a new shuffled order.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads (default: torch's); use what the live engine will use.")
@click.option("--memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Fraction of CUDA memory for weights + KV pool.")
@click.option("--samples", "samples_csv", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the raw samples as CSV (the format `calibrate fit` reads).")
@click.option("--live/--no-live", default=True, show_default=True,
              help="After the grid, serve a synthetic workload (Poisson, uniform lengths; continuous and "
                   "chunked) on the live engine and fit its steps too.")
@click.option("--max-model-len", type=click.IntRange(2), default=None,
              help="Longest sequence (prompt + output) to calibrate, below the model's positions: bounds the "
                   "grid and the live phase (e.g. 1024 for the small model on a CPU) [default: the model's].")
@click.option("--drift-threshold", "drift_pct", type=click.FloatRange(0, 100, min_open=True, max_open=True),
              default=100 * DRIFT_THRESHOLD, show_default=True,
              help="Largest accepted change (%) of the control steps' time from the start to any checkpoint "
                   "(middle and end of the grid and of the live phase); beyond it a segment is measured again "
                   "once, then calibration stops.")
@click.option("--no-drift-check", is_flag=True, help="Do not time control steps (no drift detection).")
@click.option("--accept-poor-fit", is_flag=True,
              help="Write the profile even when its held-out error is beyond the limits "
                   f"(median {FIT_LIMITS_PCT['median_ape_pct']:g}%, p90 {FIT_LIMITS_PCT['p90_ape_pct']:g}% "
                   "on the live steps); the profile records that it was accepted.")
@click.option("--engine", type=click.Choice(["servesim", "vllm"]), default="servesim", show_default=True,
              help="The engine to measure: servesim's runtime, or a real vLLM (in process with --model "
                   "CHECKPOINT_DIR, black-box over HTTP with --url).")
@click.option("--url", default=None, metavar="URL",
              help="--engine vllm: a vLLM server already running (http://HOST:PORT), calibrated from request "
                   "patterns whose steps are known, timed from the stream; settings read from its /metrics.")
@click.option("--vllm-python", default=None, metavar="PATH",
              help="--engine vllm: the python of an environment with vLLM [default: this one if it imports "
                   "vllm, else $SERVESIM_VLLM_PYTHON].")
@click.option("--max-num-batched-tokens", type=click.IntRange(1), default=None,
              help="--engine vllm: vLLM's token budget per step [default: vLLM's; with --url: what the server "
                   "was started with, which its /metrics does not say].")
@click.option("--max-num-seqs", type=click.IntRange(1), default=None,
              help="--engine vllm: vLLM's sequences per step [default: vLLM's].")
@click.option("--kv-cache-gib", type=click.IntRange(1), default=None,
              help="--engine vllm: KV cache GiB (VLLM_CPU_KVCACHE_SPACE on CPU) [default: vLLM's].")
@click.option("--enable-prefix-caching/--no-enable-prefix-caching", "prefix_caching", default=None,
              help="--engine vllm: vLLM's prefix caching [default: vLLM's, on].")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="--engine vllm: keep the engine's log, steps.csv and engine.json here.")
@click.option("--build-tokens", type=click.IntRange(0), default=None,
              help="--engine vllm --url: first run one step of every token count up to N on the server (lone "
                   "prompts of 1..N tokens), so that vLLM's CPU backend has built its kernel for each before the "
                   "patterns [default: 512 with --device cpu, else 0].")
@progress_option
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Profile JSON to write.")
@click.pass_context
def calibrate(ctx: click.Context, model: str | None, weights: Path | None, device: str, dtype: str | None,
              block_size: int, quick: bool, seed: int, repeats: int, warmup: int, passes: int, threads: int | None,
              memory_utilization: float, samples_csv: Path | None, live: bool, max_model_len: int | None,
              drift_pct: float,
              no_drift_check: bool, accept_poor_fit: bool, progress: bool | None, output: Path | None,
              engine: str = "servesim", url: str | None = None, vllm_python: str | None = None,
              max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
              kv_cache_gib: int | None = None, prefix_caching: bool | None = None, workdir: Path | None = None,
              build_tokens: int | None = None) -> None:
    """Calibrate a cost model on the real engine (CUDA when present, else CPU) and write a profile.

    \b
      servesim calibrate --model tiny --quick -o profiles/tiny-cpu.json
      servesim calibrate fit steps.csv --model qwen2.5-7b -o profile.json
      servesim calibrate --engine vllm --model CHECKPOINT_DIR --quick -o vllm-cpu.json
      servesim calibrate --engine vllm --url http://127.0.0.1:8000 --quick -o vllm-cpu.json
    """
    if ctx.invoked_subcommand is not None:
        given = [p.opts[-1] for p in ctx.command.params
                 if ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]  # type: ignore[arg-type]
        if given:
            raise click.UsageError(f"option(s) {', '.join(given)} must come after `{ctx.invoked_subcommand}` "
                                   f"(see servesim calibrate {ctx.invoked_subcommand} --help)")
        return
    if engine == "vllm":
        _calibrate_vllm(ctx, output, accept_poor_fit, samples_csv, url=url, model=model, dtype=dtype,
                        block_size=block_size, max_model_len=max_model_len, quick=quick, seed=seed,
                        vllm_python=vllm_python, max_num_batched_tokens=max_num_batched_tokens,
                        max_num_seqs=max_num_seqs, kv_cache_gib=kv_cache_gib, prefix_caching=prefix_caching,
                        workdir=workdir, device=device, build_tokens=build_tokens)
        return
    given_vllm = _given(ctx, _VLLM_ONLY)
    if given_vllm:
        raise click.UsageError(f"option(s) {', '.join(given_vllm)} apply to --engine vllm")
    if model is None or output is None:
        raise click.UsageError("--model and -o/--output are required "
                               "(or: servesim calibrate fit SAMPLES.csv -o PROFILE)")
    try:
        from calibrate.calibration import CalibrationError, run_calibration
        from calibrate.profile import save_profile
        from calibrate.samples import write_samples
    except ImportError as e:
        raise click.ClickException(f"calibration needs the runtime extras (pip install '.[runtime]'): {e}") from None
    try:
        profile = run_calibration(model, weights, device, dtype, block_size, quick=quick, seed=seed, repeats=repeats,
                                  warmup=warmup, passes=passes, threads=threads, memory_utilization=memory_utilization,
                                  progress=resolve_progress(progress), live=live, max_model_len=max_model_len,
                                  drift_threshold=None if no_drift_check else drift_pct / 100)
    except (ValueError, CalibrationError) as e:
        raise click.ClickException(str(e)) from None
    if profile.out_of_memory_steps:
        click.echo(f"left out {profile.out_of_memory_steps} grid steps that ran the device out of memory", err=True)
    if profile.interrupted:
        click.echo(f"interrupted: fitted on the {len(profile.samples)} steps measured before Ctrl-C", err=True)
    from calibrate.live import count_origins

    origins = ", ".join(f"{n} {origin}" for origin, n in count_origins(profile.samples).items())
    click.echo(f"{profile.model} on {profile.device}, {profile.dtype}: {len(profile.samples)} steps ({origins}) "
               f"in {profile.calibration_s:.1f} s{_phases(profile.phases_s, profile.drift)}")
    if profile.drift is not None:
        click.echo(format_drift(profile.drift))
    _print_errors(profile.errors)
    check = profile.fit_check
    if check is not None and not check["passed"]:
        problems = "; ".join(poor_fit_problems(check))
        if not accept_poor_fit:
            raise click.ClickException(
                f"poor fit: {problems}. The profile was not written: the machine was probably busy (recalibrate "
                f"on an idle one), or pass --accept-poor-fit to write it anyway.")
        profile = dataclasses.replace(profile, fit_check=check | {"accepted_poor_fit": True})
        click.echo(f"poor fit accepted (--accept-poor-fit): {problems}", err=True)
    save_profile(profile, output)
    if samples_csv is not None:
        write_samples(samples_csv, profile.samples)
    click.echo(f"wrote {output}")


_VLLM_ONLY = ("url", "vllm_python", "max_num_batched_tokens", "max_num_seqs", "kv_cache_gib", "prefix_caching",
              "workdir", "build_tokens")
_SERVESIM_ONLY = ("weights", "repeats", "warmup", "passes", "threads", "memory_utilization", "live",
                  "drift_pct", "no_drift_check")
_SERVER_SETS = ("vllm_python", "kv_cache_gib", "prefix_caching", "block_size", "max_model_len")
"""What a running server was started with and --url cannot change (it reads them, or the fit does not need them)."""


def _given(ctx: click.Context, names: tuple[str, ...]) -> list[str]:
    """The options among ``names`` that the command line set, as the user spells them."""
    return [p.opts[-1] for p in ctx.command.params
            if p.name in names and ctx.get_parameter_source(p.name) is ParameterSource.COMMANDLINE]  # type: ignore[arg-type]


def _calibrate_vllm(ctx: click.Context, output: Path | None, accept_poor_fit: bool, samples_csv: Path | None, *,
                    url: str | None, model: str | None, dtype: str | None, block_size: int,
                    max_model_len: int | None, quick: bool, seed: int, vllm_python: str | None,
                    max_num_batched_tokens: int | None, max_num_seqs: int | None, kv_cache_gib: int | None,
                    prefix_caching: bool | None, workdir: Path | None, device: str = "auto",
                    build_tokens: int | None = None) -> None:
    """``--engine vllm``: in process (``--model CHECKPOINT_DIR``) or black-box (``--url``)."""
    from calibrate.errors import CalibrationError
    from calibrate.profile import save_profile
    from calibrate.samples import write_samples

    wrong = _given(ctx, _SERVESIM_ONLY)
    if wrong:
        raise click.UsageError(f"option(s) {', '.join(wrong)} apply to --engine servesim (vLLM sets its own)")
    if output is None:
        raise click.UsageError("-o/--output is required")
    if url is None and _given(ctx, ("device",)):
        raise click.UsageError("option --device applies to --engine vllm only with --url (vLLM in process reports "
                               "its own device)")
    if url is None and _given(ctx, ("build_tokens",)):
        raise click.UsageError("option --build-tokens applies to --engine vllm only with --url (a server's kernels)")
    if url is not None and _given(ctx, _SERVER_SETS):
        raise click.UsageError(f"option(s) {', '.join(_given(ctx, _SERVER_SETS))} cannot be used with --url: the "
                               "server was started with its own (they are read from its /metrics)")
    echo = functools.partial(click.echo, err=True)
    try:
        if url is None:
            from calibrate.vllm_calibration import calibrate_inprocess
            from calibrate.vllm_inproc import VllmEngineArgs

            if model is None:
                raise click.UsageError("--engine vllm needs --model CHECKPOINT_DIR (vLLM in process) or --url URL "
                                       "(a running vLLM server)")
            if not (Path(model) / "config.json").is_file():
                raise click.ClickException(f"--model {model}: not a checkpoint directory (no config.json); "
                                           "write one with `servesim checkpoint write --model small -o DIR`")
            args = VllmEngineArgs(
                model=str(Path(model).resolve()), dtype=dtype or "bfloat16", max_model_len=max_model_len,
                max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                block_size=block_size if ctx.get_parameter_source("block_size") is ParameterSource.COMMANDLINE
                else None, kv_cache_gib=kv_cache_gib, enable_prefix_caching=prefix_caching, seed=seed)
            profile = calibrate_inprocess(args, quick=quick, seed=seed, vllm_python=vllm_python, workdir=workdir,
                                          echo=echo)
        else:
            from calibrate.vllm_blackbox import CPU_BUILD_TOKENS, calibrate_blackbox
            from calibrate.vllm_calibration import onednn_note

            if device.startswith("cpu"):
                echo(f"note: {onednn_note()}")
            if build_tokens is None:
                build_tokens = CPU_BUILD_TOKENS if device.startswith("cpu") else 0
            profile = calibrate_blackbox(url, model=model, dtype=dtype, quick=quick, seed=seed,
                                         max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                         workdir=workdir, echo=echo,
                                         device=None if device == "auto" else device, build_tokens=build_tokens)
    except (ValueError, CalibrationError) as e:
        raise click.ClickException(str(e)) from None
    from calibrate.live import count_origins

    info = profile.engine or {}
    origins = ", ".join(f"{n} {origin}" for origin, n in count_origins(profile.samples).items())
    click.echo(f"vLLM {info.get('vllm_version')} ({info.get('mode')}) on {profile.device}, {profile.dtype}: "
               f"{len(profile.samples)} steps ({origins}) in {profile.calibration_s or 0:.1f} s"
               f"{_phases(profile.phases_s, None)}")
    click.echo("settings: " + ", ".join(f"{k} {v}" for k, v in info.get("settings", {}).items()))
    _print_errors(profile.errors)
    check = profile.fit_check
    if check is not None and not check["passed"]:
        problems = "; ".join(poor_fit_problems(check))
        if not accept_poor_fit:
            raise click.ClickException(f"poor fit: {problems}. The profile was not written: the machine was probably "
                                       "busy (recalibrate on an idle one), or pass --accept-poor-fit.")
        profile = dataclasses.replace(profile, fit_check=check | {"accepted_poor_fit": True})
        click.echo(f"poor fit accepted (--accept-poor-fit): {problems}", err=True)
    save_profile(profile, output)
    if samples_csv is not None:
        write_samples(samples_csv, profile.samples)
    click.echo(f"wrote {output}")


def _phases(phases_s: dict | None, drift: dict | None) -> str:
    parts = [f"{name} {s:.1f} s" for name, s in (phases_s or {}).items() if s is not None]
    if drift is not None and drift.get("control_s") is not None:
        parts.append(f"control steps {drift['control_s']:.1f} s")
    return f" ({', '.join(parts)})" if parts else ""


@calibrate.command("fit")
@click.argument("samples_path", metavar="SAMPLES.csv", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", default=None, metavar="NAME|PATH",
              help="The model the steps ran, a preset or a config.json (sets kv_bytes_per_token, which swap "
                   "pricing needs; picks a splitwise file's rows).")
@click.option("--tp", type=click.IntRange(min=1), default=None,
              help="Tensor-parallel GPUs the steps ran on, recorded in the profile; picks a splitwise file's "
                   "rows [default: 1, or the file's only degree].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="bfloat16",
              show_default=True)
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--device-name", default="unknown", show_default=True, help="Where the steps were measured.")
@click.option("--kv-memory-gib", type=click.FloatRange(0, min_open=True), default=None,
              help="KV pool memory of the measured engine, all its GPUs together (sets num_kv_blocks with "
                   "--model).")
@click.option("--host-link-gbps", type=click.FloatRange(0, min_open=True), default=None,
              help="Host<->device copy rate for swaps, GB/s (default 25, PCIe Gen4 x16).")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True, help="Cross-validation folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Cross-validation split.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True)
def fit_command(samples_path: Path, model: str | None, tp: int | None, dtype: str, block_size: int, device_name: str,
                kv_memory_gib: float | None, host_link_gbps: float | None, folds: int, seed: int, output: Path) -> None:
    """Fit a profile to step timings in SAMPLES.csv (one row per step).

    Columns: prefill_tokens, prefill_seqs, prefill_context_tokens, decode_seqs,
    decode_context_tokens, step_ms (or step_s); optional prefill_attention_tokens (exact
    attention work, sum of chunk * (context + (chunk + 1) / 2); else estimated), step_ms_min,
    step_ms_max, repeats. The steps.csv of `servesim run` works as it is, and so does
    splitwise-sim's performance-model CSV (--model and --tp pick its rows).
    """
    from calibrate.calibration import profile_from_samples
    from calibrate.profile import save_profile
    from calibrate.samples import Sample, read_samples
    from calibrate.splitwise import is_splitwise, read_splitwise

    try:
        if is_splitwise(samples_path):
            found = read_splitwise(samples_path, model, tp)
            samples = [Sample(shape, ms) for shape, ms in found.steps]
            tp = found.tp
        else:
            samples = read_samples(samples_path)
        if model is not None:
            get_model(model)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    profile = profile_from_samples(
        samples, source=str(samples_path), model=model, dtype=dtype, block_size=block_size, device=device_name,
        kv_memory_bytes=None if kv_memory_gib is None else int(kv_memory_gib * 2**30),
        host_link_bytes_per_s=None if host_link_gbps is None else host_link_gbps * 1e9, folds=folds, seed=seed)
    profile = dataclasses.replace(profile, tp=tp or 1)
    save_profile(profile, output)
    click.echo(f"fitted {len(samples)} steps from {samples_path} (tp {profile.tp})")
    _print_errors(profile.errors)
    click.echo(f"wrote {output}")

