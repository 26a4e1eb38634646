"""Decode step time by batch size, read from a serving engine's stream (black-box).

For every batch size B of ``--batches`` and context of ``--contexts``, B requests with prompts
of that length are sent at once, ``--repeats`` times; once all have their first token each
step decodes the B together, and each gap between tokens is one step (read as ``servesim
calibrate --engine vllm --url`` reads it, :func:`calibrate.vllm_blackbox.decode_steps`). Prints
the median step per cell and writes ``decode-batches.csv``. Where the cost bends (a kernel's
regime, a batch-size bucket) is where a calibration's decode batches must lie::

    python experiments/decode_batches.py --vllm-python VENV/bin/python -o runs/decode-batches
    python experiments/decode_batches.py --url http://127.0.0.1:8000 -o runs/decode-batches

With ``--vllm-python`` it writes the ``small`` checkpoint (kept in ``OUT/ckpt``), starts vLLM on
it as ``experiments/vllm_check.py`` does, and stops it at the end; with ``--url`` it measures a
server you run (any OpenAI-compatible streaming server).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

VLLM_PYTHON_ENV = "SERVESIM_VLLM_PYTHON"


def _sizes(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running server (http://HOST:PORT)")
    where.add_argument("--vllm-python", default=os.environ.get(VLLM_PYTHON_ENV),
                       help=f"start vLLM with this python [default: ${VLLM_PYTHON_ENV}]")
    p.add_argument("--batches", type=_sizes, default=[*range(1, 21), 24, 32],
                   help="decode batch sizes, comma-separated [default: 1 to 20, 24, 32]")
    p.add_argument("--contexts", type=_sizes, default=[32, 256], help="prompt lengths [default: 32,256]")
    p.add_argument("--tokens", type=int, default=12, help="output tokens per request (>= 3) [default: 12]")
    p.add_argument("--repeats", type=int, default=3, help="rounds over every cell [default: 3]")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds to wait for vLLM [default: 600]")
    p.add_argument("-o", "--output", type=Path, default=Path("runs/decode-batches"))
    args = p.parse_args(argv)
    if args.url:
        args.vllm_python = None  # the server given is measured; $SERVESIM_VLLM_PYTHON is not used
    elif not args.vllm_python:
        p.error(f"give --url URL (a running server) or --vllm-python PATH (or set ${VLLM_PYTHON_ENV}) to start vLLM")
    if args.tokens < 3:
        p.error(f"--tokens: need >= 3 (two gaps after the first token), got {args.tokens}")
    if args.repeats < 1:
        p.error(f"--repeats: need >= 1, got {args.repeats}")
    if args.vllm_python is not None and not Path(args.vllm_python).exists():
        p.error(f"--vllm-python: {args.vllm_python}: no such file")
    return args


def measure(url: str, batches: Sequence[int], contexts: Sequence[int], tokens: int, repeats: int,
            echo: Callable[[str], None]) -> dict[tuple[int, int], list[float]]:
    """Step seconds of every (batch, context) cell, all rounds pooled; the rounds interleave
    the cells so that a slow spell of the machine spreads over all of them."""
    from calibrate.vllm_blackbox import _Client, decode_steps

    # prompt ids below 4096 are in every vocabulary served here (tiny's is 4096); a step's time
    # does not depend on which ids it reads
    client = _Client(url=url, model=None, vocab_size=4096, seed=0)
    client.run([(0.0, 16, tokens)])  # warm-up, not kept
    steps: dict[tuple[int, int], list[float]] = {(b, c): [] for b in batches for c in contexts}
    for r in range(repeats):
        echo(f"round {r + 1}/{repeats}: {len(steps)} cells")
        for b in batches:
            for c in contexts:
                steps[b, c] += [s for _, s in decode_steps(client.run([(0.0, c, tokens)] * b))]
    return steps


def report(steps: dict[tuple[int, int], list[float]], path: Path, echo: Callable[[str], None]) -> None:
    contexts = sorted({c for _, c in steps})
    echo("decode step ms (median over the steps read), by batch and prompt length:")
    echo(f"{'batch':>5}" + "".join(f"{f'ctx {c}':>12}" for c in contexts))
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["batch", "context", "steps", "median_ms"])
        for b in sorted({b for b, _ in steps}):
            line = f"{b:>5}"
            for c in contexts:
                found = steps[b, c]
                median = statistics.median(found) * 1000 if found else None
                line += f"{'-' if median is None else f'{median:.2f}':>12}"
                out.writerow([b, c, len(found), "" if median is None else f"{median:.4f}"])
            echo(line)
    echo(f"wrote {path} ('-': no clean step read, e.g. the server coalesced the stream)")


def main(argv: Sequence[str] | None = None, echo: Callable[[str], None] = print) -> int:
    args = parse_args(argv)
    from calibrate.errors import CalibrationError
    from experiments.validation.external import ExternalError, VllmLaunch, vllm_server
    from experiments.vllm_check import KV_CACHE_GIB, MAX_MODEL_LEN, ensure_checkpoint

    out: Path = args.output
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.url:
            steps = measure(args.url, args.batches, args.contexts, args.tokens, args.repeats, echo)
        else:
            launch = VllmLaunch(python=args.vllm_python, checkpoint=ensure_checkpoint(out / "ckpt", echo),
                                max_model_len=MAX_MODEL_LEN, kv_cache_gib=KV_CACHE_GIB,
                                startup_timeout_s=args.startup_timeout)
            with vllm_server(launch, out / "vllm-server.log", echo) as url:
                steps = measure(url, args.batches, args.contexts, args.tokens, args.repeats, echo)
    except (ExternalError, CalibrationError, ValueError) as e:
        echo(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        echo("interrupted (Ctrl-C); nothing written")
        return 130
    report(steps, out / "decode-batches.csv", echo)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
