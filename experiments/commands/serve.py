"""``servesim serve``: the live engine behind the OpenAI-compatible HTTP API, so that any
benchmark client (``vllm bench serve``, GuideLLM, AIPerf, ``servesim bench``) can drive it.

The engine is the one ``servesim run`` builds (:func:`runtime.build.build_live_engine`), with
the simulator's policy flags; the HTTP side is :mod:`runtime.server`.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import click

from experiments.options import build_scheduler, fail, policy_options


@click.command("serve")
@policy_options
@click.option("--model", default="tiny", show_default=True, help="Architecture preset (see `servesim models`).")
@click.option("--served-model-name", default=None, help="The name clients use (default: --model).")
@click.option("--weights", type=click.Path(exists=True, path_type=Path), default=None,
              help="Hugging Face checkpoint directory (safetensors); default: random weights from --seed.")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="Hugging Face tokenizer directory for text prompts; default: UTF-8 bytes as ids.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, printed at start).")
@click.option("--max-model-len", default=None, type=click.IntRange(min=2),
              help="Longest prompt + completion accepted (default: the model's positions).")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Default: bfloat16 on CUDA, float32 on CPU.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default: torch's).")
@click.option("--kv-blocks", type=click.IntRange(1), default=None,
              help="KV pool blocks. Default: from free memory on CUDA; 2048 on CPU.")
@click.option("--block-size", type=click.IntRange(1, 1024), default=16, show_default=True, help="Tokens per KV block.")
@click.option("--swap-blocks", type=click.IntRange(0), default=None,
              help="Host blocks for swapped-out KV (default: --kv-blocks with --preempt swap, else 0).")
@click.option("--memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9, show_default=True,
              help="Fraction of CUDA memory for weights + KV pool when --kv-blocks is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random weights.")
def serve(**opts: Any) -> None:
    """Serve a model preset on the live engine behind /v1/completions (streaming and not),
    /v1/models, /health and /metrics (vLLM's metric names). Ctrl-C stops it.

    \b
      servesim serve --model tiny --port 8000
      servesim serve --model tiny --policy chunked --token-budget 256 --tokenizer DIR
      servesim bench --url http://127.0.0.1:8000 -n 50 --max-prompt-tokens 512
    """
    try:
        from runtime.build import build_live_engine, place
        from runtime.config import LiveConfig
        from runtime.server import CompletionServer, ServerConfig
        from runtime.tokenizer import load_tokenizer
    except ImportError as e:
        hint = "the real engine needs torch, transformers and safetensors (pip install '.[runtime]')"
        raise click.ClickException(f"{hint}: {e}") from None
    from sim.models import get_model

    try:
        spec = get_model(opts["model"])
        scheduler = build_scheduler(opts)
        if opts["max_model_len"] is not None:
            scheduler = _with_max_model_len(scheduler, opts["max_model_len"])
        live = LiveConfig(
            model=opts["model"], scheduler=scheduler, weights=str(opts["weights"]) if opts["weights"] else None,
            device=opts["device"], dtype=opts["dtype"], threads=opts["threads"], seed=opts["seed"],
            kv_blocks=opts["kv_blocks"], block_size=opts["block_size"], swap_blocks=opts["swap_blocks"],
            memory_utilization=opts["memory_utilization"])
        place(live)
        tokenizer = load_tokenizer(opts["tokenizer_dir"])
    except ValueError as e:
        raise fail(e) from None
    if tokenizer.vocab_size > spec.vocab_size:
        raise click.ClickException(f"--tokenizer has {tokenizer.vocab_size} ids, more than {spec.name}'s vocabulary "
                                   f"of {spec.vocab_size}")
    max_model_len = live.scheduler.max_model_len or spec.max_position
    try:
        engine = build_live_engine(live)
    except ValueError as e:
        raise fail(e) from None
    blocks = engine.runner.blocks
    if blocks.num_blocks * blocks.block_size < max_model_len:
        raise click.ClickException(
            f"the KV pool holds {blocks.num_blocks * blocks.block_size} tokens, less than one request of "
            f"--max-model-len {max_model_len}: raise --kv-blocks or lower --max-model-len")
    engine.runner.warmup()
    try:
        config = ServerConfig(model_name=opts["served_model_name"] or spec.name, max_model_len=max_model_len,
                              vocab_size=spec.vocab_size, block_size=blocks.block_size,
                              num_kv_blocks=blocks.num_blocks, num_host_blocks=blocks.num_host_blocks,
                              host=opts["host"], port=opts["port"])
    except ValueError as e:
        raise fail(e) from None
    server = CompletionServer(engine, tokenizer, config)
    try:
        asyncio.run(_serve_until_signal(server, live.scheduler.policy))
    except OSError as e:  # the port is taken, the address is not ours
        raise click.ClickException(f"cannot listen on {opts['host']}:{opts['port']}: {e.strerror or e}") from None


def _with_max_model_len(scheduler: Any, max_model_len: int) -> Any:
    import dataclasses

    return dataclasses.replace(scheduler, max_model_len=max_model_len)


async def _serve_until_signal(server: Any, policy: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = await server.start()
    c = server.config
    click.echo(f"servesim serve: {c.model_name} ({policy}, {c.num_kv_blocks} KV blocks of {c.block_size}, "
               f"max_model_len {c.max_model_len}) on http://{c.host}:{port}", err=True)
    try:
        await stop.wait()
    finally:
        click.echo("servesim serve: stopping", err=True)
        await server.stop()
