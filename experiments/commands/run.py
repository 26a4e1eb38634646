"""``servesim run``: serve a workload on the real engine and write the same run directory as a
simulation (config.json, requests.csv, summary.json, timeseries.csv) plus ``steps.csv``, the
measured time of every step with its shape, for validation against a cost model.

``--engine servesim`` is the live engine (the simulator's policies on the device);
``--engine hf-static`` is the static-batching reference on transformers' ``generate``.
Workload and policy flags are the simulator's (``servesim simulate``).
"""

from __future__ import annotations

import csv
import dataclasses
import platform
from pathlib import Path
from typing import Any

import click

from experiments.options import build_scheduler, build_workload, fail, policy_options, workload_options
from sim.batch import StepShape
from sim.kv import BlockManager, blocks_for
from sim.metrics import parse_goodput, summarize
from sim.models import MODELS, get_model
from sim.request import Request

CPU_MAX_KV_BLOCKS = 2048
DEFAULT_NUM_REQUESTS = 32
STEP_COLUMNS = [f.name for f in dataclasses.fields(StepShape)] + ["step_s"]


def default_kv_blocks(requests: list[Request], block_size: int) -> int:
    """On CPU: room for every request at once (no preemption), at most 2048 blocks."""
    need = sum(blocks_for(r.max_tokens, block_size) for r in requests)
    return max(1, min(CPU_MAX_KV_BLOCKS, need))


def write_steps(path: Path, step_log: list[tuple[StepShape, float]]) -> None:
    """One row per engine step: its StepShape fields and the measured seconds."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(STEP_COLUMNS)
        for shape, step_s in step_log:
            w.writerow([repr(getattr(shape, name)) for name in STEP_COLUMNS[:-1]] + [repr(step_s)])


@click.command("run")
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
@click.option("--progress/--no-progress", default=True, show_default=True)
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

        from runtime.engine import LiveEngine
        from runtime.kvcache import blocks_from_memory, kv_bytes_per_token
        from runtime.runner import ModelRunner
        from runtime.weights import build_hf_model, dtype_name, load_model, resolve_device, resolve_dtype
    except ImportError as e:
        hint = "the real engine needs torch, transformers and safetensors (pip install '.[runtime]')"
        raise click.ClickException(f"{hint}: {e}") from None
    from experiments.options import workload_requests
    from experiments.output import write_run
    from experiments.report import print_summary
    from sim.policies import make_policy

    if opts["num_requests"] is None and opts["duration_s"] is None:
        opts["num_requests"] = DEFAULT_NUM_REQUESTS  # a live run takes real time
    try:
        spec = get_model(opts["model"])
        goodput = parse_goodput(opts["goodput"])
        scheduler = build_scheduler(opts)
        requests, workload_info = workload_requests(build_workload(opts, opts["seed"]))
        dev = resolve_device(opts["device"])
        dtype = resolve_dtype(opts["dtype"], dev)
    except ValueError as e:
        raise fail(e) from None
    if not requests:
        raise click.ClickException("the workload has no requests")
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    if longest > spec.max_position:
        raise click.ClickException(f"a request needs {longest} positions; {spec.name} has {spec.max_position} "
                                   "(scale a trace with --max-prompt-tokens / --max-output-tokens)")
    if opts["threads"] is not None:
        torch.set_num_threads(opts["threads"])

    net = load_model(spec, opts["weights"], dtype, dev, opts["seed"])
    config: dict[str, Any] = {
        "command": "run", "engine": opts["engine"], "workload": workload_info, "model": spec.name,
        "weights": str(opts["weights"]) if opts["weights"] else f"random(seed={opts['seed']})",
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "dtype": dtype_name(dtype), "threads": torch.get_num_threads(), "seed": opts["seed"],
        "torch": torch.__version__, "goodput_slos_ms": goodput,
    }
    if opts["engine"] == "hf-static":
        from runtime.hf_static import HFStaticEngine

        hf = build_hf_model(spec, net.hf_state_dict(), dtype, dev)
        del net
        config["scheduler"] = {"policy": "hf-static", "batch_size": scheduler.batch_size,
                               "max_wait_s": scheduler.max_wait_s}
        engine = HFStaticEngine(hf, scheduler.batch_size, scheduler.max_wait_s, opts["seed"], opts["block_size"],
                                opts["progress"])
        result = engine.run(requests, opts["token_times"])
    else:
        kv_blocks = opts["kv_blocks"]
        if kv_blocks is None:
            kv_blocks = (blocks_from_memory(spec, opts["block_size"], dtype, dev, opts["memory_utilization"])
                         if dev.type == "cuda" else default_kv_blocks(requests, opts["block_size"]))
        swap_blocks = opts["swap_blocks"]
        if swap_blocks is None:
            swap_blocks = kv_blocks if scheduler.preempt == "swap" else 0
        try:
            blocks = BlockManager(kv_blocks, opts["block_size"], swap_blocks)
            policy = make_policy(scheduler, blocks)
        except ValueError as e:
            raise fail(e) from None
        config["scheduler"] = dataclasses.asdict(scheduler)
        config["kv"] = {"num_blocks": kv_blocks, "block_size": opts["block_size"], "num_host_blocks": swap_blocks,
                        "kv_bytes_per_token": kv_bytes_per_token(spec, dtype)}
        runner = ModelRunner(net, blocks, seed=opts["seed"])
        result = LiveEngine(runner, policy, progress=opts["progress"]).run(requests, opts["token_times"])
    summary = summarize(result.requests, result.itl(), goodput=goodput or None,
                        num_preemptions=result.num_preemptions)
    print_summary(summary, title=f"servesim run: {config['scheduler']['policy']} on {dev}")
    if opts["output"] is not None:
        out = opts["output"]
        write_run(out, config, result.requests, summary, [s.timeseries for s in result.replicas])
        write_steps(out / "steps.csv", result.step_log)
        click.echo(f"wrote {out}/")
