"""``servesim validate``: serve a trace slice on the live engine and in the simulator (priced by
a calibrated profile) with the same policy, seed and KV pool, and report how far apart they are.

Writes ``validation.json`` (each metric's live, sim and relative error, and the per-step
error), the two run directories ``live/`` (with ``steps.csv``) and ``sim/``, and PNG plots:
CDFs of TTFT and E2EL, live against simulated, and every live step's predicted time against
its measured time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from experiments.options import policy_choice, policy_help, preempt_help, token_budget_help
from experiments.output import write_json, write_run
from sim.config import Capacity
from sim.metrics import request_latencies
from sim.models import MODELS, get_model
from sim.policies.base import PREEMPT_MODES, SchedulerConfig
from sim.queues import ORDERS
from sim.request import Status
from sim.workload import TraceReplay

DEFAULT_LOAD = 0.7
TINY_MAX_PROMPT_TOKENS = 1024
TINY_MAX_OUTPUT_TOKENS = 512
"""Azure conversation lengths scaled so the longest request of a slice fits the tiny model's
2048 positions: prompts x ~0.25, outputs x ~0.86 on the default slice. 200 requests then take
about 15 s live on a 2-core CPU at 70% load. (Prompts up to 1536 fit too, but prefills of
1000+ tokens are where the quick calibration grid is weakest: TTFT errors triple.)"""
SHIPPED_PROFILES = {"tiny": "tiny-cpu.json"}


def shipped_profile(model: str) -> Path | None:
    """The profile shipped for ``model`` on CPU, if any: in the source tree's ``profiles/``,
    the ``calibrate`` package data, or ``./profiles``."""
    name = SHIPPED_PROFILES.get(model)
    if name is None:
        return None
    import calibrate

    root = Path(__file__).resolve().parents[2]
    for candidate in (root / "profiles" / name, Path(calibrate.__file__).parent / "data" / name,
                      Path("profiles") / name):
        if candidate.is_file():
            return candidate
    return None


def default_lengths(model: str, max_prompt_tokens: int | None,
                    max_output_tokens: int | None) -> tuple[int | None, int | None]:
    """``tiny`` gets Azure lengths scaled to its 2048 positions unless told otherwise."""
    if model == "tiny":
        return (max_prompt_tokens or TINY_MAX_PROMPT_TOKENS, max_output_tokens or TINY_MAX_OUTPUT_TOKENS)
    return max_prompt_tokens, max_output_tokens


@dataclass
class Plan:
    """A resolved validation: what runs where, before anything runs."""

    profile_path: Path
    profile: Any
    workload: TraceReplay
    scheduler: SchedulerConfig
    capacity: Capacity
    setup: Any  # experiments.validation.LiveSetup
    load: float | None
    capacity_rps: float | None
    prompt_scale: float = 1.0
    output_scale: float = 1.0

    def describe(self) -> dict[str, Any]:
        return {
            "profile": str(self.profile_path), "profile_device": self.profile.device,
            "profile_created_utc": self.profile.created_utc,
            "workload": dataclasses.asdict(self.workload) | {"prompt_scale": self.prompt_scale,
                                                               "output_scale": self.output_scale},
            "scheduler": dataclasses.asdict(self.scheduler), "kv": dataclasses.asdict(self.capacity),
            "live": dataclasses.asdict(self.setup), "load": self.load,
            "saturation_request_throughput": self.capacity_rps,
        }


def make_plan(profile_path: Path, model: str, device: str | None, dtype: str | None, threads: int | None,
              workload: TraceReplay, scheduler: SchedulerConfig, kv_blocks: int | None, load: float | None,
              seed: int) -> Plan:
    """Check the profile against the model, size the KV pool, and time-scale the slice to
    ``load`` x the simulated saturation throughput (when ``load`` is given).

    Raises ValueError (ProfileError included) with a message for people."""
    from calibrate.profile import CalibratedCost, load_profile
    from experiments.validation import (
        CPU_MAX_KV_BLOCKS,
        LiveSetup,
        default_kv_blocks,
        saturation_throughput,
        time_scale_for_load,
    )

    profile = load_profile(profile_path)
    spec = get_model(model)
    if profile.model is not None and profile.model != model:
        raise ValueError(f"{profile_path} was calibrated for model {profile.model!r}, not {model!r}")
    if dtype is not None and dtype != profile.dtype:
        raise ValueError(f"{profile_path} was calibrated in {profile.dtype}, not {dtype} (omit --dtype to use it)")
    on_cpu = profile.device.startswith("cpu")
    device = device or ("cpu" if on_cpu else "cuda")
    if threads is None and device == "cpu":
        threads = profile.torch_threads
    replay = workload.replay()
    requests = replay.requests
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    if longest > spec.max_position:
        raise ValueError(f"a request of the slice needs {longest} positions; {spec.name} has {spec.max_position} "
                         "(lower --max-prompt-tokens / --max-output-tokens)")
    block_size = profile.block_size
    kv_bytes = profile.kv_bytes_per_token or spec.kv_bytes_per_token(profile.dtype)
    if kv_blocks is None:
        kv_blocks = default_kv_blocks(requests, block_size)
        if not on_cpu and profile.num_kv_blocks:
            kv_blocks = min(max(kv_blocks, CPU_MAX_KV_BLOCKS), profile.num_kv_blocks)
    swap_blocks = kv_blocks if scheduler.preempt == "swap" else 0
    capacity = Capacity(kv_blocks, swap_blocks, block_size, kv_bytes)
    capacity_rps = None
    if load is not None:
        capacity_rps = saturation_throughput(requests, scheduler, capacity, CalibratedCost(profile))
        workload = dataclasses.replace(workload, time_scale=time_scale_for_load(workload, load, capacity_rps))
    setup = LiveSetup(model=model, device=device, dtype=profile.dtype, threads=threads, seed=seed)
    return Plan(profile_path, profile, workload, scheduler, capacity, setup, load, capacity_rps,
                replay.prompt_scale, replay.output_scale)


def write_outputs(out: Path, plan: Plan, v: Any) -> list[Path]:
    """validation.json, live/ and sim/ run directories, and the plots; returns the plots."""
    from experiments.output import write_steps
    from experiments.plots import cdf_plot, step_scatter
    from experiments.validation import PERCENTILES
    from sim.metrics import summarize

    out.mkdir(parents=True, exist_ok=True)
    config = {"command": "validate", **plan.describe()}
    for k, live in enumerate(v.live_runs or [v.live]):
        directory = out / ("live" if k == 0 else f"live-{k + 1}")
        summary = summarize(live.requests, live.itl(), PERCENTILES, None, live.num_preemptions)
        write_run(directory, config | {"executor": "live", "live_run": k + 1}, live.requests, summary,
                  [s.timeseries for s in live.replicas])
        write_steps(directory / "steps.csv", live.step_log)
    write_run(out / "sim", config | {"executor": "sim"}, v.sim.requests, v.sim_summary,
              [s.timeseries for s in v.sim.replicas])
    write_json(out / "validation.json", v.to_json({"setup": config}))

    def latencies(result: Any) -> tuple[list[float], list[float]]:
        done = [request_latencies(r) for r in result.requests if r.status is Status.FINISHED]
        return [t * 1000 for t, _, _ in done], [e * 1000 for _, _, e in done]

    live_ttft, live_e2el = [], []  # every live run's requests together
    for live in v.live_runs or [v.live]:
        ttft, e2el = latencies(live)
        live_ttft += ttft
        live_e2el += e2el
    sim_ttft, sim_e2el = latencies(v.sim)
    policy = plan.scheduler.policy
    return [
        cdf_plot(out / "ttft-cdf.png", {"live": live_ttft, "simulated": sim_ttft}, "TTFT (ms)",
                 f"TTFT, live vs simulated ({policy})", log_x=True),
        cdf_plot(out / "e2el-cdf.png", {"live": live_e2el, "simulated": sim_e2el}, "E2EL (ms)",
                 f"End-to-end latency, live vs simulated ({policy})", log_x=True),
        step_scatter(out / "step-scatter.png", v.steps.measured_s, v.steps.predicted_s,
                     v.steps.kinds,
                     f"Every live step: profile's prediction vs measured ({policy})"),
    ]


def execute(plan: Plan, out: Path, progress: bool = True, echo=click.echo, repeats: int = 1):
    """Run the plan live (``repeats`` times) and simulated, print the table, write everything;
    returns the Validation."""
    from calibrate.profile import CalibratedCost
    from experiments.validation import format_table, validate

    n = plan.workload.num_requests
    if plan.load is not None:
        echo(f"saturation (simulated, all {n} requests queued at once): {plan.capacity_rps:.2f} req/s; "
             f"time scale {plan.workload.time_scale:.3g} for {plan.load:.0%} load")
    times = f"{repeats} times" if repeats > 1 else "once"
    echo(f"serving {n} requests live {times} ({plan.setup.model} on {plan.setup.device}, {plan.scheduler.policy}, "
         f"{plan.capacity.num_blocks} KV blocks), then simulating them ...")
    t0 = time.perf_counter()
    v = validate(plan.workload.requests(), plan.scheduler, plan.capacity, CalibratedCost(plan.profile),
                 plan.setup, progress, plan.profile.samples, repeats)
    serving = " + ".join(f"{r.replicas[0].busy_s:.1f}" for r in v.live_runs)
    echo(f"live engine busy {serving} s ({time.perf_counter() - t0:.1f} s wall, simulation included)")
    echo(format_table(v))
    write_outputs(out, plan, v)
    more = "".join(f", live-{k}/" for k in range(2, repeats + 1)) if repeats <= 3 else f", live-2/ .. live-{repeats}/"
    echo(f"wrote {out}/: validation.json, live/{more}, sim/, ttft-cdf.png, e2el-cdf.png, step-scatter.png")
    return v


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
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-o", "--output", default="servesim-validate", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="Directory to write.")
def validate(profile_path: Path | None, model: str, device: str | None, dtype: str | None, threads: int | None,
             trace: str, start: int, num_requests: int, max_prompt_tokens: int | None,
             max_output_tokens: int | None, policy: str, order: str, preempt: str | None, max_num_seqs: int,
             token_budget: int | None, batch_size: int, max_wait_s: float, kv_blocks: int | None,
             load: float | None, time_scale: float | None, seed: int, repeats: int, progress: bool,
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
    click.echo(f"profile {profile_path} ({plan.profile.model} on {plan.profile.device}, {plan.profile.dtype})")
    execute(plan, output, progress, repeats=repeats)
