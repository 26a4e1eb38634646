"""Weights as Hugging Face state dicts: read from a checkpoint directory, or drawn at random.

Both paths give a ``dict[str, Tensor]`` under transformers' parameter names, and both go
through :meth:`runtime.model.Transformer.load_hf_state_dict`, so a test that copies a
transformers model's weights exercises the checkpoint path. Nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from runtime.model import Transformer, default_pad_rows, hf_config
from sim.models import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INIT_STD = 0.02  # transformers' initializer_range default for these families


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None`` is bfloat16 on CUDA and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def hf_param_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every parameter of ``spec`` under its Hugging Face name, in a fixed order."""
    hid, d, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (spec.vocab_size, hid)}
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (spec.num_heads * d, hid)
        shapes[p + "self_attn.k_proj.weight"] = (spec.num_kv_heads * d, hid)
        shapes[p + "self_attn.v_proj.weight"] = (spec.num_kv_heads * d, hid)
        if spec.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (spec.num_heads * d,)
            shapes[p + "self_attn.k_proj.bias"] = (spec.num_kv_heads * d,)
            shapes[p + "self_attn.v_proj.bias"] = (spec.num_kv_heads * d,)
        shapes[p + "self_attn.o_proj.weight"] = (hid, spec.num_heads * d)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hid)
        shapes[p + "mlp.up_proj.weight"] = (inter, hid)
        shapes[p + "mlp.down_proj.weight"] = (hid, inter)
        shapes[p + "input_layernorm.weight"] = (hid,)
        shapes[p + "post_attention_layernorm.weight"] = (hid,)
    shapes["model.norm.weight"] = (hid,)
    if not spec.tie_embeddings:
        shapes["lm_head.weight"] = (spec.vocab_size, hid)
    return shapes


def random_state_dict(spec: ModelSpec, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """transformers' initialisation: N(0, 0.02) matrices and embeddings, zero biases, unit norms.

    Deterministic for a (seed, device): drawn in :func:`hf_param_shapes` order from one generator.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    out: dict[str, Tensor] = {}
    for name, shape in hf_param_shapes(spec).items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=dtype, device=device)
        elif name.endswith(".bias"):
            out[name] = torch.zeros(shape, dtype=dtype, device=device)
        else:
            out[name] = torch.empty(shape, dtype=dtype, device=device).normal_(0.0, INIT_STD, generator=gen)
    return out


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """A Hugging Face checkpoint's tensors: a directory of ``*.safetensors`` (single or sharded
    with ``model.safetensors.index.json``) or one ``.safetensors`` file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files = [path / n for n in names]
        else:
            files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files (only safetensors checkpoints are read)")
    else:
        raise FileNotFoundError(f"weights path {path} does not exist")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f), device=str(device)))
    return state


def load_model(spec: ModelSpec, weights: str | Path | dict[str, Tensor] | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0) -> Transformer:
    """The network on ``device`` in ``dtype``, in eval mode: weights from a checkpoint path, a
    Hugging Face state dict, or (``None``) random with ``seed``."""
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(spec)
    model = model.to(dtype).to_empty(device=device)  # no wasted init: every parameter is loaded below
    model.tie_weights()
    if weights is None:
        state = random_state_dict(spec, seed, dtype, device)
    elif isinstance(weights, dict):
        state = weights
    else:
        state = load_checkpoint(weights, device)
    model.load_hf_state_dict(state)
    model.pad_small_products(default_pad_rows(spec, device, dtype))
    return model.eval().requires_grad_(False)


def build_hf_model(spec: ModelSpec, state: dict[str, Tensor], dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> Any:
    """transformers' own ``*ForCausalLM`` for ``spec`` with the given weights (eval mode)."""
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

    classes: dict[str, Any] = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}
    with torch.device(device):
        model = classes[spec.family]._from_config(hf_config(spec), dtype=dtype, attn_implementation="sdpa")
    missing, unexpected = model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=False)
    missing = [m for m in missing if not (spec.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{spec.name}: transformers model missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval().requires_grad_(False)
