"""``servesim validate``: serve a trace slice on the live engine and in the simulator (priced by
a calibrated profile) with the same policy, seed and KV pool, and report how far apart they are.

States PASS or FAIL against stated tolerances (``--tolerance``; ``--strict`` exits 1 on FAIL).
Writes ``validation.json`` (each metric's live, sim and relative error, the per-step error, the
verdict with its tolerances and every check), the two run directories ``live/`` (with
``steps.csv``) and ``sim/``, and PNG plots: CDFs of TTFT and E2EL, live against simulated, and
every live step's predicted time against its measured time.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from experiments.options import (
    policy_choice,
    policy_help,
    preempt_help,
    progress_option,
    resolve_progress,
    token_budget_help,
)
from experiments.validation.external import EXTERNAL_WARMUP_RUNS
from experiments.validation.plan import (
    DEFAULT_LOAD,
    DEFAULT_MAX_LENGTHS,
    SHIPPED_PROFILES,
    default_lengths,
    make_plan,
    shipped_profile,
)
from experiments.validation.verdict import DEFAULT_TOLERANCES_PCT, Tolerances
from sim.models import MODELS
from sim.policies.base import PREEMPT_MODES, SchedulerConfig
from sim.queues import ORDERS
from sim.workload import ARRIVALS, TraceReplay

DEFAULT_REPEATS = 3
"""Live runs by default: one run cannot tell the simulator's error from the device's."""
_DEFAULT_LENGTHS = ", ".join(f"{m}: {p}" for m, (p, _) in DEFAULT_MAX_LENGTHS.items())
_DEFAULT_OUTPUTS = ", ".join(f"{m}: {o}" for m, (_, o) in DEFAULT_MAX_LENGTHS.items())
_TOLERANCES = ", ".join(f"{k}:{v:g}" for k, v in DEFAULT_TOLERANCES_PCT.items())


def _profile_model(path: Path) -> str | None:
    """The model a profile was calibrated for (None: unknown or unreadable; make_plan says why)."""
    import json

    try:
        model = json.loads(path.read_text()).get("model")
    except (OSError, ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model in MODELS else None


@click.command("validate")
@click.option("--profile", "profile_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibrated profile JSON [default for --model tiny on CPU: the shipped profiles/tiny-cpu.json; "
                   "for small: make one with servesim calibrate --model small --quick].")
@click.option("--model", default=None, metavar="PRESET|DIR",
              help=f"Architecture preset (random weights; {', '.join(MODELS)}), must be the profile's [default: the "
                   "profile's, else tiny]; with --engine vllm, the checkpoint directory vLLM serves.")
@click.option("--engine", default="servesim", show_default=True, type=click.Choice(["servesim", "vllm"]),
              help="servesim: its live engine in process; vllm: start a vLLM server (--model DIR) and validate "
                   "against it over HTTP with the vllm policy.")
@click.option("--url", default=None, metavar="URL",
              help="Validate against a server already running (its settings read from /metrics and /v1/models; "
                   "nothing started or stopped), with the vllm policy.")
@click.option("--vllm-python", default=None, metavar="PATH",
              help="--engine vllm: the python of an environment with vLLM [default: this one if it has vllm, "
                   "else $SERVESIM_VLLM_PYTHON].")
@click.option("--kv-cache-gib", default=2, show_default=True, type=click.IntRange(min=1),
              help="--engine vllm: KV cache memory (VLLM_CPU_KVCACHE_SPACE and kv_cache_memory_bytes).")
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="--engine vllm: the server's max_model_len [default: the profile's engine's, else 2048].")
@click.option("--startup-timeout", "startup_timeout_s", default=600.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True), help="--engine vllm: seconds to wait for the server.")
@click.option("--device", default=None, help="cpu | cuda[:N] [default: the profile's kind of device].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="[default: the profile's]")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads [default: the profile's calibration threads].")
@click.option("--trace", default="azure-conv", show_default=True, metavar="NAME|PATH", help="Trace to replay.")
@click.option("--start", default=0, show_default=True, type=click.IntRange(min=0), help="First trace row.")
@click.option("--num-requests", "-n", default=200, show_default=True, type=click.IntRange(min=2),
              help="Rows of the trace to replay.")
@click.option("--max-prompt-tokens", default=None, type=click.IntRange(min=1),
              help=f"Scale prompts down so the longest is this [{_DEFAULT_LENGTHS}].")
@click.option("--max-output-tokens", default=None, type=click.IntRange(min=1),
              help=f"Scale outputs down so the longest is this [{_DEFAULT_OUTPUTS}].")
@click.option("--arrival", default="poisson", show_default=True, type=click.Choice(list(ARRIVALS)),
              help="Arrival process for a length-only trace (no timestamps); --load sets its rate.")
@click.option("--burstiness", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Gamma shape k for --arrival gamma (< 1: burstier than Poisson).")
@click.option("--policy", default="continuous", show_default=True, type=policy_choice(), help=policy_help())
@click.option("--order", default="fcfs", show_default=True, type=click.Choice(list(ORDERS)))
@click.option("--preempt", default=None, type=click.Choice(list(PREEMPT_MODES)), help=preempt_help())
@click.option("--max-num-seqs", default=None, type=click.IntRange(min=1),
              help="[default: 256; vLLM engines: the profile's engine's, else vLLM's CPU default 128]")
@click.option("--token-budget", default=None, type=click.IntRange(min=1), help=token_budget_help())
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Static batching.")
@click.option("--max-wait-s", default=1.0, show_default=True, type=click.FloatRange(min=0), help="Static batching.")
@click.option("--kv-blocks", default=None, type=click.IntRange(min=1),
              help="KV blocks of the pool, live and simulated [default: room for the whole slice, at most 2048].")
@click.option("--load", default=None, type=click.FloatRange(min=0, min_open=True),
              help=f"Time-scale the slice to this fraction of the simulated saturation throughput "
                   f"[default: {DEFAULT_LOAD} unless --time-scale].")
@click.option("--time-scale", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Speed the trace up by this factor instead of --load.")
@click.option("--seed", default=0, show_default=True, type=int, help="Weights and prompt token ids.")
@click.option("--repeats", default=DEFAULT_REPEATS, show_default=True, type=click.IntRange(min=1),
              help="Serve the slice this many times live and compare the simulation with the runs' mean; the "
                   "table shows how far apart the live runs were (a shared or throttled device does not "
                   "reproduce itself).")
@click.option("--warmup-runs", default=None, type=click.IntRange(min=0),
              help="--engine vllm / --url: replay the slice this many times first, not compared; their mean TTFT "
                   f"and TPOT are shown [default: {EXTERNAL_WARMUP_RUNS}: a vLLM server's first replays after "
                   "start or calibration ran 5-14% slower than its later ones].")
@click.option("--build-tokens", default=None, type=click.IntRange(min=0),
              help="--engine vllm / --url: first run one step of every token count up to N on the server (lone "
                   "prompts of 1..N tokens), so that vLLM's CPU backend has built its kernel for each before the "
                   "replays [default: 512 with a CPU profile, else 0; 0 for a server already built, e.g. by "
                   "calibrate --url].")
@click.option("--tolerance", "tolerances", multiple=True, metavar="NAME:PCT",
              help=f"Largest accepted |error| for the verdict, repeatable: mean (mean TTFT, TPOT, E2EL and "
                   f"throughputs), p99 (p99 TTFT, TPOT, E2EL), step (median per-step error) "
                   f"[default: {_TOLERANCES}].")
@click.option("--strict", is_flag=True, help="Exit with status 1 when the verdict is FAIL (for scripts and CI).")
@progress_option
@click.option("-o", "--output", default="servesim-validate", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
def validate(profile_path: Path | None, model: str | None, engine: str, url: str | None, vllm_python: str | None,
             kv_cache_gib: int, max_model_len: int | None, startup_timeout_s: float, device: str | None,
             dtype: str | None,
             threads: int | None, trace: str, start: int, num_requests: int, max_prompt_tokens: int | None,
             max_output_tokens: int | None, arrival: str, burstiness: float, policy: str, order: str,
             preempt: str | None, max_num_seqs: int | None, token_budget: int | None, batch_size: int,
             max_wait_s: float,
             kv_blocks: int | None, load: float | None, time_scale: float | None, seed: int, repeats: int,
             warmup_runs: int | None, build_tokens: int | None, tolerances: tuple[str, ...], strict: bool,
             progress: bool | None, output: Path) -> None:
    """Check the simulator against the live engine on the same trace slice, with a verdict.

    Serves the slice on the real engine (3 times by default), simulates it with the profile's
    cost model (same policy, seed and KV blocks), and reports for each metric live, simulated,
    relative error (sim - live) / live and the live runs' spread, plus the error of the profile
    on every step the live engine ran; then PASS or FAIL against the tolerances.

    \b
      servesim validate                                  # tiny, 200 azure-conv requests, 70% load
      servesim calibrate --model small --quick -o small.json
      servesim validate --profile small.json --policy chunked --load 0.5 --strict -o out/
      servesim validate --engine vllm --model ckpt-small --profile vllm-cpu.json -n 30 -o out/
      servesim validate --url http://127.0.0.1:8000 --profile vllm-cpu.json -n 30 -o out/
    """
    if load is not None and time_scale is not None:
        raise click.UsageError("give --load or --time-scale, not both")
    if load is None and time_scale is None:
        load = DEFAULT_LOAD
    try:
        tol = Tolerances.parse(tolerances)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tolerance") from None
    if url is not None or engine == "vllm":
        if url is not None and engine == "vllm":
            raise click.UsageError("give --engine vllm (servesim starts the server) or --url (one you run), not both")
        if policy != "continuous" and policy != "vllm":
            raise click.BadParameter("an external engine is simulated with the vllm policy", param_hint="--policy")
        external = ExternalArgs(url, model, vllm_python, kv_cache_gib, max_model_len, startup_timeout_s, dtype,
                                max_num_seqs, token_budget, order, seed,
                                EXTERNAL_WARMUP_RUNS if warmup_runs is None else warmup_runs, build_tokens)
        workload_args = dict(trace=trace, start=start, num_requests=num_requests, time_scale=time_scale or 1.0,
                             arrival=arrival, burstiness=burstiness, seed=seed)
        _validate_external(external, profile_path, workload_args, max_prompt_tokens, max_output_tokens, load,
                           repeats, tol, strict, progress, output)
        return
    for name, given in (("--warmup-runs", warmup_runs), ("--build-tokens", build_tokens)):
        if given:
            raise click.BadParameter("only against a served engine (--engine vllm or --url); servesim's live "
                                     "engine warms up every shape before it serves", param_hint=name)
    if model is not None and model not in MODELS:
        raise click.BadParameter(f"{model!r} is not a preset (known: {', '.join(MODELS)}); a checkpoint directory "
                                 "is for --engine vllm", param_hint="--model")
    max_num_seqs = max_num_seqs or 256
    if model is None:
        model = (_profile_model(profile_path) if profile_path is not None and profile_path.is_file() else None) \
            or "tiny"
    if profile_path is None:
        profile_path = shipped_profile(model) if device in (None, "cpu") else None
        if profile_path is None:
            quick = " --quick --threads 1" if model in DEFAULT_MAX_LENGTHS else ""
            raise click.UsageError(f"--profile is required for --model {model}"
                                   + ("" if model in SHIPPED_PROFILES else " (no profile is shipped for it)")
                                   + f"; make one with: servesim calibrate --model {model}{quick} -o PROFILE")
    elif not profile_path.is_file():
        raise click.BadParameter(f"{profile_path} does not exist (make one with servesim calibrate)",
                                 param_hint="--profile")
    mp, mo = default_lengths(model, max_prompt_tokens, max_output_tokens)
    try:
        sched = SchedulerConfig(policy=policy, order=order, max_num_seqs=max_num_seqs, token_budget=token_budget,
                                batch_size=batch_size, max_wait_s=max_wait_s,
                                preempt=preempt)
        workload = TraceReplay(trace=trace, start=start, num_requests=num_requests, time_scale=time_scale or 1.0,
                               arrival=arrival, burstiness=burstiness, seed=seed, max_prompt_tokens=mp,
                               max_output_tokens=mo)
        plan = make_plan(profile_path, model, device, dtype, threads, workload, sched, kv_blocks, load, seed)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    try:
        import torch  # noqa: F401
    except ImportError:
        raise click.ClickException("validate runs the live engine, which needs torch "
                                   "(pip install 'servesim[runtime]')") from None
    from experiments.validation.output import execute

    click.echo(f"profile {profile_path} ({plan.profile.model} on {plan.profile.device}, {plan.profile.dtype})")
    _, verdict = execute(plan, output, resolve_progress(progress), echo=click.echo, repeats=repeats, tolerances=tol)
    if strict and not verdict.passed:
        raise SystemExit(1)


@dataclass(frozen=True)
class ExternalArgs:
    """The options of an external-engine validation (``--engine vllm`` or ``--url``)."""

    url: str | None
    model: str | None
    vllm_python: str | None
    kv_cache_gib: int
    max_model_len: int | None
    startup_timeout_s: float
    dtype: str | None
    max_num_seqs: int | None
    max_num_batched_tokens: int | None
    order: str
    seed: int
    warmup_runs: int = 0
    build_tokens: int | None = None
    """None: :data:`~calibrate.vllm_blackbox.CPU_BUILD_TOKENS` with a CPU profile, else 0."""


def _validate_external(args: ExternalArgs, profile_path: Path | None, workload_args: dict[str, Any],
                       max_prompt_tokens: int | None, max_output_tokens: int | None, load: float | None,
                       repeats: int, tol: Tolerances, strict: bool, progress: bool | None, output: Path) -> None:
    """``validate --engine vllm`` / ``--url``: the engine over HTTP, the simulator with the vllm
    policy and the engine's settings (:mod:`experiments.validation.external`)."""
    from calibrate.errors import CalibrationError
    from calibrate.profile import ProfileError, load_profile
    from calibrate.vllm_calibration import find_vllm_python
    from experiments.loadgen import BenchConfig
    from experiments.validation.external import (
        ExternalError,
        VllmLaunch,
        engine_settings,
        execute_external,
        lengths_for,
        make_external_plan,
        vllm_server,
    )

    if profile_path is None:
        raise click.UsageError("--profile is required against an external engine; make one with: servesim calibrate "
                               "--engine vllm --model CHECKPOINT_DIR -o PROFILE (or --url URL)")
    try:
        profile = load_profile(profile_path)
    except (ProfileError, OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--profile") from None
    settings_launched = profile.engine.get("settings", {}) if isinstance(profile.engine, dict) else {}
    build = args.build_tokens
    if build is None:
        from calibrate.vllm_blackbox import CPU_BUILD_TOKENS

        build = CPU_BUILD_TOKENS if profile.device.startswith("cpu") else 0
    mp, mo = lengths_for(profile, max_prompt_tokens, max_output_tokens)
    try:
        workload = TraceReplay(**workload_args, max_prompt_tokens=mp, max_output_tokens=mo)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    max_num_seqs, max_tokens = args.max_num_seqs, args.max_num_batched_tokens
    launch = None
    if args.url is None:
        if args.model is None or not (Path(args.model) / "config.json").is_file():
            raise click.BadParameter(f"{args.model!r}: --engine vllm needs the checkpoint directory vLLM serves "
                                     "(write one with servesim checkpoint write --model small -o DIR)",
                                     param_hint="--model")
        # The server runs as the profile's engine was calibrated, unless told otherwise.
        max_num_seqs = max_num_seqs or settings_launched.get("max_num_seqs")
        max_tokens = max_tokens or settings_launched.get("max_num_batched_tokens")
        try:
            launch = VllmLaunch(python=find_vllm_python(args.vllm_python), checkpoint=Path(args.model),
                                dtype=args.dtype or profile.dtype,
                                max_model_len=args.max_model_len or settings_launched.get("max_model_len") or 2048,
                                max_num_batched_tokens=max_tokens, max_num_seqs=max_num_seqs,
                                kv_cache_gib=args.kv_cache_gib, startup_timeout_s=args.startup_timeout_s)
        except (CalibrationError, ValueError) as e:
            raise click.ClickException(str(e)) from None
    show = resolve_progress(progress)
    click.echo(f"profile {profile_path} ({profile.model} on {profile.device}, {profile.dtype})")
    if profile.engine is None:
        click.echo("note: the profile was not measured on an external engine (calibrate --engine vllm makes one)")
    elif launch is not None and profile.model and Path(profile.model).resolve() != launch.checkpoint.resolve():
        click.echo(f"note: the profile was calibrated on {profile.model}, not {launch.checkpoint}")
    try:
        with contextlib.ExitStack() as stack:
            if launch is not None:
                click.echo(f"starting vLLM ({launch.python}) on {launch.checkpoint} ...")
                url = stack.enter_context(vllm_server(launch, output / "vllm-server.log", echo=click.echo))
            else:
                assert args.url is not None
                url = args.url.rstrip("/").removesuffix("/v1")
            settings = engine_settings(url)
            try:
                plan = make_external_plan(url, profile_path, workload, settings, max_num_seqs, max_tokens,
                                          args.order, load, launch.describe() if launch else None)
                config = BenchConfig(url=url, seed=args.seed, progress=show)
            except ValueError as e:
                raise ExternalError(str(e)) from None
            _, verdict = execute_external(plan, config, output, repeats, tol, echo=click.echo,
                                          warmup=args.warmup_runs, build_tokens=build)
    except ExternalError as e:
        raise click.ClickException(str(e)) from None
    if strict and not verdict.passed:
        raise SystemExit(1)
