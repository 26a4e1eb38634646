"""Click options shared by the commands that take a workload, a scheduling policy or a
simulated cluster, and the builders that turn them into config objects (``SimConfig``,
``SchedulerConfig``, workload descriptions). Commands import these; no command imports another."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

import click

from experiments.sweep import RateScaler
from sim.cluster import ROUTERS
from sim.config import KVConfig, SimConfig, parse_policy
from sim.hardware import HARDWARE
from sim.models import DTYPE_BYTES, MODELS
from sim.policies import POLICIES, SchedulerConfig
from sim.policies.base import PREEMPT_MODES
from sim.queues import ORDERS
from sim.request import Request
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
        click.option("--priority-classes", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Synthetic priorities: each request's drawn uniformly from 0..N-1 (0 is served first "
                          "under --order priority); 1 gives every request priority 0."),
    ])(f)


def option_help(name: str, text: str) -> Callable[[Callable], Callable]:
    """Replace the help of an option that an earlier decorator attached (a command whose
    default differs from the shared one says so)."""

    def deco(f: Callable) -> Callable:
        for param in f.__click_params__:  # type: ignore[attr-defined]
            if param.name == name:
                param.help = text
        return f

    return deco


def priority_note(order: str, requests: Sequence[Request]) -> str | None:
    """A note when ``--order priority`` cannot change anything: every request has one priority."""
    if order != "priority" or len({r.priority for r in requests}) > 1:
        return None
    return ("note: --order priority orders by the requests' priorities, and every request here has the same one "
            "(for a synthetic workload give --priority-classes N; a trace needs a priority column), so it runs "
            "as fcfs")


def resolve_progress(progress: bool | None) -> bool:
    """``--progress/--no-progress``; neither: bars only when stderr is a terminal (a log gets none)."""
    return sys.stderr.isatty() if progress is None else progress


progress_option = click.option("--progress/--no-progress", default=None,
                               help="Progress bars [default: only when stderr is a terminal].")


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
        click.option("--long-prefill-token-threshold", default=0, show_default=True, type=click.IntRange(min=0),
                     help="vllm: most prefill tokens per request per step when others are running or waiting "
                          "(vLLM's knob; 0: off)."),
        click.option("--kv-watermark", default=0.0, show_default=True, type=click.FloatRange(0.0, 1.0, max_open=True),
                     help="vllm: fraction of KV blocks kept free when admitting a waiting request (vLLM's "
                          "--watermark; 0: off)."),
    ])(f)


def build_workload(opts: dict[str, Any], seed: int) -> SyntheticWorkload | TraceReplay:
    """The workload the options describe: a trace replay unless a synthetic arrival was asked for."""
    trace = opts.get("trace")
    if trace is None and opts.get("arrival") is not None:
        return SyntheticWorkload(
            arrival=opts["arrival"], rate=opts["rate"], burstiness=opts["burstiness"],
            num_requests=None if opts.get("duration_s") else (opts.get("num_requests") or 1000),
            duration_s=opts.get("duration_s"), prompt_dist=opts["prompt_tokens"],
            output_dist=opts["output_tokens"], seed=seed, priority_classes=opts.get("priority_classes", 1),
        )
    if opts.get("priority_classes", 1) > 1:
        raise ValueError("--priority-classes draws priorities for a synthetic workload (give --arrival); a trace's "
                         "priorities come from its priority column")
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
        long_prefill_token_threshold=opts.get("long_prefill_token_threshold", 0),
        kv_watermark=opts.get("kv_watermark", 0.0),
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


# -- the simulated cluster (simulate, compare, capacity) -----------------------------------------

DEFAULT_MODEL = "qwen2.5-7b"


def cluster_options(f: Callable) -> Callable:
    return _apply([
        click.option("--model", default=None, metavar="NAME|PATH",
                     help=f"Model preset ({', '.join(MODELS)}) or a Hugging Face config.json (or a checkpoint "
                          f"directory holding one): roofline cost, weights and KV bytes per token. Default: the "
                          f"profile's model, else {DEFAULT_MODEL}."),
        click.option("--hardware", default="h100-sxm", show_default=True, type=click.Choice(list(HARDWARE)),
                     help="Hardware preset for the roofline cost model."),
        click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(list(DTYPE_BYTES))),
        click.option("--profile", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Calibrated profile JSON: its cost model and KV capacity replace the roofline."),
        click.option("--kv-blocks", default=None, type=click.IntRange(min=1), help="KV blocks per replica."),
        click.option("--gpu-memory-gib", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Memory per GPU (default: the hardware preset's); KV gets 90% of it minus the weights "
                          "and the activation reserve, on every GPU of a replica."),
        click.option("--block-size", default=16, show_default=True, type=click.IntRange(1, 1024),
                     help="Tokens per KV block."),
        click.option("--swap-gib", default=4.0, show_default=True, type=click.FloatRange(min=0),
                     help="Host memory for swapped-out KV blocks (with --preempt swap)."),
        click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1)),
        click.option("--tp", default=None, type=click.IntRange(min=1),
                     help="Tensor-parallel GPUs per replica [default: the profile's tp, else 1]."),
        click.option("--pp", default=1, show_default=True, type=click.IntRange(min=1),
                     help="Pipeline stages per replica (each of --tp GPUs)."),
        click.option("--router", default="round_robin", show_default=True, type=click.Choice(list(ROUTERS))),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of synthetic workloads."),
    ])(f)


def load_profile_opt(path: str | None) -> Any:
    """The ``--profile`` file's profile (None without one); a bad file is a user-facing error."""
    if path is None:
        return None
    from calibrate.profile import load_profile

    try:
        return load_profile(path)
    except ValueError as e:
        raise fail(e) from None


