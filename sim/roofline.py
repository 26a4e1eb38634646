"""A roofline cost model: a step takes as long as its compute or its memory traffic, whichever
is larger at the hardware's sustained rates, plus a fixed per-step overhead and swap copies.

For GPUs that were never calibrated. FLOPs: 2 per matmul parameter per token, plus attention
(4 x layers x heads x head_dim per query-key pair: QK^T and PV). Bytes: the weights once per
step, the KV cache every sequence attends to, and the KV written for the new tokens.
"""

from __future__ import annotations

import numpy as np

from sim.batch import StepShape
from sim.hardware import HardwareSpec
from sim.models import ModelSpec, dtype_bytes


class RooflineCost:
    def __init__(self, model: ModelSpec, hardware: HardwareSpec, dtype: str = "bfloat16") -> None:
        self.model = model
        self.hardware = hardware
        self.weight_bytes = model.weight_bytes(dtype)
        self.kv_bytes_per_token = model.kv_bytes_per_token(dtype)
        self.flops_per_token = 2 * model.matmul_params
        self.flops_per_attention_pair = 4 * model.num_layers * model.num_heads * model.head_dim
        self.compute_rate = hardware.peak_flops * hardware.compute_efficiency
        self.memory_rate = hardware.memory_bytes_per_s * hardware.memory_efficiency
        self._elem = dtype_bytes(dtype)

    def step_time(self, shape: StepShape) -> float:
        pairs = shape.attention_work + shape.decode_context_tokens + shape.decode_seqs
        flops = self.flops_per_token * shape.num_tokens + self.flops_per_attention_pair * pairs
        # Decodes read their whole cache; prefill chunks read the cache before them.
        kv_read = shape.decode_context_tokens + shape.prefill_context_tokens
        kv_write = shape.num_tokens
        memory_bytes = self.weight_bytes + self.kv_bytes_per_token * (kv_read + kv_write)
        forward_s = max(flops / self.compute_rate, memory_bytes / self.memory_rate)
        swap_bytes = self.kv_bytes_per_token * (shape.swap_in_tokens + shape.swap_out_tokens)
        return self.hardware.step_overhead_s + forward_s + swap_bytes / self.hardware.host_link_bytes_per_s

    def decode_run_times(self, shape: StepShape, n: int) -> list[float] | np.ndarray:
        """``step_time`` of ``shape`` repeated ``n`` times, each decode one token further: the
        same arithmetic in the same order, element-wise, so the values are identical. Short
        runs (the common case) are cheaper as a plain loop than as numpy calls."""
        swap_bytes = self.kv_bytes_per_token * (shape.swap_in_tokens + shape.swap_out_tokens)
        swap_s = swap_bytes / self.hardware.host_link_bytes_per_s
        if n <= 32:
            token_flops, attention = self.flops_per_token * shape.num_tokens, shape.attention_work
            seqs, prefill_context, kv_write = shape.decode_seqs, shape.prefill_context_tokens, shape.num_tokens
            step_context = shape.decode_context_tokens
            times = []
            for _ in range(n):
                flops = token_flops + self.flops_per_attention_pair * (attention + step_context + seqs)
                memory_bytes = self.weight_bytes + self.kv_bytes_per_token * (step_context + prefill_context + kv_write)
                forward_s = max(flops / self.compute_rate, memory_bytes / self.memory_rate)
                times.append(self.hardware.step_overhead_s + forward_s + swap_s)
                step_context += seqs
            return times
        context = shape.decode_context_tokens + np.arange(n, dtype=np.int64) * shape.decode_seqs
        pairs = shape.attention_work + context + shape.decode_seqs
        run_flops = self.flops_per_token * shape.num_tokens + self.flops_per_attention_pair * pairs
        kv_read = context + shape.prefill_context_tokens
        run_bytes = self.weight_bytes + self.kv_bytes_per_token * (kv_read + shape.num_tokens)
        return self.hardware.step_overhead_s + np.maximum(run_flops / self.compute_rate,
                                                          run_bytes / self.memory_rate) + swap_s
