"""Model architectures, by exact preset name or from a Hugging Face ``config.json``.

A :class:`ModelSpec` is what the simulator needs of a model: its parameters (for memory and
weight reads), the parameters a token multiplies through (FLOPs), and the KV cache it keeps
per token. Dense decoders (Llama, Mistral, Qwen2, Qwen3), mixture-of-experts layers
(:class:`MoESpec`: Mixtral, Qwen2/3-MoE, DeepSeek's shared experts and dense first layers) and
DeepSeek's multi-head latent attention (:class:`MLASpec`) are described. The runtime builds
only the dense families in :data:`RUNTIME_FAMILIES`.

Every preset's shape is its ``config.json`` on the Hugging Face Hub (repository named beside
it); the published parameter counts the tests check against are named there too.
``tiny`` is servesim's own: a few MB, so that tests run in seconds; ``small`` (100 M) is its
own too, for CPU validation and a checkpoint to serve on other engines.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_FAMILIES = ("llama", "qwen2", "mistral")
"""Families the live engine (``runtime/``) can build; the simulator prices every family."""


@dataclass(frozen=True)
class MoESpec:
    """Mixture-of-experts MLPs: each token goes through ``experts_per_token`` of ``num_experts``
    routed experts (SwiGLU, ``expert_intermediate_size`` wide) plus the always-on shared ones."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_intermediate_size: int = 0
    """All shared experts together (DeepSeek: n_shared_experts x moe_intermediate_size)."""
    shared_expert_gate: bool = False
    """Qwen2-MoE's sigmoid gate on the shared expert (a hidden_size x 1 projection)."""
    dense_layers: int = 0
    """Layers with a dense MLP of the model's ``intermediate_size`` instead (DeepSeek's first k)."""
    router_bias: bool = False
    """DeepSeek-V3's per-expert score correction bias (``topk_method: noaux_tc``)."""

    def __post_init__(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"moe experts_per_token must be in 1..{self.num_experts}, got {self.experts_per_token}")
        if self.expert_intermediate_size < 1:
            raise ValueError(f"moe expert_intermediate_size must be >= 1, got {self.expert_intermediate_size}")
        if self.shared_intermediate_size < 0 or self.dense_layers < 0:
            raise ValueError("moe shared_intermediate_size and dense_layers must be >= 0")


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2/V3): K and V come from a ``kv_lora_rank``
    latent that is all the cache keeps, beside one shared ``qk_rope_head_dim`` RoPE key.
    The query/key head is ``ModelSpec.head_dim`` = qk_nope_head_dim + qk_rope_head_dim."""

    kv_lora_rank: int
    q_lora_rank: int | None
    """None: queries are projected directly (DeepSeek-V2-Lite)."""
    qk_rope_head_dim: int
    v_head_dim: int

    def __post_init__(self) -> None:
        for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"mla {name} must be >= 1, got {getattr(self, name)}")
        if self.q_lora_rank is not None and self.q_lora_rank < 1:
            raise ValueError(f"mla q_lora_rank must be >= 1 or None, got {self.q_lora_rank}")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # the config's model_type; the runtime builds RUNTIME_FAMILIES
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
    qk_norm: bool = False
    """Qwen3's RMSNorm on each query and key head (head_dim weights each)."""
    sliding_window: int | None = None
    """Tokens each query attends back to in every layer (Mistral-7B-v0.1); None: all."""
    moe: MoESpec | None = None
    mla: MLASpec | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
                     "max_position"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.name}: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.name}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"{self.name}: sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.moe is not None and self.moe.dense_layers > self.num_layers:
            raise ValueError(f"{self.name}: moe dense_layers {self.moe.dense_layers} > num_layers {self.num_layers}")
        if self.mla is not None and self.mla.qk_rope_head_dim >= self.head_dim:
            raise ValueError(f"{self.name}: mla qk_rope_head_dim must be < head_dim {self.head_dim}")
        if self.moe is None and self.intermediate_size < 1:
            raise ValueError(f"{self.name}: intermediate_size must be >= 1, got {self.intermediate_size}")

    # -- parameters, per part (the sums below and the per-GPU shares in sim.parallel use them)

    @property
    def attention_params(self) -> int:
        """One layer's attention projections (and their biases and norms)."""
        h, d, heads = self.hidden_size, self.head_dim, self.num_heads
        if self.mla is not None:
            m = self.mla
            nope = d - m.qk_rope_head_dim
            # q: direct, or down to q_lora_rank, normed, and up to every head
            r = m.q_lora_rank
            q = h * heads * d if r is None else h * r + r + r * heads * d
            # kv: down to the latent plus the RoPE key, latent normed, up to K-nope and V of every head
            kv = (h * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
                  + m.kv_lora_rank * heads * (nope + m.v_head_dim))
            return q + kv + heads * m.v_head_dim * h
        q = h * heads * d
        kv = 2 * h * self.num_kv_heads * d
        o = heads * d * h
        bias = (heads + 2 * self.num_kv_heads) * d if self.qkv_bias else 0
        norm = 2 * d if self.qk_norm else 0
        return q + kv + o + bias + norm

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One routed expert (0 for a dense model)."""
        return 3 * self.hidden_size * self.moe.expert_intermediate_size if self.moe else 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.moe.dense_layers if self.moe else 0

    @property
    def moe_shared_params(self) -> int:
        """One MoE layer's parameters besides its routed experts: shared experts, router, gates."""
        if self.moe is None:
            return 0
        m = self.moe
        h = self.hidden_size
        return (3 * h * m.shared_intermediate_size + h * m.num_experts + (h if m.shared_expert_gate else 0)
                + (m.num_experts if m.router_bias else 0))

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """The output projection's own parameters: 0 when tied to the embedding."""
        return 0 if self.tie_embeddings else self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        """Every parameter (embeddings included once when tied): what the weights take in memory."""
        h = self.hidden_size
        norms = 2 * h
        dense_layers = self.num_layers - self.num_moe_layers
        total = self.num_layers * (self.attention_params + norms) + dense_layers * self.dense_mlp_params
        if self.moe is not None:
            total += self.num_moe_layers * (self.moe.num_experts * self.expert_params + self.moe_shared_params)
        return total + self.embedding_params + self.lm_head_params + h

    @property
    def unrouted_params(self) -> int:
        """Parameters every step reads whatever the routing: all but the routed experts."""
        return self.num_params - self.num_moe_layers * self.moe.num_experts * self.expert_params if self.moe else (
            self.num_params)

    @property
    def active_params(self) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        if self.moe is None:
            return self.num_params
        return self.unrouted_params + self.num_moe_layers * self.moe.experts_per_token * self.expert_params

    @property
    def matmul_params(self) -> int:
        """Parameters a token multiplies through (embedding lookup excluded, LM head included)."""
        return self.active_params - self.vocab_size * self.hidden_size * (0 if self.tie_embeddings else 1)

    def experts_touched(self, tokens: int) -> float:
        """Expected distinct routed experts per MoE layer that ``tokens`` tokens select, each
        choosing ``experts_per_token`` of ``num_experts`` (routing taken as uniform and
        independent): E x (1 - (1 - k/E)^tokens). 0 for a dense model."""
        if self.moe is None:
            return 0.0
        e, k = self.moe.num_experts, self.moe.experts_per_token
        return e * (1.0 - (1.0 - k / e) ** tokens)

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        return self.num_params * dtype_bytes(dtype)

    @property
    def kv_values_per_token_layer(self) -> int:
        """Cache entries one token keeps in one layer: K and V of every KV head, or MLA's latent
        plus its RoPE key (vLLM's MLA cache layout)."""
        if self.mla is not None:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """The cache one token keeps: 2 x layers x kv_heads x head_dim x dtype bytes (MLA:
        layers x (kv_lora_rank + qk_rope_head_dim) x dtype bytes)."""
        return self.num_layers * self.kv_values_per_token_layer * dtype_bytes(dtype)

    @property
    def attention_flops_per_pair(self) -> int:
        """FLOPs of one query-key pair over all layers: QK^T and PV, 2 FLOPs per multiply-add."""
        v_dim = self.mla.v_head_dim if self.mla is not None else self.head_dim
        return 2 * self.num_layers * self.num_heads * (self.head_dim + v_dim)


def dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}") from None


def _llama(name: str, *, layers: int, hidden: int, heads: int, kv_heads: int, inter: int, vocab: int,
           max_position: int, rope_theta: float) -> ModelSpec:
    return ModelSpec(name, "llama", num_layers=layers, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads,
                     head_dim=hidden // heads, intermediate_size=inter, vocab_size=vocab, max_position=max_position,
                     rope_theta=rope_theta, rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False)


MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec("tiny", "llama", num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                  intermediate_size=384, vocab_size=4096, max_position=2048, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
        # servesim's own ~100 M-parameter Llama with GQA (GPT-2-small's width and depth): steps
        # that cost compute on a CPU (tens of ms, not tiny's interpreter-bound millisecond), and
        # a checkpoint vLLM serves (`servesim checkpoint write --model small`). Tied embeddings:
        # 100.1 M parameters (75.5 M in the layers, 24.6 M embedding).
        ModelSpec("small", "llama", num_layers=12, hidden_size=768, num_heads=12, num_kv_heads=4, head_dim=64,
                  intermediate_size=2048, vocab_size=32000, max_position=4096, rope_theta=10000.0,
                  rms_norm_eps=1e-5, tie_embeddings=True, qkv_bias=False),
        # Qwen/Qwen2.5-0.5B, -1.5B, -7B (use_sliding_window false: full attention).
        ModelSpec("qwen2.5-0.5b", "qwen2", num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
                  head_dim=64, intermediate_size=4864, vocab_size=151936, max_position=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
        ModelSpec("qwen2.5-1.5b", "qwen2", num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2,
                  head_dim=128, intermediate_size=8960, vocab_size=151936, max_position=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
        ModelSpec("qwen2.5-7b", "qwen2", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
                  head_dim=128, intermediate_size=18944, vocab_size=152064, max_position=32768,
                  rope_theta=1000000.0, rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True),
        # meta-llama/Llama-3.1-8B. Llama 3.1 also applies "llama3" RoPE frequency scaling beyond
        # 8k tokens; it changes no shape and no cost, so the presets leave it out.
        _llama("llama-3.1-8b", layers=32, hidden=4096, heads=32, kv_heads=8, inter=14336, vocab=128256,
               max_position=131072, rope_theta=500000.0),
        # meta-llama/Llama-2-7b-hf
        _llama("llama-2-7b", layers=32, hidden=4096, heads=32, kv_heads=32, inter=11008, vocab=32000,
               max_position=4096, rope_theta=10000.0),
        # meta-llama/Llama-2-70b-hf; published: 68,976,648,192 parameters (its safetensors index).
        _llama("llama-2-70b", layers=80, hidden=8192, heads=64, kv_heads=8, inter=28672, vocab=32000,
               max_position=4096, rope_theta=10000.0),
        # meta-llama/Llama-3.1-70B; published: 70,553,706,496 parameters (its safetensors index).
        _llama("llama-3.1-70b", layers=80, hidden=8192, heads=64, kv_heads=8, inter=28672, vocab=128256,
               max_position=131072, rope_theta=500000.0),
        # meta-llama/Llama-3.1-405B; published: 405.85 B parameters (Meta's model card: 405B;
        # the safetensors index of the bf16 checkpoint).
        _llama("llama-3.1-405b", layers=126, hidden=16384, heads=128, kv_heads=8, inter=53248, vocab=128256,
               max_position=131072, rope_theta=500000.0),
        # mistralai/Mixtral-8x7B-v0.1; published (Mistral AI, "Mixtral of experts", 2023):
        # 46.7 B parameters, 12.9 B used per token.
        ModelSpec("mixtral-8x7b", "mixtral", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                  head_dim=128, intermediate_size=14336, vocab_size=32000, max_position=32768, rope_theta=1e6,
                  rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False,
                  moe=MoESpec(num_experts=8, experts_per_token=2, expert_intermediate_size=14336)),
        # Qwen/Qwen3-32B; published (its model card): 32.8 B parameters, 31.2 B non-embedding.
        ModelSpec("qwen3-32b", "qwen3", num_layers=64, hidden_size=5120, num_heads=64, num_kv_heads=8,
                  head_dim=128, intermediate_size=25600, vocab_size=151936, max_position=40960, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=False, qk_norm=True),
        # Qwen/Qwen3-30B-A3B; published (its model card): 30.5 B parameters, 3.3 B activated,
        # 29.9 B non-embedding.
        ModelSpec("qwen3-30b-a3b", "qwen3_moe", num_layers=48, hidden_size=2048, num_heads=32, num_kv_heads=4,
                  head_dim=128, intermediate_size=6144, vocab_size=151936, max_position=40960, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=False, qk_norm=True,
                  moe=MoESpec(num_experts=128, experts_per_token=8, expert_intermediate_size=768)),
        # deepseek-ai/DeepSeek-V3; published (DeepSeek-V3 technical report): 671 B parameters,
        # 37 B activated per token, not counting the 14 B of the multi-token-prediction module.
        ModelSpec("deepseek-v3", "deepseek_v3", num_layers=61, hidden_size=7168, num_heads=128, num_kv_heads=128,
                  head_dim=192, intermediate_size=18432, vocab_size=129280, max_position=163840, rope_theta=10000.0,
                  rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=False,
                  moe=MoESpec(num_experts=256, experts_per_token=8, expert_intermediate_size=2048,
                              shared_intermediate_size=2048, dense_layers=3, router_bias=True),
                  mla=MLASpec(kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128)),
    ]
}


def looks_like_path(name: str) -> bool:
    """A --model value that names a file or directory rather than a preset."""
    return "/" in name or name.endswith(".json") or Path(name).exists()


def get_model(name: str) -> ModelSpec:
    """The preset ``name``, or the model of a ``config.json`` (or a checkpoint directory holding one)."""
    if name in MODELS:
        return MODELS[name]
    if looks_like_path(name):
        from sim.hf_config import load_hf_config

        return load_hf_config(name)
    raise ValueError(f"unknown model {name!r}: not a preset (known: {', '.join(MODELS)}) "
                     "nor a config.json path")
