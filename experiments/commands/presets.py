"""``servesim models`` and ``servesim hardware``: the presets."""

from __future__ import annotations

import click

from sim.hardware import GIB, HARDWARE, get_hardware
from sim.models import MODELS, get_model


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


@click.command("models")
@click.argument("name", required=False)
@click.option("--dtype", default="bfloat16", show_default=True, help="dtype for weight and KV bytes.")
def models(name: str | None, dtype: str) -> None:
    """List the model presets, or show one in full."""
    try:
        specs = [get_model(name)] if name else list(MODELS.values())
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    for m in specs:
        click.echo(m.name)
        click.echo(_table([
            ("family", m.family), ("layers", str(m.num_layers)), ("hidden size", str(m.hidden_size)),
            ("heads / kv heads", f"{m.num_heads} / {m.num_kv_heads}"), ("head dim", str(m.head_dim)),
            ("intermediate size", str(m.intermediate_size)), ("vocab", str(m.vocab_size)),
            ("max position", str(m.max_position)), ("parameters", f"{m.num_params / 1e9:.3f} B"),
            (f"weight bytes ({dtype})", f"{m.weight_bytes(dtype) / GIB:.3f} GiB"),
            (f"KV bytes/token ({dtype})", f"{m.kv_bytes_per_token(dtype):,}"),
        ]))


@click.command("hardware")
@click.argument("name", required=False)
def hardware(name: str | None) -> None:
    """List the hardware presets, or show one in full."""
    try:
        specs = [get_hardware(name)] if name else list(HARDWARE.values())
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="NAME") from None
    for h in specs:
        click.echo(h.name)
        click.echo(_table([
            ("peak FLOP/s", f"{h.peak_flops / 1e12:.1f} T"),
            ("memory bandwidth", f"{h.memory_bytes_per_s / 1e9:.0f} GB/s"),
            ("memory", f"{h.memory_bytes / 1e9:.1f} GB"),
            ("host link", f"{h.host_link_bytes_per_s / 1e9:.0f} GB/s"),
            ("efficiency (compute / memory)", f"{h.compute_efficiency} / {h.memory_efficiency}"),
            ("step overhead", f"{h.step_overhead_s * 1000:.1f} ms"),
        ]))
