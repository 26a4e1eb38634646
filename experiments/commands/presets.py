"""``servesim models`` and ``servesim hardware``: the presets, or a model's config.json."""

from __future__ import annotations

import click

from sim.hardware import GIB, HARDWARE, get_hardware
from sim.models import MODELS, ModelSpec, get_model


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def _model_rows(m: ModelSpec, dtype: str) -> list[tuple[str, str]]:
    rows = [
        ("family", m.family), ("layers", str(m.num_layers)), ("hidden size", str(m.hidden_size)),
        ("heads / kv heads", f"{m.num_heads} / {m.num_kv_heads}"), ("head dim", str(m.head_dim)),
        ("intermediate size", str(m.intermediate_size)), ("vocab", str(m.vocab_size)),
        ("max position", str(m.max_position)),
    ]
    if m.sliding_window is not None:
        rows.append(("sliding window", f"{m.sliding_window} tokens"))
    if m.mla is not None:
        rows.append(("attention", f"MLA: kv_lora_rank {m.mla.kv_lora_rank}, q_lora_rank {m.mla.q_lora_rank}, "
                                  f"rope dim {m.mla.qk_rope_head_dim}, v dim {m.mla.v_head_dim}"))
    if m.moe is not None:
        moe = m.moe
        shared = f", shared {moe.shared_intermediate_size} wide" if moe.shared_intermediate_size else ""
        dense = f", {moe.dense_layers} dense layers" if moe.dense_layers else ""
        rows.append(("experts", f"{moe.experts_per_token} of {moe.num_experts} routed, "
                                f"{moe.expert_intermediate_size} wide{shared}{dense}"))
    rows += [
        ("parameters", f"{m.num_params / 1e9:.3f} B ({m.num_params:,})"),
        ("active parameters", f"{m.active_params / 1e9:.3f} B per token"),
        (f"weight bytes ({dtype})", f"{m.weight_bytes(dtype) / GIB:.3f} GiB"),
        (f"KV bytes/token ({dtype})", f"{m.kv_bytes_per_token(dtype):,}"),
    ]
    return rows


@click.command("models")
@click.argument("name", required=False, metavar="[NAME|PATH]")
@click.option("--dtype", default="bfloat16", show_default=True, help="dtype for weight and KV bytes.")
def models(name: str | None, dtype: str) -> None:
    """List the model presets, or show one in full: a preset NAME, or the PATH of a Hugging
    Face config.json (or a checkpoint directory holding one)."""
    try:
        specs = [get_model(name)] if name else list(MODELS.values())
        for m in specs:
            rows = _model_rows(m, dtype)
            click.echo(m.name)
            click.echo(_table(rows))
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="NAME|PATH" if name else "--dtype") from None


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
            ("peak FLOP/s", f"{h.peak_flops / 1e12:.1f} T (dense bf16)"),
            ("memory bandwidth", f"{h.memory_bytes_per_s / 1e9:.0f} GB/s"),
            ("memory", f"{h.memory_bytes / 1e9:.1f} GB"),
            ("interconnect", f"{h.interconnect}: {h.link_bytes_per_s / 1e9:.0f} GB/s each way, "
                             f"{h.link_latency_s * 1e6:.0f} us per hop"),
            ("host link", f"{h.host_link_bytes_per_s / 1e9:.0f} GB/s"),
            ("efficiency (compute / memory / link)",
             f"{h.compute_efficiency} / {h.memory_efficiency} / {h.link_efficiency}"),
            ("step overhead", f"{h.step_overhead_s * 1000:.1f} ms"),
            ("source", h.source),
        ]))
