"""Model architecture presets, by exact name, shared by the simulator and the runtime.

Shapes are the published ``config.json`` values of each model on the Hugging Face Hub
(Qwen/Qwen2.5-0.5B, -1.5B, -7B; meta-llama/Llama-3.1-8B; meta-llama/Llama-2-7b-hf).
``tiny`` is servesim's own: a few MB, so that tests and CPU demos run in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "llama" | "qwen2" | "mistral": selects the transformers config class
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position: int
    rope_theta: float
    rms_norm_eps: float
    tie_embeddings: bool
    qkv_bias: bool

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included once when tied)."""
        h, d = self.hidden_size, self.head_dim
        q = h * self.num_heads * d
        kv = 2 * h * self.num_kv_heads * d
        o = self.num_heads * d * h
        bias = (self.num_heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        mlp = 3 * h * self.intermediate_size
        norms = 2 * h
        layer = q + kv + o + bias + mlp + norms
        embed = self.vocab_size * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.num_layers * layer + embed + head + h

    @property
    def matmul_params(self) -> int:
        """Parameters a token multiplies through (embedding lookup excluded, LM head included)."""
        return self.num_params - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        return self.num_params * dtype_bytes(dtype)

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """K and V for every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes(dtype)


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("tiny", "llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                  intermediate_size=384, vocab_size=4096, max_position=2048, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
        ModelSpec("qwen2.5-0.5b", "qwen2", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                  head_dim=64, intermediate_size=4864, vocab_size=151936, max_position=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
        ModelSpec("qwen2.5-1.5b", "qwen2", num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2,
                  head_dim=128, intermediate_size=8960, vocab_size=151936, max_position=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
        ModelSpec("qwen2.5-7b", "qwen2", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
                  head_dim=128, intermediate_size=18944, vocab_size=152064, max_position=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True),
        # Llama 3.1 also applies "llama3" RoPE frequency scaling beyond 8k tokens; it changes
        # no shape and no cost, so the preset leaves it out.
        ModelSpec("llama-3.1-8b", "llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                  head_dim=128, intermediate_size=14336, vocab_size=128256, max_position=131072,
                  rope_theta=500000.0, rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
        ModelSpec("llama-2-7b", "llama", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=32,
                  head_dim=128, intermediate_size=11008, vocab_size=32000, max_position=4096,
                  rope_theta=10000.0, rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
    ]
}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(MODELS)}") from None
