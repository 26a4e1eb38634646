"""Click options shared by the commands that take a workload and a scheduling policy, and the
builders that turn them into config objects."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from sim.policies import POLICIES, SchedulerConfig
from sim.policies.base import PREEMPT_MODES
from sim.queues import ORDERS
from sim.workload import ARRIVALS, SyntheticWorkload, TraceReplay

DEFAULT_TRACE = "azure-conv"


def _apply(options: list[Callable]) -> Callable:
    def deco(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return deco


def workload_options(f: Callable) -> Callable:
    return _apply([
        click.option("--trace", default=None, metavar="NAME|PATH",
                     help=f"Trace to replay (embedded name or file). Default: {DEFAULT_TRACE}, unless --arrival "
                          "is given for a synthetic workload."),
        click.option("--trace-format", default="auto", show_default=True,
                     type=click.Choice(["auto", "servesim", "azure", "mooncake", "lengths"]),
                     help="Trace file format."),
        click.option("--start", default=0, show_default=True, type=click.IntRange(min=0),
                     help="First trace row to replay."),
        click.option("--num-requests", "-n", default=None, type=click.IntRange(min=1),
                     help="Requests to replay or generate (default: the whole trace, or 1000 synthetic)."),
        click.option("--time-scale", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Speed the trace up by this factor (arrival_s / time_scale)."),
        click.option("--max-prompt-tokens", default=None, type=click.IntRange(min=1),
                     help="Scale trace prompt lengths down proportionally so the longest is this."),
        click.option("--max-output-tokens", default=None, type=click.IntRange(min=1),
                     help="Scale trace output lengths down proportionally so the longest is this."),
        click.option("--arrival", default=None, type=click.Choice(list(ARRIVALS)),
                     help="Synthetic arrival process (or arrivals for a length-only trace)."),
        click.option("--rate", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Synthetic request rate, requests per second."),
        click.option("--burstiness", default=1.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                     help="Gamma shape k of inter-arrival times (1 = Poisson; lower = burstier)."),
        click.option("--duration", "duration_s", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Generate synthetic arrivals for this many seconds instead of -n requests."),
        click.option("--prompt-tokens", default="uniform:128:1024", show_default=True, metavar="DIST",
                     help="Synthetic prompt lengths: N, fixed:N, uniform:A:B, zipf:A:MAX, empirical:FILE."),
        click.option("--output-tokens", default="uniform:16:256", show_default=True, metavar="DIST",
                     help="Synthetic output lengths, same forms."),
    ])(f)


def policy_choice() -> click.Choice:
    """``--policy``'s choices: every registered policy."""
    return click.Choice(sorted(POLICIES))


def policy_help() -> str:
    return "Scheduling policy: " + "; ".join(f"{name}: {info.summary}" for name, info in sorted(POLICIES.items())) + "."


def preempt_help() -> str:
    defaults = ", ".join(f"{name} {info.preempt_modes[0]}" + ("" if len(info.preempt_modes) > 1 else " only")
                         for name, info in sorted(POLICIES.items()))
    return f"What to do when KV blocks run out [default per policy: {defaults}]."


def token_budget_help() -> str:
    defaults = ", ".join(f"{name}: {info.default_token_budget}" for name, info in sorted(POLICIES.items())
                         if info.default_token_budget is not None)
    return f"Most tokens per step [default: no limit; {defaults}]."


def policy_options(f: Callable) -> Callable:
    return _apply([
        click.option("--policy", default="continuous", show_default=True, type=policy_choice(), help=policy_help()),
        click.option("--order", default="fcfs", show_default=True, type=click.Choice(list(ORDERS)),
                     help="Queue order (sjf uses the trace's true output length: an oracle)."),
        click.option("--preempt", default=None, type=click.Choice(list(PREEMPT_MODES)), help=preempt_help()),
        click.option("--max-num-seqs", default=256, show_default=True, type=click.IntRange(min=1),
                     help="Most requests running at once (continuous, chunked)."),
        click.option("--token-budget", default=None, type=click.IntRange(min=1), help=token_budget_help()),
        click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
                     help="Static batching: requests per batch."),
        click.option("--max-wait-s", default=1.0, show_default=True, type=click.FloatRange(min=0),
                     help="Static batching: longest wait for a batch to fill."),
    ])(f)


def build_workload(opts: dict[str, Any], seed: int) -> SyntheticWorkload | TraceReplay:
    """The workload the options describe: a trace replay unless a synthetic arrival was asked for."""
    trace = opts.get("trace")
    if trace is None and opts.get("arrival") is not None:
        return SyntheticWorkload(
            arrival=opts["arrival"], rate=opts["rate"], burstiness=opts["burstiness"],
            num_requests=None if opts.get("duration_s") else (opts.get("num_requests") or 1000),
            duration_s=opts.get("duration_s"), prompt_dist=opts["prompt_tokens"],
            output_dist=opts["output_tokens"], seed=seed,
        )
    return TraceReplay(
        trace=trace or DEFAULT_TRACE, fmt=opts.get("trace_format", "auto"), time_scale=opts.get("time_scale", 1.0),
        start=opts.get("start", 0), num_requests=opts.get("num_requests"),
        arrival=opts.get("arrival") or "poisson", rate=opts.get("rate", 1.0),
        burstiness=opts.get("burstiness", 1.0), seed=seed,
        max_prompt_tokens=opts.get("max_prompt_tokens"), max_output_tokens=opts.get("max_output_tokens"),
    )


def build_scheduler(opts: dict[str, Any], policy: str | None = None, preempt: str | None = None) -> SchedulerConfig:
    policy = policy or opts["policy"]
    return SchedulerConfig(
        policy=policy, order=opts["order"], max_num_seqs=opts["max_num_seqs"], token_budget=opts["token_budget"],
        batch_size=opts["batch_size"], max_wait_s=opts["max_wait_s"],
        preempt=preempt or opts.get("preempt"),
    )


def workload_requests(workload: SyntheticWorkload | TraceReplay):
    """(requests, description for config.json)."""
    import dataclasses

    if isinstance(workload, TraceReplay):
        replay = workload.replay()
        info = dataclasses.asdict(workload) | {
            "kind": "trace", "rows": replay.rows, "source": str(replay.source), "format": replay.fmt,
            "prompt_scale": replay.prompt_scale, "output_scale": replay.output_scale, "clamped": replay.clamped,
        }
        return replay.requests, info
    return workload.generate(), dataclasses.asdict(workload) | {"kind": "synthetic"}


def fail(e: Exception) -> click.ClickException:
    """A user-facing error from a validation error deeper down."""
    return click.ClickException(str(e))
