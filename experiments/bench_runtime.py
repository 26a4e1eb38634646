"""Output-token throughput of one mixed-length workload served three ways on the same device:

1. ``servesim`` - the live engine with the ``continuous`` policy (runtime.engine.LiveEngine);
2. ``hf-static`` - padded fixed batches on transformers' ``generate`` (runtime.hf_static);
3. ``hf-continuous`` - transformers' own continuous batching (the manager behind
   ``model.generate_batch``). ``generate_batch`` takes one ``max_new_tokens`` for every prompt,
   so each request is added with its own length through the same manager
   (``continuous_batching_context_manager`` + ``add_request``), which is all ``generate_batch``
   does around it.

Every engine gets the same random weights, the same synthetic prompt ids and the same output
lengths, all requests arriving at t = 0 (an offline batch), EOS ignored. Warm-up is excluded.
Throughput = output tokens / (last finish - start). On CPU every engine runs with one torch
thread unless ``--threads`` says otherwise: a small model's kernels are too short to split, and
on a shared machine a second thread's spin-waits cost all three engines several times over. Run::

    python -m experiments.bench_runtime --model tiny --device cpu --num-requests 64
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import click

from sim.kv import blocks_for
from sim.metrics import summarize
from sim.models import MODELS, get_model
from sim.policies import SchedulerConfig
from sim.request import Request
from sim.workload import SyntheticWorkload


@dataclass
class BenchRow:
    engine: str
    output_tokens: int
    wall_s: float
    outputs: dict[int, list[int]]

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.wall_s


def workload(num_requests: int, seed: int, prompt_dist: str, output_dist: str) -> list[Request]:
    return SyntheticWorkload(arrival="all-at-once", num_requests=num_requests, prompt_dist=prompt_dist,
                             output_dist=output_dist, seed=seed).generate()


def bench_servesim(net, requests: list[Request], seed: int, max_num_seqs: int, block_size: int) -> BenchRow:
    from runtime.build import build_live_engine
    from runtime.config import LiveConfig

    live = LiveConfig(model=net.spec.name, scheduler=SchedulerConfig(policy="continuous", max_num_seqs=max_num_seqs),
                      seed=seed, kv_blocks=sum(blocks_for(r.max_tokens, block_size) for r in requests),
                      block_size=block_size)
    result = build_live_engine(live, requests, net=net).run(requests)
    s = summarize(result.requests, result.itl())
    return BenchRow("servesim continuous", s["total_output_tokens"], s["duration"], result.outputs)


def bench_hf_static(hf, requests: list[Request], seed: int, batch_size: int) -> BenchRow:
    from runtime.hf_static import HFStaticEngine

    result = HFStaticEngine(hf, batch_size=batch_size, max_wait_s=0.0, seed=seed).run(requests)
    s = summarize(result.requests, result.itl())
    return BenchRow(f"hf-static (batch {batch_size})", s["total_output_tokens"], s["duration"], result.outputs)


def bench_hf_continuous(hf, requests: list[Request], seed: int, max_num_seqs: int) -> BenchRow:
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from runtime.runner import prompt_token_ids

    page = 256  # transformers' default page size
    cb = ContinuousBatchingConfig(
        num_blocks=sum(blocks_for(r.max_tokens + 1, page) for r in requests),  # room for all: no memory probing
        max_batch_tokens=max(2048, max(r.prompt_tokens for r in requests)),
        max_requests_per_batch=max_num_seqs, allow_block_sharing=False)
    gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=0, max_new_tokens=1)
    prompts = {r.id: prompt_token_ids(seed, r.id, r.prompt_tokens, hf.config.vocab_size) for r in requests}
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)  # psutil notices on CPU
    outputs: dict[int, list[int]] = {}
    with hf.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                warmup=True) as manager:
        t0 = time.perf_counter()
        for r in requests:
            manager.add_request(prompts[r.id], request_id=str(r.id), max_new_tokens=r.output_tokens, eos_token_id=-1)
        while len(outputs) < len(requests):
            result = manager.get_result(timeout=60)
            if result is None:
                raise RuntimeError("transformers' continuous batching returned no result within 60 s")
            if result.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed request {result.request_id}: "
                                   f"{result.error}")
            if result.is_finished():
                outputs[int(result.request_id)] = list(result.generated_tokens)
        wall_s = time.perf_counter() - t0
    return BenchRow("hf-continuous (generate_batch)", sum(len(o) for o in outputs.values()), wall_s, outputs)


@click.command()
@click.option("--model", default="tiny", show_default=True, help=f"Preset: {', '.join(MODELS)}.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default=None, help="Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--num-requests", type=int, default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--prompt-tokens", "prompt_dist", default="uniform:16:512", show_default=True, metavar="DIST",
              help="Prompt lengths: N, fixed:N, uniform:A:B, zipf:A:MAX, empirical:FILE.")
@click.option("--output-tokens", "output_dist", default="uniform:16:256", show_default=True, metavar="DIST",
              help="Output lengths, same forms.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="hf-static batch size.")
@click.option("--max-num-seqs", type=int, default=64, show_default=True,
              help="Concurrent sequences for both continuous engines.")
@click.option("--threads", type=int, default=None,
              help="torch intra-op threads for all three engines (default on CPU: 1, see above).")
def main(model: str, device: str, dtype: str | None, num_requests: int, seed: int, prompt_dist: str,
         output_dist: str, batch_size: int, max_num_seqs: int, threads: int | None) -> None:
    """Serve one workload with servesim, hf-static and transformers' continuous batching."""
    import torch

    from runtime.build import load_network, place
    from runtime.config import LiveConfig
    from runtime.weights import build_hf_model, dtype_name

    spec = get_model(model)
    live = LiveConfig(model=model, device=device, dtype=dtype, threads=threads, seed=seed)
    where = place(live)
    if threads is None and where.device.type == "cpu":
        live = LiveConfig(model=model, device=device, dtype=dtype, threads=1, seed=seed)
    dev, torch_dtype = where.device, where.dtype
    net = load_network(live)
    hf = build_hf_model(spec, net.hf_state_dict(), torch_dtype, dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    requests = workload(num_requests, seed, prompt_dist, output_dist)
    click.echo(f"{spec.name} {dtype_name(torch_dtype)} on {name}; {num_requests} requests, prompts {prompt_dist}, "
               f"outputs {output_dist}, {sum(r.output_tokens for r in requests)} output tokens")
    rows = [
        bench_servesim(net, workload(num_requests, seed, prompt_dist, output_dist), seed, max_num_seqs, 16),
        bench_hf_static(hf, workload(num_requests, seed, prompt_dist, output_dist), seed, batch_size),
    ]
    failed = None
    try:
        rows.append(bench_hf_continuous(hf, requests, seed, max_num_seqs))
    except Exception as e:  # an experimental transformers API: report it, keep the other rows
        failed = f"hf-continuous failed: {type(e).__name__}: {e}"
    ours = rows[0]
    click.echo(f"{'engine':<32}{'out tokens':>11}{'wall s':>9}{'tok/s':>10}{'servesim x':>12}{'same tokens':>13}")
    for row in rows:
        same = sum(row.outputs.get(i) == o for i, o in ours.outputs.items())
        click.echo(f"{row.engine:<32}{row.output_tokens:>11}{row.wall_s:>9.2f}{row.throughput:>10.1f}"
                   f"{ours.throughput / row.throughput:>12.2f}{f'{same}/{len(ours.outputs)}':>13}")
    if failed:
        click.echo(failed)


if __name__ == "__main__":
    main()
