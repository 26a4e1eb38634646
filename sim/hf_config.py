"""A :class:`~sim.models.ModelSpec` from a Hugging Face ``config.json``.

Reads the fields transformers' own config classes define for each ``model_type``: llama,
mistral, qwen2, qwen3 (dense); mixtral, qwen2_moe, qwen3_moe, deepseek (DeepSeekMoE) and
deepseek_v2 / deepseek_v3 (MoE with shared experts, dense first layers and, for V2/V3,
multi-head latent attention). Defaults are those classes' defaults. A field the simulator
cannot price (a bias it does not count, a layer pattern it does not describe) is an error
that names it, never silently ignored.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sim.models import MLASpec, ModelSpec, MoESpec

DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek", "deepseek_v2", "deepseek_v3")
MODEL_TYPES = DENSE_TYPES + MOE_TYPES


class ModelConfigError(ValueError):
    """A config.json that cannot be described; the message names the file and the field."""


class _Fields:
    """Typed access to a config's fields; every error names the file and the field."""

    def __init__(self, data: dict[str, Any], where: str) -> None:
        self.data = data
        self.where = where

    def error(self, name: str, why: str) -> ModelConfigError:
        return ModelConfigError(f"{self.where}: field {name!r} {why}")

    def integer(self, name: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.data.get(name, default)
        if value is None:
            if default is None:
                raise self.error(name, "is missing")
            value = default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"must be an integer, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def optional_int(self, name: str) -> int | None:
        return None if self.data.get(name) is None else self.integer(name)

    def number(self, name: str, default: float) -> float:
        value = self.data.get(name, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
            raise self.error(name, f"must be a number > 0, got {value!r}")
        return float(value)

    def flag(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {value!r}")
        return value

    def unsupported(self, name: str, allowed: object, why: str) -> None:
        """Refuse a value other than ``allowed`` (absent counts as allowed)."""
        if self.data.get(name, allowed) not in (allowed, None):
            raise self.error(name, f"is {self.data[name]!r}: {why}")


def _rope_theta(f: _Fields) -> float:
    # transformers >= 4.56 may write rope_theta inside rope_parameters.
    params = f.data.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params and "rope_theta" not in f.data:
        return _Fields(params, f"{f.where}: rope_parameters").number("rope_theta", 10000.0)
    return f.number("rope_theta", 10000.0)


def _sliding_window(f: _Fields, model_type: str, layers: int) -> int | None:
    if model_type == "mistral" or model_type == "mixtral":
        return f.optional_int("sliding_window")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and f.flag("use_sliding_window", False):
        window = f.integer("sliding_window", 4096)
        # Qwen applies the window only to layers from max_window_layers on.
        if f.integer("max_window_layers", layers, minimum=0) != 0:
            raise f.error("max_window_layers", "is not 0: a window on only some layers is not supported "
                                               "(the window would apply to every layer)")
        return window
    return None


def _moe(f: _Fields, model_type: str, layers: int, intermediate: int) -> MoESpec | None:
    if model_type == "mixtral":
        experts = f.integer("num_local_experts", 8)
        return MoESpec(experts, f.integer("num_experts_per_tok", 2), intermediate)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = f.integer("decoder_sparse_step", 1)
        mlp_only = f.data.get("mlp_only_layers") or []
        if not isinstance(mlp_only, list) or not all(isinstance(i, int) and 0 <= i < layers for i in mlp_only):
            raise f.error("mlp_only_layers", f"must be a list of layer indices in 0..{layers - 1}")
        moe_layers = sum(1 for i in range(layers) if i not in mlp_only and (i + 1) % step == 0)
        shared = f.integer("shared_expert_intermediate_size", 0, minimum=0) if model_type == "qwen2_moe" else 0
        return MoESpec(f.integer("num_experts"), f.integer("num_experts_per_tok"), f.integer("moe_intermediate_size"),
                       shared_intermediate_size=shared, shared_expert_gate=shared > 0,
                       dense_layers=layers - moe_layers)
    if model_type in ("deepseek", "deepseek_v2", "deepseek_v3"):
        first_dense = f.integer("first_k_dense_replace", 0, minimum=0)
        freq = f.integer("moe_layer_freq", 1)
        moe_layers = sum(1 for i in range(layers) if i >= first_dense and i % freq == 0)
        expert = f.integer("moe_intermediate_size")
        shared = f.integer("n_shared_experts", 0, minimum=0)
        topk_method = f.data.get("topk_method", "greedy")
        return MoESpec(f.integer("n_routed_experts"), f.integer("num_experts_per_tok"), expert,
                       shared_intermediate_size=shared * expert, dense_layers=layers - moe_layers,
                       router_bias=topk_method == "noaux_tc")
    return None


def _mla(f: _Fields, model_type: str) -> tuple[MLASpec | None, int | None]:
    """MLA and its query/key head dim (qk_nope + qk_rope), for DeepSeek-V2/V3."""
    if model_type not in ("deepseek_v2", "deepseek_v3"):
        return None, None
    rope = f.integer("qk_rope_head_dim")
    mla = MLASpec(kv_lora_rank=f.integer("kv_lora_rank"), q_lora_rank=f.optional_int("q_lora_rank"),
                  qk_rope_head_dim=rope, v_head_dim=f.integer("v_head_dim"))
    return mla, f.integer("qk_nope_head_dim") + rope


def spec_from_hf_config(data: object, name: str, where: str | None = None) -> ModelSpec:
    """The ModelSpec of a parsed ``config.json``; ``where`` names the file in errors."""
    where = where or name
    if not isinstance(data, dict):
        raise ModelConfigError(f"{where}: not a model config (the top level must be a JSON object)")
    f = _Fields(data, where)
    if "text_config" in data and "hidden_size" not in data:
        raise f.error("text_config", "is set: a multimodal config; pass its language model's config.json")
    model_type = data.get("model_type")
    if model_type is None:
        raise f.error("model_type", f"is missing (one of {', '.join(MODEL_TYPES)})")
    if model_type not in MODEL_TYPES:
        raise f.error("model_type", f"is {model_type!r}; supported: {', '.join(MODEL_TYPES)}")
    layers = f.integer("num_hidden_layers")
    hidden = f.integer("hidden_size")
    heads = f.integer("num_attention_heads")
    kv_heads = f.integer("num_key_value_heads", heads)
    mla, mla_head_dim = _mla(f, model_type)
    head_dim = mla_head_dim if mla_head_dim is not None else f.integer("head_dim", hidden // heads)
    if mla is None and hidden % heads and data.get("head_dim") is None:
        raise f.error("head_dim", f"is missing and hidden_size {hidden} is not a multiple of "
                                  f"num_attention_heads {heads}")
    if heads % kv_heads:
        raise f.error("num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}")
    intermediate = f.integer("intermediate_size")
    f.unsupported("mlp_bias", False, "MLP biases are not counted")
    f.unsupported("hidden_act", "silu", "only SwiGLU (silu) MLPs are described")
    if model_type in ("qwen2", "qwen2_moe"):
        qkv_bias = True  # Qwen2 always biases q, k and v
    else:
        # Llama's attention_bias also biases o_proj; Qwen3 and DeepSeek-V2/V3 bias q/k/v only.
        if model_type in ("llama", "mistral", "mixtral", "deepseek"):
            f.unsupported("attention_bias", False, "attention biases are not counted for this model_type")
        qkv_bias = f.flag("attention_bias", False) and mla is None
    if mla is not None:
        f.unsupported("attention_bias", False, "MLA attention biases are not counted")
    spec = ModelSpec(
        name=name, family=model_type, num_layers=layers, hidden_size=hidden, num_heads=heads,
        num_kv_heads=heads if mla is not None else kv_heads, head_dim=head_dim, intermediate_size=intermediate,
        vocab_size=f.integer("vocab_size"), max_position=f.integer("max_position_embeddings", 4096),
        rope_theta=_rope_theta(f), rms_norm_eps=f.number("rms_norm_eps", 1e-6),
        tie_embeddings=f.flag("tie_word_embeddings", False), qkv_bias=qkv_bias,
        qk_norm=model_type in ("qwen3", "qwen3_moe"), sliding_window=_sliding_window(f, model_type, layers),
        moe=_moe(f, model_type, layers, intermediate), mla=mla,
    )
    return spec


def load_hf_config(path: str | Path) -> ModelSpec:
    """Read ``path`` (a config.json, or a checkpoint directory holding one); the spec is named
    by the path as given. Raises :class:`ModelConfigError` naming the file and the field."""
    given = str(path)
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        text = p.read_text()
    except OSError as e:
        raise ModelConfigError(f"{p}: cannot read the model config: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelConfigError(f"{p}:{e.lineno}: not valid JSON: {e.msg}") from None
    try:
        return spec_from_hf_config(data, given, str(p))
    except ModelConfigError:
        raise
    except ValueError as e:
        raise ModelConfigError(f"{p}: {e}") from None
