"""servesim's real engine: a Llama-family network in PyTorch with a paged KV cache, driven by the
same scheduling policies as the simulator (see DESIGN.md, "The seam").

Nothing in ``sim`` imports ``runtime``, so the simulator runs without torch installed; the
names below are imported on first use, so that :mod:`runtime.config` (no torch) can be read
where torch is missing. The pieces, one noun per module:

- :mod:`runtime.model` - the network and ``hf_config(spec)``;
- :mod:`runtime.weights` - Hugging Face state dicts: checkpoint loading, random init;
- :mod:`runtime.kvcache` - the paged device pool and the host swap pool;
- :mod:`runtime.runner` - ``ModelRunner.execute(batch)``: one engine step;
- :mod:`runtime.engine` - ``LiveEngine``: the simulator's replica loop on a wall clock;
- :mod:`runtime.hf_static` - a static-batching reference engine on transformers' ``generate``;
- :mod:`runtime.config` - ``LiveConfig``, the resolved configuration of a live engine (no torch);
- :mod:`runtime.build` - ``build_live_engine(config)``: the one place the engine is assembled.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runtime.engine import LiveEngine, LiveResult
    from runtime.kvcache import KVCache
    from runtime.model import Transformer, hf_config
    from runtime.runner import ModelRunner, prompt_token_ids
    from runtime.weights import load_model, resolve_device, resolve_dtype

_HOMES = {"LiveEngine": "engine", "LiveResult": "engine", "KVCache": "kvcache", "Transformer": "model",
          "hf_config": "model", "ModelRunner": "runner", "prompt_token_ids": "runner", "load_model": "weights",
          "resolve_device": "weights", "resolve_dtype": "weights"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"runtime.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


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
