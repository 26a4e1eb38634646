"""What a step of a few rows costs, with and without :class:`runtime.model.Linear`'s padding.

Two tables, measured side by side in one run (interleaved rounds, median per cell):

1. each projection of the model (its weight shapes) on 1..16 input rows, ``F.linear`` as is
   and with every count from 2 to ``--pad-to`` - 1 padded to ``--pad-to``;
2. whole decode steps of 1..16 sequences through the model runner (contexts spread as the
   calibration grid spreads them), unpadded and padded the same way.

The ratio columns are padded / unpadded: where a ratio is below 1, padding pays. On a CPU in
float32, torch's product (MKL) runs 2 and 3 rows as matrix-vector products and 4 rows as a
blocked product, so unpadded 3 rows cost more than 4; that is why the runtime pads 2 and 3
rows to 4 there (:func:`runtime.model.default_pad_rows`). Past 4 rows it works in blocks of 3
rows up to 15 and switches to a wider kernel at 16, so 15 rows cost more than 16; the runtime
pads 7-15 rows to 16 (the second command's ratios below 1 from 7 rows on). Run::

    python experiments/bench_gemm_rows.py --model small --dtype float32
    python experiments/bench_gemm_rows.py --model small --pad-to 16 --context 256 \
        --rows 1,4,5,6,7,8,9,10,11,12,13,14,15,16,17,24,32
"""

from __future__ import annotations

import statistics
import time

import click


def _median_ms(layer, x, runs: int) -> float:
    layer(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        layer(x)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def _row_counts(ctx, param, value: str) -> list[int]:
    try:
        counts = [int(r) for r in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {value!r}") from None
    if any(n < 1 for n in counts):
        raise click.BadParameter(f"row counts must be >= 1, got {value!r}")
    return counts


@click.command(help=__doc__)
@click.option("--model", default="small", show_default=True, help="A model preset (servesim models).")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--pad-to", default=4, show_default=True, type=click.IntRange(3, 64),
              help="Rows 2..N-1 padded to N, compared with no padding.")
@click.option("--rows", default="1,2,3,4,6,8,16", show_default=True, callback=_row_counts,
              help="Row counts (and decode batch sizes).")
@click.option("--context", default=512, show_default=True, type=click.IntRange(8), help="Longest decode context.")
@click.option("--rounds", default=6, show_default=True, type=click.IntRange(1), help="Interleaved rounds.")
@click.option("--threads", type=click.IntRange(1), default=None, help="torch CPU threads (default torch's).")
def main(model: str, dtype: str, pad_to: int, rows: list[int], context: int, rounds: int, threads: int | None) -> None:
    import torch

    from calibrate.grid import GridPoint, spread_contexts
    from calibrate.measure import _FakeRequests, time_step
    from runtime.build import build_runner
    from runtime.config import LiveConfig
    from runtime.model import Linear
    from sim.models import get_model

    try:
        get_model(model)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--model") from None
    counts = rows
    padding = {r: pad_to for r in range(2, pad_to)}
    if threads is not None:
        torch.set_num_threads(threads)
    runner = build_runner(LiveConfig(model=model, device="cpu", dtype=dtype, kv_blocks=64 * max(counts) + 64))
    net = runner.model
    click.echo(f"{model} {dtype} on cpu, {torch.get_num_threads()} threads, torch {torch.__version__}")

    projections = {name: m for name, m in net.named_modules() if isinstance(m, Linear)}
    shapes: dict[tuple[int, ...], str] = {}
    for name, m in projections.items():  # one of each weight shape, named by its last part
        shapes.setdefault(tuple(m.weight.shape), name.split(".")[-1])
    cells: dict[tuple[str, int, int], list[float]] = {}
    layers = {shape: Linear(shape[1], shape[0], bias=False).to(net.dtype).requires_grad_(False) for shape in shapes}
    for _ in range(rounds):
        for shape, layer in layers.items():
            for n in counts:
                x = torch.randn(n, shape[1], dtype=net.dtype)
                for pad in (False, True):
                    layer.pad_rows = padding if pad else {}
                    cells.setdefault((shapes[shape], n, pad), []).append(_median_ms(layer, x, 5))
    click.echo(f"\nprojection ms by rows: unpadded / 2..{pad_to - 1} rows padded to {pad_to} (ratio)")
    click.echo(f"{'projection':<14}" + "".join(f"{n:>20}" for n in counts))
    for shape, label in shapes.items():
        line = f"{label:<14}"
        for n in counts:
            a, b = (statistics.median(cells[label, n, pad]) for pad in (False, True))
            line += f"{f'{a:.3f}/{b:.3f} ({b / a:.2f})':>20}"
        click.echo(f"{line}   {shape[0]}x{shape[1]}")

    fakes = _FakeRequests()
    steps: dict[tuple[int, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(rounds):
            for n in counts:
                seqs = fakes.seqs(GridPoint(decode=spread_contexts(context, n)))
                for pad in (False, True):
                    net.pad_small_products(padding if pad else {})
                    time_step(runner, seqs)
                    steps.setdefault((n, pad), []).extend(time_step(runner, seqs)[0] for _ in range(3))
    click.echo(f"\ndecode step ms by sequences (contexts up to {context}): unpadded, padded, ratio")
    for n in counts:
        a, b = (statistics.median(steps[n, pad]) for pad in (False, True))
        click.echo(f"{n:>4} seqs  {a:8.2f}  {b:8.2f}  {b / a:5.2f}")


if __name__ == "__main__":
    main()
