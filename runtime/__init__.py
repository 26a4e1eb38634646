"""servesim's real engine: a Llama-family network in PyTorch with a paged KV cache, driven by the
same scheduling policies as the simulator (see DESIGN.md, "The seam").

Importing ``runtime`` imports torch; nothing in ``sim`` imports ``runtime``, so the simulator
runs without torch installed. The pieces, one noun per module:

- :mod:`runtime.model` - the network and ``hf_config(spec)``;
- :mod:`runtime.weights` - Hugging Face state dicts: checkpoint loading, random init;
- :mod:`runtime.kvcache` - the paged device pool and the host swap pool;
- :mod:`runtime.runner` - ``ModelRunner.execute(batch)``: one engine step;
- :mod:`runtime.engine` - ``LiveEngine``: the simulator's replica loop on a wall clock;
- :mod:`runtime.hf_static` - a static-batching reference engine on transformers' ``generate``.
"""

from __future__ import annotations

from runtime.engine import LiveEngine, LiveResult
from runtime.kvcache import KVCache
from runtime.model import Transformer, hf_config
from runtime.runner import ModelRunner, prompt_token_ids
from runtime.weights import load_model, resolve_device, resolve_dtype

__all__ = [
    "KVCache",
    "LiveEngine",
    "LiveResult",
    "ModelRunner",
    "Transformer",
    "hf_config",
    "load_model",
    "prompt_token_ids",
    "resolve_device",
    "resolve_dtype",
]
