"""``servesim run``: serve a workload on the real engine and write the same run directory as a
simulation (config.json, requests.csv, summary.json, timeseries.csv) plus ``steps.csv``, the
measured time of every step with its shape, for validation against a cost model.

``--engine servesim`` is the live engine (the simulator's policies on the device);
``--engine hf-static`` is the static-batching reference on transformers' ``generate``.
"""

from __future__ import annotations

import csv
import dataclasses
import platform
from pathlib import Path
from typing import Any

import click

from sim.batch import StepShape
from sim.kv import BlockManager, blocks_for
from sim.metrics import parse_goodput, summarize
from sim.models import MODELS, get_model
from sim.policies.base import POLICIES, PREEMPT_MODES, SchedulerConfig
from sim.queues import ORDERS
from sim.request import Request

CPU_MAX_KV_BLOCKS = 2048
STEP_COLUMNS = [f.name for f in dataclasses.fields(StepShape)] + ["step_s"]


def load_workload(trace: str | None, num_requests: int | None, seed: int, time_scale: float, start: int,
                  max_prompt_tokens: int | None, max_output_tokens: int | None, arrival: str, rate: float,
                  burstiness: float, prompt_dist: str, output_dist: str) -> tuple[list[Request], dict[str, Any]]:
    """The requests and the workload's resolved description for config.json."""
    from sim.workload import SyntheticWorkload, TraceReplay

    if trace is not None:
        replay = TraceReplay(trace=trace, time_scale=time_scale, start=start, num_requests=num_requests,
                             arrival=arrival, rate=rate, burstiness=burstiness, seed=seed,
                             max_prompt_tokens=max_prompt_tokens, max_output_tokens=max_output_tokens)
        return replay.requests(), {"trace": dataclasses.asdict(replay)}
    synthetic = SyntheticWorkload(arrival=arrival, rate=rate, burstiness=burstiness,
                                  num_requests=num_requests if num_requests is not None else 32,
                                  prompt_dist=prompt_dist, output_dist=output_dist, seed=seed)
    return synthetic.generate(), {"synthetic": dataclasses.asdict(synthetic)}


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


SUMMARY_KEYS = ["completed", "rejected", "duration", "request_throughput", "output_throughput",
                "total_token_throughput", "mean_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms",
                "mean_itl_ms", "p99_itl_ms", "num_preemptions"]


def format_summary(summary: dict[str, Any]) -> str:
    lines = []
    for key in SUMMARY_KEYS:
        value = summary.get(key)
        lines.append(f"{key:<24}{value:>14.3f}" if isinstance(value, float) else f"{key:<24}{value!s:>14}")
    return "\n".join(lines)


@click.command("run")
@click.option("--engine", type=click.Choice(["servesim", "hf-static"]), default="servesim", show_default=True,
              help="servesim: the simulator's policies on the real network; hf-static: transformers' generate.")
