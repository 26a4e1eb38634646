"""``servesim simulate``: replay a trace or a synthetic workload in the simulator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from experiments.options import (
    build_scheduler,
    build_workload,
    fail,
    policy_options,
    workload_options,
    workload_requests,
)
from experiments.output import write_run
from experiments.report import print_summary
from sim.cluster import ROUTERS
from sim.config import KVConfig, SimConfig
from sim.hardware import HARDWARE
from sim.metrics import parse_goodput
from sim.models import DTYPE_BYTES, MODELS
from sim.simulation import run_simulation


def cluster_options(f):
    options = [
        click.option("--model", default=None, type=click.Choice(list(MODELS)),
                     help=f"Model preset (roofline cost and KV bytes per token). Default: the profile's model, "
                          f"else {DEFAULT_MODEL}."),
        click.option("--hardware", default="h100-sxm", show_default=True, type=click.Choice(list(HARDWARE)),
                     help="Hardware preset for the roofline cost model."),
        click.option("--dtype", default="bfloat16", show_default=True, type=click.Choice(list(DTYPE_BYTES))),
        click.option("--profile", default=None, type=click.Path(exists=True, dir_okay=False),
                     help="Calibrated profile JSON: its cost model and KV capacity replace the roofline."),
        click.option("--kv-blocks", default=None, type=click.IntRange(min=1), help="KV blocks per replica."),
        click.option("--gpu-memory-gib", default=None, type=click.FloatRange(min=0, min_open=True),
                     help="Device memory per replica; KV gets 90% of it minus the weights."),
        click.option("--block-size", default=16, show_default=True, type=click.IntRange(1, 1024),
                     help="Tokens per KV block."),
        click.option("--swap-gib", default=4.0, show_default=True, type=click.FloatRange(min=0),
                     help="Host memory for swapped-out KV blocks (with --preempt swap)."),
        click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1)),
        click.option("--router", default="round_robin", show_default=True, type=click.Choice(list(ROUTERS))),
        click.option("--seed", default=0, show_default=True, type=int, help="Seed of synthetic workloads."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


DEFAULT_MODEL = "qwen2.5-7b"


def resolve_model(opts: dict[str, Any]) -> str:
    """--model, else the profile's model when it is a preset, else the default."""
    if opts.get("model"):
        return opts["model"]
    if opts.get("profile"):
        profile = load_profile_opt(opts["profile"])
        if profile is not None and profile.model in MODELS:
            return profile.model
    return DEFAULT_MODEL


def build_sim_config(opts: dict[str, Any], policy: str | None = None, preempt: str | None = None) -> SimConfig:
    try:
        return SimConfig(
            scheduler=build_scheduler(opts, policy, preempt),
            kv=KVConfig(num_blocks=opts["kv_blocks"], gpu_memory_gib=opts["gpu_memory_gib"],
                        block_size=opts["block_size"], swap_gib=opts["swap_gib"]),
            model=resolve_model(opts), hardware=opts["hardware"], dtype=opts["dtype"], profile=opts["profile"],
            replicas=opts["replicas"], router=opts["router"], token_times=opts.get("token_times", False),
            exact_steps=opts.get("exact_steps", False),
        )
    except ValueError as e:
        raise fail(e) from None


def load_profile_opt(path: str | None):
    if path is None:
        return None
    from calibrate.profile import load_profile

    try:
        return load_profile(path)
    except ValueError as e:
        raise fail(e) from None


@click.command("simulate")
@workload_options
@policy_options
@cluster_options
@click.option("--goodput", multiple=True, metavar="NAME:MS",
              help="SLO for goodput, repeatable: ttft:MS, tpot:MS, e2el:MS.")
@click.option("--percentiles", default="90,99", show_default=True, help="Percentiles to report.")
@click.option("--token-times", is_flag=True, help="Keep every token's time (tokens.csv).")
@click.option("--exact-steps", is_flag=True, help="Step every iteration (the reference for the fast path).")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="Run directory to write.")
def simulate(**opts: Any) -> None:
    """Replay a trace (default: the embedded azure-conv) or a synthetic workload in the simulator.

    Prints the summary the way `vllm bench serve` does; with -o writes config.json,
    requests.csv, summary.json (vLLM keys) and timeseries.csv.
    """
    try:
        goodput = parse_goodput(opts["goodput"])
        percentiles = [float(p) for p in opts["percentiles"].split(",") if p.strip()]
        workload = build_workload(opts, opts["seed"])
        requests, workload_info = workload_requests(workload)
    except ValueError as e:
        raise fail(e) from None
    config = build_sim_config(opts)
    profile = load_profile_opt(opts["profile"])
    t0 = time.perf_counter()
    try:
        run = run_simulation(config, requests, profile)
    except ValueError as e:
        raise fail(e) from None
    wall_s = time.perf_counter() - t0
    summary = run.summary(goodput or None, percentiles)
    print_summary(summary, title=f"servesim simulate: {config.scheduler.policy}")
    click.echo(f"simulated {len(requests)} requests in {wall_s:.2f} s wall "
               f"({sum(s.steps for s in run.result.replicas)} engine steps)")
    if opts["output"]:
        out = Path(opts["output"])
        resolved = {"command": "simulate", "workload": workload_info, **config.to_dict(),
                    "kv_blocks_per_replica": run.capacity.num_blocks,
                    "host_blocks_per_replica": run.capacity.num_host_blocks,
                    "goodput_slos_ms": goodput, "percentiles": percentiles}
        summary_out = dict(summary)
        if config.replicas > 1:
            summary_out["replicas"] = run.replica_summaries(goodput or None, percentiles)
        write_run(out, resolved, run.result.requests, summary_out, [s.timeseries for s in run.result.replicas])
        click.echo(f"wrote {out}/")
