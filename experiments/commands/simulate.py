"""``servesim simulate``: replay a trace or a synthetic workload in the simulator."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from experiments.options import (
    build_sim_config,
    build_workload,
    cluster_options,
    fail,
    load_profile_opt,
    policy_options,
    priority_note,
    workload_options,
    workload_requests,
)
from experiments.output import write_run
from experiments.report import print_summary
from sim.metrics import parse_goodput, parse_percentiles
from sim.simulation import run_simulation


@click.command("simulate")
@workload_options
@policy_options
@cluster_options
@click.option("--goodput", multiple=True, metavar="NAME:MS",
              help="SLO for goodput, repeatable: ttft:MS, tpot:MS, e2el:MS.")
@click.option("--percentiles", default="90,99", show_default=True, metavar="P,...",
              help="Percentiles to report, each in [0, 100].")
@click.option("--token-times", is_flag=True, help="Keep every token's time (tokens.csv).")
@click.option("--exact-steps", is_flag=True, help="Step every iteration (the reference for the fast path).")
@click.option("-o", "--output", default=None, type=click.Path(file_okay=False), help="Run directory to write.")
def simulate(**opts: Any) -> None:
    """Replay a trace (default: the embedded azure-conv) or a synthetic workload in the simulator.

    Prints the summary the way `vllm bench serve` does; with -o writes config.json,
    requests.csv, summary.json (vLLM keys) and timeseries.csv.
    """
    try:
        percentiles = parse_percentiles(opts["percentiles"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--percentiles") from None
    try:
        goodput = parse_goodput(opts["goodput"])
        workload = build_workload(opts, opts["seed"])
        requests, workload_info = workload_requests(workload)
    except ValueError as e:
        raise fail(e) from None
    config = build_sim_config(opts)
    profile = load_profile_opt(opts["profile"])
    note = priority_note(config.scheduler.order, requests)
    if note:
        click.echo(note, err=True)
    t0 = time.perf_counter()
    try:
        run = run_simulation(config, requests, profile)
    except ValueError as e:
        raise fail(e) from None
    wall_s = time.perf_counter() - t0
    summary = run.summary(goodput or None, percentiles)
    print_summary(summary, title=f"servesim simulate: {config.scheduler.policy}")
    click.echo(f"simulated {len(requests)} requests on {config.num_gpus} GPU(s) (tp {config.tp} x pp {config.pp} "
               f"x {config.replicas} replicas) in {wall_s:.2f} s wall "
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