@click.option("--model", default="tiny", show_default=True, help=f"Architecture preset: {', '.join(MODELS)}.")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face checkpoint directory (safetensors); default: random weights from --seed.")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--threads", type=int, default=None, help="torch CPU threads (1 is fastest for tiny models).")
@click.option("--policy", type=click.Choice(sorted(POLICIES)), default="continuous", show_default=True)
@click.option("--order", type=click.Choice(list(ORDERS)), default="fcfs", show_default=True)
@click.option("--max-num-seqs", type=int, default=256, show_default=True)
@click.option("--token-budget", type=int, default=None, help="Tokens per step (chunked defaults to 512).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="static / hf-static batch size.")
@click.option("--max-wait-s", type=float, default=1.0, show_default=True, help="static / hf-static batching wait.")
@click.option("--preempt", type=click.Choice(list(PREEMPT_MODES)), default=None,
              help="Default: off for static, recompute otherwise.")
@click.option("--kv-blocks", type=int, default=None,
              help="KV pool blocks. Default: from free memory on CUDA; on CPU enough for the whole workload "
                   f"(at most {CPU_MAX_KV_BLOCKS}).")
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--swap-blocks", type=int, default=None, help="Host swap blocks (default: --kv-blocks with "
                                                             "--preempt swap, else 0).")
@click.option("--memory-utilization", type=float, default=0.9, show_default=True,
              help="Fraction of CUDA memory for weights + KV when --kv-blocks is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Workload, weights and prompt token ids.")
@click.option("--trace", default=None, help="Replay a trace (embedded name or file) instead of a synthetic workload.")
@click.option("--time-scale", type=float, default=1.0, show_default=True, help="Trace speed-up (2 = twice as fast).")
@click.option("--start", type=int, default=0, show_default=True, help="First trace row replayed.")
@click.option("--num-requests", type=int, default=None, help="Requests (synthetic default 32; trace default all).")
@click.option("--max-prompt-tokens", type=int, default=None, help="Scale trace prompts down to fit this.")
@click.option("--max-output-tokens", type=int, default=None, help="Scale trace outputs down to fit this.")
@click.option("--arrival", default="poisson", show_default=True, help="poisson | gamma | constant | all-at-once.")
@click.option("--rate", type=float, default=4.0, show_default=True, help="Requests per second (synthetic).")
@click.option("--burstiness", type=float, default=1.0, show_default=True, help="Gamma shape k (gamma arrivals).")
@click.option("--prompt-dist", default="uniform:16:256", show_default=True, help="Synthetic prompt lengths.")
@click.option("--output-dist", default="uniform:8:128", show_default=True, help="Synthetic output lengths.")
@click.option("--goodput", multiple=True, help="SLO NAME:MS (ttft, tpot, e2el); repeatable.")
@click.option("--token-times", is_flag=True, help="Keep every token's time (writes tokens.csv).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), default=None, help="Run directory.")
def run(engine: str, model: str, weights: Path | None, device: str, dtype: str | None, threads: int | None,
        policy: str, order: str, max_num_seqs: int, token_budget: int | None, batch_size: int, max_wait_s: float,
        preempt: str | None, kv_blocks: int | None, block_size: int, swap_blocks: int | None,
        memory_utilization: float, seed: int, trace: str | None, time_scale: float, start: int,
        num_requests: int | None, max_prompt_tokens: int | None, max_output_tokens: int | None, arrival: str,
        rate: float, burstiness: float, prompt_dist: str, output_dist: str, goodput: tuple[str, ...],
        token_times: bool, progress: bool, out_dir: Path | None) -> None:
    """Serve a workload on the real engine (CUDA when present, else CPU) and report vLLM-style metrics."""
    try:
        import torch

        from runtime.engine import LiveEngine
        from runtime.kvcache import blocks_from_memory, kv_bytes_per_token
        from runtime.runner import ModelRunner
        from runtime.weights import build_hf_model, dtype_name, load_model, resolve_device, resolve_dtype
    except ImportError as e:
        hint = "the real engine needs torch, transformers and safetensors (pip install '.[runtime]')"
        raise click.ClickException(f"{hint}: {e}") from None
    from sim.policies import make_policy

    try:
        spec = get_model(model)
        slos = parse_goodput(goodput)
        preempt = preempt or ("off" if policy == "static" else "recompute")
        sched = SchedulerConfig(policy=policy, order=order, max_num_seqs=max_num_seqs, token_budget=token_budget,
                                batch_size=batch_size, max_wait_s=max_wait_s, preempt=preempt)
        requests, workload = load_workload(trace, num_requests, seed, time_scale, start, max_prompt_tokens,
                                           max_output_tokens, arrival, rate, burstiness, prompt_dist, output_dist)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    if not requests:
        raise click.ClickException("the workload has no requests")
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    if longest > spec.max_position:
        raise click.ClickException(f"a request needs {longest} positions; {spec.name} has {spec.max_position} "
                                   "(use --max-prompt-tokens / --max-output-tokens or shorter lengths)")
    if threads is not None:
        torch.set_num_threads(threads)

    net = load_model(spec, weights, torch_dtype, dev, seed)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    config: dict[str, Any] = {
        "engine": engine, "model": spec.name, "weights": str(weights) if weights else f"random(seed={seed})",
        "device": str(dev), "device_name": device_name,
        "dtype": dtype_name(torch_dtype), "threads": torch.get_num_threads(), "seed": seed,
        "torch": torch.__version__, "workload": workload,
    }
    if engine == "hf-static":
        from runtime.hf_static import HFStaticEngine

        hf = build_hf_model(spec, net.hf_state_dict(), torch_dtype, dev)
        del net
        config["scheduler"] = {"policy": "hf-static", "batch_size": batch_size, "max_wait_s": max_wait_s}
        result = HFStaticEngine(hf, batch_size, max_wait_s, seed, block_size, progress).run(requests, token_times)
    else:
        if kv_blocks is None:
            kv_blocks = (blocks_from_memory(spec, block_size, torch_dtype, dev, memory_utilization)
                         if dev.type == "cuda" else default_kv_blocks(requests, block_size))
        if swap_blocks is None:
            swap_blocks = kv_blocks if preempt == "swap" else 0
        try:
            blocks = BlockManager(kv_blocks, block_size, swap_blocks)
            pol = make_policy(sched, blocks)
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        runner = ModelRunner(net, blocks, seed=seed)
        config["scheduler"] = dataclasses.asdict(sched)
        config["kv"] = {"num_blocks": kv_blocks, "block_size": block_size, "num_host_blocks": swap_blocks,
                        "kv_bytes_per_token": kv_bytes_per_token(spec, torch_dtype)}
        result = LiveEngine(runner, pol, progress=progress).run(requests, token_times)
    summary = summarize(result.requests, result.itl(), goodput=slos or None, num_preemptions=result.num_preemptions)
    click.echo(format_summary(summary))
    if out_dir is not None:
        from experiments.output import write_run

        write_run(out_dir, config, result.requests, summary, [s.timeseries for s in result.replicas])
        write_steps(out_dir / "steps.csv", result.step_log)
        click.echo(f"wrote {out_dir}")
