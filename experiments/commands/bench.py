"""``servesim bench``: replay a workload against any OpenAI-compatible server and write the same
run directory as ``servesim simulate`` (config.json, requests.csv, summary.json with vLLM's
keys, timeseries.csv of the requests in flight), so that a real engine's run and a simulated
one compare field by field. The load generator is :mod:`experiments.loadgen`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from experiments.options import build_workload, fail, workload_options, workload_requests
from sim.metrics import parse_goodput, summarize
from sim.request import Status

DEFAULT_NUM_REQUESTS = 32  # unless -n or --duration: as `servesim run`


@click.command("bench")
@click.option("--url", required=True, help="The server's base URL, e.g. http://127.0.0.1:8000.")
@click.option("--model", default=None, help="Model name to request (default: the first the server lists).")
@workload_options
@click.option("--max-concurrency", type=click.IntRange(min=1), default=None,
              help="Most requests in flight at once (default: no limit; arrivals follow the workload).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Seconds one request may take, to the end of its stream.")
@click.option("--vocab-size", type=click.IntRange(min=2), default=4096, show_default=True,
              help="Prompt token ids are drawn from 0..N-1 (within the server's vocabulary).")
@click.option("--ignore-eos/--no-ignore-eos", default=True, show_default=True,
              help="Send ignore_eos so that every output has the workload's length.")
@click.option("--seed", type=int, default=0, show_default=True, help="Synthetic workload and prompt ids.")
@click.option("--goodput", multiple=True, metavar="NAME:MS",
              help="SLO for goodput, repeatable: ttft:MS, tpot:MS, e2el:MS.")
@click.option("--percentiles", default="90,99", show_default=True, help="Percentiles to report.")
@click.option("--token-times", is_flag=True, help="Keep every token's arrival (tokens.csv).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to write.")
def bench(**opts: Any) -> None:
    """Replay a trace (default: the embedded azure-conv, first 32 requests) or a synthetic
    workload against a serving engine's /v1/completions, streaming, and report vLLM's metrics.

    \b
      servesim bench --url http://127.0.0.1:8000 -n 100 --max-prompt-tokens 1024 -o runs/real
      servesim bench --url http://127.0.0.1:8000 --arrival poisson --rate 4 -n 100 \\
          --prompt-tokens 128 --output-tokens 64 --max-concurrency 16
    """
    from experiments.loadgen import BenchConfig, BenchError, run_bench
    from experiments.output import write_run
    from experiments.report import print_summary

    try:
        goodput = parse_goodput(opts["goodput"])
        percentiles = [float(p) for p in opts["percentiles"].split(",") if p.strip()]
        requests, workload_info = workload_requests(build_workload(opts, opts["seed"]))
        if opts["num_requests"] is None and opts["duration_s"] is None and len(requests) > DEFAULT_NUM_REQUESTS:
            # A real server takes real time: the first requests only, unless -n says otherwise.
            opts["num_requests"] = DEFAULT_NUM_REQUESTS
            requests, workload_info = workload_requests(build_workload(opts, opts["seed"]))
        config = BenchConfig(url=opts["url"], model=opts["model"], timeout_s=opts["timeout_s"],
                             max_concurrency=opts["max_concurrency"], seed=opts["seed"],
                             vocab_size=opts["vocab_size"], ignore_eos=opts["ignore_eos"],
                             token_times=opts["token_times"], progress=opts["progress"])
    except ValueError as e:
        raise fail(e) from None
    if not requests:
        raise click.ClickException("the workload has no requests")
    try:
        result = run_bench(config, requests)
    except BenchError as e:
        raise click.ClickException(str(e)) from None

    summary = summarize(result.requests, result.itl, percentiles, goodput or None)
    summary["num_preemptions"] = None  # the server's to know; see its /metrics
    failed = result.failed_reasons()
    mismatched = result.mismatches()
    not_sent = sum(r.status is Status.WAITING for r in result.requests)
    summary |= {"failed": sum(failed.values()), "failed_reasons": failed,
                "output_length_mismatches": len(mismatched), "not_sent": not_sent,
                "interrupted": result.interrupted}
    print_summary(summary, title=f"servesim bench: {result.model}")
    for kind, count in failed.items():
        example = next(result.errors[r.id] for r in result.requests
                       if r.reject_reason == kind and r.id in result.errors)
        click.echo(f"failed x{count}: {kind} (e.g. {example})")
    if mismatched:
        asked = sum(r.output_tokens for r in mismatched)
        got = sum(r.num_generated for r in mismatched)
        click.echo(f"output length mismatch: {len(mismatched)} requests received {got} tokens of the {asked} "
                   "asked for (does the server honour ignore_eos and max_tokens?)")
    if result.interrupted:
        click.echo(f"interrupted: {not_sent} requests not sent")
    if opts["output"] is not None:
        resolved = {"command": "bench", "url": config.base_url, "model": result.model, "workload": workload_info,
                    "max_concurrency": config.max_concurrency, "timeout_s": config.timeout_s,
                    "vocab_size": config.vocab_size, "ignore_eos": config.ignore_eos, "seed": config.seed,
                    "goodput_slos_ms": goodput, "percentiles": percentiles}
        write_run(opts["output"], resolved, result.requests, summary, [result.series])
        click.echo(f"wrote {opts['output']}/")
    if result.interrupted:
        sys.exit(130)
