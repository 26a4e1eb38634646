"""``servesim run``: serve a workload on the real engine and write the same run directory as a
simulation (config.json, requests.csv, summary.json, timeseries.csv) plus ``steps.csv``, the
measured time of every step with its shape, for validation against a cost model.

``--engine servesim`` is the live engine (the simulator's policies on the device);
``--engine hf-static`` is the static-batching reference on transformers' ``generate``.
Workload and policy flags are the simulator's (``servesim simulate``).
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import click

from experiments.options import (
    build_scheduler,
    build_workload,
    fail,
    option_help,
    policy_options,
    priority_note,
    progress_option,
    resolve_progress,
    workload_options,
)
from experiments.output import write_steps
from runtime.config import CPU_MAX_KV_BLOCKS
from sim.metrics import parse_goodput, summarize
from sim.models import MODELS, get_model

DEFAULT_NUM_REQUESTS = 32


@click.command("run")
@option_help("num_requests", f"Requests to replay or generate [default: {DEFAULT_NUM_REQUESTS}: a live run takes "
                             "real time].")
@workload_options
@policy_options
@click.option("--engine", type=click.Choice(["servesim", "hf-static"]), default="servesim", show_default=True,
              help="servesim: the simulator's policies on the real network; hf-static: padded batches of "
                   "--batch-size on transformers' generate.")
@click.option("--model", default="tiny", show_default=True, type=click.Choice(list(MODELS)),
              help="Architecture preset.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face checkpoint directory (safetensors); default: random weights from --seed.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="torch CPU threads (default: torch's; 1 is fastest for tiny; match the calibration's).")
@click.option("--kv-blocks", type=click.IntRange(1), default=None,
              help=f"KV pool blocks. Default: from free memory on CUDA; on CPU room for the whole workload "
                   f"(at most {CPU_MAX_KV_BLOCKS}).")
@click.option("--block-size", type=click.IntRange(1, 1024), default=16, show_default=True, help="Tokens per KV block.")
@click.option("--swap-blocks", type=click.IntRange(0), default=None,
              help="Host blocks for swapped-out KV (default: --kv-blocks with --preempt swap, else 0).")
@click.option("--memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Fraction of CUDA memory for weights + KV pool when --kv-blocks is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Workload, weights and prompt token ids.")
@click.option("--goodput", multiple=True, metavar="NAME:MS",
              help="SLO for goodput, repeatable: ttft:MS, tpot:MS, e2el:MS.")
@click.option("--token-times", is_flag=True, help="Keep every token's time (tokens.csv).")
@progress_option
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to write.")
def run(**opts: Any) -> None:
    """Serve a trace (default: the embedded azure-conv, first 32 requests) or a synthetic
    workload on the real engine - CUDA when present, else CPU - and report vLLM's metrics.

    \b
      servesim run --model tiny -n 32 --max-prompt-tokens 512 --max-output-tokens 128 -o runs/live
      servesim run --arrival poisson --rate 8 -n 64 --policy chunked --token-budget 256
      servesim run --engine hf-static --batch-size 8 --arrival all-at-once -n 32
    """
    try:
        import torch

        from runtime.build import build_live_engine, kv_description, load_network, place
        from runtime.config import LiveConfig
        from runtime.weights import build_hf_model
    except ImportError as e:
        hint = "the real engine needs torch, transformers and safetensors (pip install '.[runtime]')"
        raise click.ClickException(f"{hint}: {e}") from None
    from experiments.options import workload_requests
    from experiments.output import write_run
    from experiments.report import print_summary

    if opts["num_requests"] is None and opts["duration_s"] is None:
        opts["num_requests"] = DEFAULT_NUM_REQUESTS  # a live run takes real time
    opts["progress"] = resolve_progress(opts["progress"])
    try:
        goodput = parse_goodput(opts["goodput"])
        live = LiveConfig(
            model=opts["model"], scheduler=build_scheduler(opts),
            weights=str(opts["weights"]) if opts["weights"] else None, device=opts["device"], dtype=opts["dtype"],
            threads=opts["threads"], seed=opts["seed"], kv_blocks=opts["kv_blocks"], block_size=opts["block_size"],
            swap_blocks=opts["swap_blocks"], memory_utilization=opts["memory_utilization"])
        requests, workload_info = workload_requests(build_workload(opts, opts["seed"]))
        where = place(live)
    except ValueError as e:
        raise fail(e) from None
    if not requests:
        raise click.ClickException("the workload has no requests")
    note = priority_note(live.scheduler.order, requests)
    if note:
        click.echo(note, err=True)
    # Requests longer than the model's positions are rejected by the scheduler
    # (live.scheduler.max_model_len) and counted in the summary, as in `servesim simulate`.
    scheduler = live.scheduler
    if opts["engine"] == "hf-static":
        # transformers' generate has no scheduler to reject a request with: refuse the run.
        reason = next((why for r in requests if (why := scheduler.reject_reason(r.prompt_tokens, r.output_tokens))),
                      None)
        if reason is not None:
            raise click.ClickException(f"hf-static cannot serve a request: {reason} (scale a trace with "
                                       "--max-prompt-tokens / --max-output-tokens)")
    net = load_network(live)
    config: dict[str, Any] = {
        "command": "run", "engine": opts["engine"], "workload": workload_info, "model": live.model,
        "weights": live.weights or f"random(seed={live.seed})", "device": str(where.device),
        "device_name": where.device_name if where.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": where.dtype_name, "threads": torch.get_num_threads(), "seed": live.seed,
        "torch": torch.__version__, "goodput_slos_ms": goodput,
    }
    if opts["engine"] == "hf-static":
        from runtime.hf_static import HFStaticEngine

        hf = build_hf_model(get_model(live.model), net.hf_state_dict(), where.dtype, where.device)
        del net
        config["scheduler"] = {"policy": "hf-static", "batch_size": scheduler.batch_size,
                               "max_wait_s": scheduler.max_wait_s}
        engine = HFStaticEngine(hf, scheduler.batch_size, scheduler.max_wait_s, live.seed, live.block_size,
                                opts["progress"])
        result = engine.run(requests, opts["token_times"])
    else:
        try:
            live_engine = build_live_engine(live, requests, net=net, progress=opts["progress"])
        except ValueError as e:
            raise fail(e) from None
        config["scheduler"] = dataclasses.asdict(scheduler)
        config["kv"] = kv_description(live_engine)
        result = live_engine.run(requests, opts["token_times"])
    summary = summarize(result.requests, result.itl(), goodput=goodput or None,
                        num_preemptions=result.num_preemptions)
    print_summary(summary, title=f"servesim run: {config['scheduler']['policy']} on {where.device}")
    if opts["output"] is not None:
        out = opts["output"]
        write_run(out, config, result.requests, summary, [s.timeseries for s in result.replicas])
        write_steps(out / "steps.csv", result.step_log)
        click.echo(f"wrote {out}/")