def resolve_model(opts: dict[str, Any]) -> str:
    """--model, else the profile's model when it is a preset, else the default."""
    if opts.get("model"):
        return opts["model"]
    if opts.get("profile"):
        profile = load_profile_opt(opts["profile"])
        if profile is not None and profile.model in MODELS:
            return profile.model
    return DEFAULT_MODEL


def resolve_tp(opts: dict[str, Any]) -> int:
    """--tp, else the tp the profile was measured at, else 1."""
    if opts.get("tp"):
        return opts["tp"]
    profile = load_profile_opt(opts.get("profile"))
    return getattr(profile, "tp", 1) if profile is not None else 1


def build_sim_config(opts: dict[str, Any], policy: str | None = None, preempt: str | None = None) -> SimConfig:
    try:
        return SimConfig(
            scheduler=build_scheduler(opts, policy, preempt),
            kv=KVConfig(num_blocks=opts["kv_blocks"], gpu_memory_gib=opts["gpu_memory_gib"],
                        block_size=opts["block_size"], swap_gib=opts["swap_gib"]),
            model=resolve_model(opts), hardware=opts["hardware"], dtype=opts["dtype"], profile=opts["profile"],
            replicas=opts["replicas"], router=opts["router"], token_times=opts.get("token_times", False),
            exact_steps=opts.get("exact_steps", False), tp=resolve_tp(opts), pp=opts.get("pp") or 1,
        )
    except ValueError as e:
        raise fail(e) from None


# -- several policies at once (compare, capacity) ------------------------------------------------


def without_options(*names: str) -> Callable[[Callable], Callable]:
    """Drop the named click parameters that earlier decorators attached (e.g. ``--policy``
    when the policies come from ``--policies``)."""

    def deco(f: Callable) -> Callable:
        f.__click_params__ = [p for p in f.__click_params__ if p.name not in names]  # type: ignore[attr-defined]
        return f

    return deco


def policy_knob_options(f: Callable) -> Callable:
    """The policy knobs of ``simulate`` (order, preemption, budgets) without ``--policy``."""
    return without_options("policy")(policy_options(f))


jobs_option = click.option("--jobs", "-j", default=None, type=click.IntRange(min=1),
                           help="Simulations to run at once, one process each [default: one per core; 1 runs "
                                "in this process].")


def policy_configs(opts: dict[str, Any], policies: str) -> list[tuple[str, SimConfig]]:
    """(label, config) per comma-separated policy spec: a registered policy, optionally
    ``+recompute`` / ``+swap`` / ``+off`` (default: ``--preempt``)."""
    specs = [s.strip() for s in policies.split(",") if s.strip()]
    if not specs:
        raise click.BadParameter("give at least one policy, e.g. static,continuous,chunked+swap",
                                 param_hint="--policies")
    if len(set(specs)) != len(specs):
        raise click.BadParameter(f"{policies!r} names a policy twice", param_hint="--policies")
    out = []
    for spec in specs:
        try:
            name, preempt = parse_policy(spec)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--policies") from None
        try:
            out.append((spec, build_sim_config(opts, name, preempt)))
        except click.ClickException as e:
            raise click.BadParameter(f"{spec!r}: {e.message}", param_hint="--policies") from None
    return out


def policies_help(verb: str) -> str:
    """``--policies``' help: the registered policies, each with an optional preemption mode."""
    return (f"Policies to {verb}: {', '.join(sorted(POLICIES))}, each optionally "
            f"{', '.join('+' + m for m in PREEMPT_MODES)} (preemption; default --preempt).")


def base_workload(opts: dict[str, Any]) -> tuple[SyntheticWorkload | TraceReplay, RateScaler]:
    """The workload of the options, as a description, and its rate scaler (which reads a trace
    once: a bad file is a user-facing error before any simulation)."""
    try:
        workload = build_workload(opts, opts["seed"])
        return workload, RateScaler(workload)
    except ValueError as e:
        raise fail(e) from None
