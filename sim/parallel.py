"""Tensor and pipeline parallelism: what each GPU of a replica holds and what the GPUs exchange.

Megatron-style tensor parallelism over ``tp`` GPUs, as vLLM does it: attention heads, MLP and
expert widths, the embedding and the LM head are split ``tp`` ways; KV heads too, except that
when there are fewer KV heads than GPUs each head is copied (``max(1, kv_heads // tp)`` per
GPU) and MLA's latent cache is copied on every GPU. Each layer all-reduces its attention and
its MLP output (``2 x layers`` all-reduces, plus one for the embedding). Pipeline parallelism
cuts the layers into ``pp`` consecutive stages, the first stages taking the remainder; the
first stage also holds the embedding and the last the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.hardware import HardwareSpec
from sim.models import ModelSpec, dtype_bytes


@dataclass(frozen=True)
class Parallelism:
    """GPUs per replica: ``tp`` tensor-parallel ranks in each of ``pp`` pipeline stages."""

    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.pp < 1:
            raise ValueError(f"pp must be >= 1, got {self.pp}")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


def check_parallelism(model: ModelSpec, par: Parallelism) -> None:
    """vLLM's own conditions: tp divides the attention heads, the KV heads divide tp or tp
    divides them, and every stage gets a layer."""
    if model.num_heads % par.tp:
        raise ValueError(f"tp {par.tp} does not divide {model.name}'s {model.num_heads} attention heads")
    if model.mla is None and model.num_kv_heads % par.tp and par.tp % model.num_kv_heads:
        raise ValueError(f"tp {par.tp} and {model.name}'s {model.num_kv_heads} KV heads: one must divide the other")
    if par.pp > model.num_layers:
        raise ValueError(f"pp {par.pp} is more than {model.name}'s {model.num_layers} layers")


def stage_layers(model: ModelSpec, pp: int) -> list[int]:
    """Layers per pipeline stage, the first stages taking the remainder."""
    base, extra = divmod(model.num_layers, pp)
    return [base + (1 if i < extra else 0) for i in range(pp)]


def kv_heads_per_gpu(model: ModelSpec, tp: int) -> int:
    return max(1, model.num_kv_heads // tp)


def kv_values_per_token_layer_per_gpu(model: ModelSpec, tp: int) -> int:
    """Cache entries one token keeps in one layer on one GPU."""
    if model.mla is not None:
        return model.kv_values_per_token_layer  # the latent is not split by heads: every GPU keeps it
    return 2 * kv_heads_per_gpu(model, tp) * model.head_dim


def kv_bytes_per_token_per_gpu(model: ModelSpec, par: Parallelism, dtype: str) -> int:
    """The cache one token keeps on the GPU that holds the most of it (the largest stage)."""
    return max(stage_layers(model, par.pp)) * kv_values_per_token_layer_per_gpu(model, par.tp) * dtype_bytes(dtype)


def _kv_projection_copies(model: ModelSpec, tp: int) -> float:
    """Per layer, the K/V projection parameters a GPU holds beyond its 1/tp share when KV heads
    are copied (fewer KV heads than GPUs)."""
    if model.mla is not None or model.num_kv_heads >= tp:
        return 0.0
    per_head = 2 * model.hidden_size * model.head_dim
    return per_head * (kv_heads_per_gpu(model, tp) - model.num_kv_heads / tp)


def _layer_params(model: ModelSpec) -> list[int]:
    """Parameters of each layer, in order (dense-MLP layers of an MoE model taken as the first)."""
    h = model.hidden_size
    dense = model.num_layers - model.num_moe_layers
    attention = model.attention_params + 2 * h
    moe = model.moe.num_experts * model.expert_params + model.moe_shared_params if model.moe else 0
    return [attention + (model.dense_mlp_params if i < dense else moe) for i in range(model.num_layers)]


def weight_bytes_per_gpu(model: ModelSpec, par: Parallelism, dtype: str) -> float:
    """Weights on the GPU that holds the most (the largest stage; its embedding or LM head)."""
    layers = _layer_params(model)
    sizes = stage_layers(model, par.pp)
    copies = _kv_projection_copies(model, par.tp)
    embed, head, final_norm = model.embedding_params, model.lm_head_params, model.hidden_size
    most = 0.0
    start = 0
    for i, n in enumerate(sizes):
        params = sum(layers[start:start + n]) / par.tp + n * copies
        if i == 0:
            params += embed / par.tp
        if i == par.pp - 1:
            # A tied LM head is the embedding itself, held again by the last stage when pp > 1.
            params += (head if head or par.pp == 1 else embed) / par.tp + final_norm
        most = max(most, params)
        start += n
    return most * dtype_bytes(dtype)


def weight_read_bytes_per_gpu(model: ModelSpec, par: Parallelism, dtype: str, tokens: int) -> float:
    """Weight bytes one GPU reads in a forward of ``tokens`` tokens, summed over the stages
    (they run one after another): everything but the routed experts, plus the distinct
    experts the tokens select (:meth:`ModelSpec.experts_touched`)."""
    params: float = model.unrouted_params
    if model.moe is not None:
        params += model.num_moe_layers * model.experts_touched(tokens) * model.expert_params
    return (params / par.tp + model.num_layers * _kv_projection_copies(model, par.tp)) * dtype_bytes(dtype)


def ring_allreduce_s(hardware: HardwareSpec, gpus: int, message_bytes: float) -> float:
    """One ring all-reduce of ``message_bytes`` over ``gpus`` GPUs: 2 (n - 1) hops, each
    moving 1/n of the message (the alpha-beta model of Thakur et al., 2005)."""
    if gpus == 1:
        return 0.0
    hops = 2 * (gpus - 1)
    return hops * hardware.link_latency_s + hops / gpus * message_bytes / (
        hardware.link_bytes_per_s * hardware.link_efficiency)


def comm_s(model: ModelSpec, hardware: HardwareSpec, par: Parallelism, dtype: str, tokens: int) -> float:
    """GPU-to-GPU time of one forward of ``tokens`` tokens: the tensor-parallel all-reduces of
    every layer's (tokens, hidden) output and the pipeline hand-offs of hidden state and
    residual between stages."""
    if tokens == 0:
        return 0.0
    activation_bytes = tokens * model.hidden_size * dtype_bytes(dtype)
    allreduce = (2 * model.num_layers + 1) * ring_allreduce_s(hardware, par.tp, activation_bytes)
    handoff = (par.pp - 1) * (hardware.link_latency_s
                              + 2 * activation_bytes / (hardware.link_bytes_per_s * hardware.link_efficiency))
    return allreduce + handoff


def activation_reserve_bytes(model: ModelSpec, par: Parallelism, dtype: str, tokens: int, seqs: int) -> float:
    """Peak activation memory per GPU of vLLM's profiling forward (``tokens`` tokens, logits for
    ``seqs`` sequences): the widest MLP's gate|up output and activation (3 x width / tp per
    token) beside four hidden-size buffers (hidden states, residual, norm output, attention
    output), in the model's dtype, and the sampler's fp32 logits and their softmax. An
    estimate; KVConfig takes a measured figure instead."""
    width = model.intermediate_size if model.num_moe_layers < model.num_layers else 0
    if model.moe is not None:
        width = max(width, model.moe.experts_per_token * model.moe.expert_intermediate_size
                    + model.moe.shared_intermediate_size)
    per_token = (3 * width / par.tp + 4 * model.hidden_size) * dtype_bytes(dtype)
    logits = 2 * seqs * model.vocab_size / par.tp * 4
    return tokens * per_token + logits

