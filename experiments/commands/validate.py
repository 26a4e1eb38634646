"""``servesim validate``: serve a trace slice on the live engine and in the simulator (priced by
a calibrated profile) with the same policy, seed and KV pool, and report how far apart they are.

Writes ``validation.json`` (each metric's live, sim and relative error, and the per-step
error), the two run directories ``live/`` (with ``steps.csv``) and ``sim/``, and PNG plots:
CDFs of TTFT and E2EL, live against simulated, and every live step's predicted time against
its measured time.
"""

from __future__ import annotations

from pathlib import Path

import click

from experiments.options import (
    policy_choice,
    policy_help,
    preempt_help,
    progress_option,
    resolve_progress,
    token_budget_help,
)
from experiments.validation.plan import (
    DEFAULT_LOAD,
    SHIPPED_PROFILES,
    TINY_MAX_OUTPUT_TOKENS,
    TINY_MAX_PROMPT_TOKENS,
    default_lengths,
    make_plan,
    shipped_profile,
)
from sim.models import MODELS
from sim.policies.base import PREEMPT_MODES, SchedulerConfig
from sim.queues import ORDERS
from sim.workload import TraceReplay


@click.command("validate")
@click.option("--profile", "profile_path", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Calibrated profile JSON [default for --model tiny on CPU: the shipped profiles/tiny-cpu.json].")
@click.option("--model", default="tiny", show_default=True, type=click.Choice(list(MODELS)),
              help="Architecture preset (random weights); must be the profile's.")
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
              help=f"Scale prompts down so the longest is this [tiny: {TINY_MAX_PROMPT_TOKENS}].")
@click.option("--max-output-tokens", default=None, type=click.IntRange(min=1),
              help=f"Scale outputs down so the longest is this [tiny: {TINY_MAX_OUTPUT_TOKENS}].")
@click.option("--policy", default="continuous", show_default=True, type=policy_choice(), help=policy_help())
@click.option("--order", default="fcfs", show_default=True, type=click.Choice(list(ORDERS)))
@click.option("--preempt", default=None, type=click.Choice(list(PREEMPT_MODES)), help=preempt_help())
@click.option("--max-num-seqs", default=256, show_default=True, type=click.IntRange(min=1))
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
@click.option("--repeats", default=1, show_default=True, type=click.IntRange(min=1),
              help="Serve the slice this many times live and compare the simulation with the runs' mean; the "
                   "table then shows how far apart the live runs were (a shared or throttled device does not "
                   "reproduce itself).")
@progress_option
@click.option("-o", "--output", default="servesim-validate", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
def validate(profile_path: Path | None, model: str, device: str | None, dtype: str | None, threads: int | None,
             trace: str, start: int, num_requests: int, max_prompt_tokens: int | None,
             max_output_tokens: int | None, policy: str, order: str, preempt: str | None, max_num_seqs: int,
             token_budget: int | None, batch_size: int, max_wait_s: float, kv_blocks: int | None,
             load: float | None, time_scale: float | None, seed: int, repeats: int, progress: bool | None,
             output: Path) -> None:
    """Check the simulator against the live engine on the same trace slice.

    Serves the slice on the real engine, simulates it with the profile's cost model (same
    policy, seed and KV blocks), and reports for each metric live, simulated and relative
    error (sim - live) / live, plus the error of the profile on every step the live engine ran.

    \b
      servesim validate                                  # tiny, 200 azure-conv requests, 70% load
      servesim validate --policy chunked --load 0.5 -o out/
    """
    if load is not None and time_scale is not None:
        raise click.UsageError("give --load or --time-scale, not both")
    if load is None and time_scale is None:
        load = DEFAULT_LOAD
    if profile_path is None:
        profile_path = shipped_profile(model) if device in (None, "cpu") else None
        if profile_path is None:
            raise click.UsageError(f"--profile is required for --model {model}"
                                   + ("" if model in SHIPPED_PROFILES else " (no profile is shipped for it)")
                                   + f"; make one with: servesim calibrate --model {model} -o PROFILE")
    elif not profile_path.is_file():
        raise click.BadParameter(f"{profile_path} does not exist (make one with servesim calibrate)",
                                 param_hint="--profile")
    mp, mo = default_lengths(model, max_prompt_tokens, max_output_tokens)
    try:
        sched = SchedulerConfig(policy=policy, order=order, max_num_seqs=max_num_seqs, token_budget=token_budget,
                                batch_size=batch_size, max_wait_s=max_wait_s,
                                preempt=preempt)
        workload = TraceReplay(trace=trace, start=start, num_requests=num_requests, time_scale=time_scale or 1.0,
                               max_prompt_tokens=mp, max_output_tokens=mo)
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
    execute(plan, output, resolve_progress(progress), echo=click.echo, repeats=repeats)
