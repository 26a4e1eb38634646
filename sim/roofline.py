"""A roofline cost model: a step takes as long as its compute or its memory traffic, whichever
is larger at the hardware's sustained rates, plus the GPUs' exchanges, a fixed per-step
overhead and swap copies.

For GPUs that were never calibrated. Per GPU of a replica (:mod:`sim.parallel`): FLOPs are 2
per active matmul parameter per token over ``tp``, plus attention (QK^T and PV for every
query-key pair over the heads of this GPU); bytes are the weights this GPU reads once per step
(for an MoE, the shared part plus the distinct experts the step's tokens select), the KV cache
every sequence attends to and the KV written for the new tokens. A sliding window caps what
each sequence attends to. Pipeline stages run one after another (one batch in flight per
replica, as the simulator's engine loop runs), so a step is every layer's time plus the
hand-offs between stages.

There is one formula, :meth:`RooflineCost._formula`, evaluated on a float or on a numpy array
of decode contexts (its shape's part once per shape), so that ``decode_run_times(shape, n)[j]``
is bit for bit ``step_time`` of the j-th step (the simulator's fast path relies on it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np

from sim.batch import StepShape
from sim.hardware import HardwareSpec
from sim.models import ModelSpec, dtype_bytes
from sim.parallel import (
    Parallelism,
    check_parallelism,
    comm_s,
    kv_values_per_token_layer_per_gpu,
    weight_read_bytes_per_gpu,
)

Context = TypeVar("Context", float, np.ndarray)
SHORT_RUN = 16
"""Runs up to this many steps are priced by a Python loop, longer ones by numpy: counted by
valgrind, a looped step is about 5k instructions and a numpy evaluation of the whole run about
100k (its ~16 calls' overhead), so the loop is cheaper up to about 17 steps."""


class RooflineCost:
    def __init__(self, model: ModelSpec, hardware: HardwareSpec, dtype: str = "bfloat16",
                 parallel: Parallelism | None = None) -> None:
        self.model = model
        self.hardware = hardware
        self.dtype = dtype
        self.parallel = parallel or Parallelism()
        check_parallelism(model, self.parallel)
        tp = self.parallel.tp
        self.kv_bytes_per_token = model.kv_bytes_per_token(dtype)
        # Per GPU: its share of the heads' KV (copied heads count in full) over every stage.
        self.kv_bytes_per_token_gpu = model.num_layers * kv_values_per_token_layer_per_gpu(model, tp) * dtype_bytes(
            dtype)
        self.flops_per_attention_pair = model.attention_flops_per_pair // tp  # tp divides the heads
        self.compute_rate = hardware.peak_flops * hardware.compute_efficiency
        self.memory_rate = hardware.memory_bytes_per_s * hardware.memory_efficiency
        # 2 FLOPs per multiply-add; an integer on one GPU, as the single-GPU price always was
        self._flops_per_token: float = 2 * model.matmul_params if tp == 1 else 2 * model.matmul_params / tp
        self._dense_weight_bytes = None if model.moe else weight_read_bytes_per_gpu(model, self.parallel, dtype, 0)
        self._scalar = self._formula(max, min)
        self._vector = self._formula(np.maximum, np.minimum)

    def _weight_bytes(self, tokens: int) -> float:
        """Weight bytes this GPU reads in a step of ``tokens`` tokens (an MoE: experts touched)."""
        if self._dense_weight_bytes is not None:
            return self._dense_weight_bytes
        return weight_read_bytes_per_gpu(self.model, self.parallel, self.dtype, tokens)

    def _formula(self, maximum: Callable, minimum: Callable) -> tuple[Callable[[StepShape], tuple],
                                                                       Callable[[tuple, Context], Context]]:
        """The price of a step as two functions: ``of_shape(shape)``, the part that depends on the
        shape alone, and ``seconds(part, decode_context)``, the rest, on a float (with ``max``
        and ``min``) or a numpy array of the contexts of a decode run (``np.maximum``,
        ``np.minimum``). A run of steps does the shape's part once; the operations and their
        order are the same either way. Built once per cost model: the model's and hardware's
        rates are bound here."""
        window, kv_bytes = self.model.sliding_window, self.kv_bytes_per_token_gpu
        flops_per_token, pair_flops = self._flops_per_token, self.flops_per_attention_pair
        compute_rate, memory_rate, overhead_s = self.compute_rate, self.memory_rate, self.hardware.step_overhead_s
        swap_bytes_per_token, host_link_bytes_per_s = self.kv_bytes_per_token, self.hardware.host_link_bytes_per_s
        multi_gpu, dense_weight_bytes = self.parallel.gpus > 1, self._dense_weight_bytes

        def of_shape(shape: StepShape) -> tuple:
            tokens, decode_seqs = shape.num_tokens, shape.decode_seqs
            prefill_pairs, prefill_read = shape.attention_work, shape.prefill_context_tokens
            decode_window = None
            if window is not None:
                prefill_pairs = min(prefill_pairs, shape.prefill_tokens * window)
                prefill_read = min(prefill_read, shape.prefill_seqs * window)
                decode_window = decode_seqs * window  # the most decodes may read
            extra_s = swap_bytes_per_token * (shape.swap_in_tokens + shape.swap_out_tokens) / host_link_bytes_per_s
            if multi_gpu:
                extra_s += comm_s(self.model, self.hardware, self.parallel, self.dtype, tokens)
            weight_bytes = self._weight_bytes(tokens) if dense_weight_bytes is None else dense_weight_bytes
            return (tokens, decode_seqs, prefill_pairs, prefill_read, decode_window, extra_s,
                    flops_per_token * tokens, weight_bytes)

        def seconds(part: tuple, decode_context: Context) -> Context:
            tokens, decode_seqs, prefill_pairs, prefill_read, decode_window, extra_s, token_flops, weight_bytes = part
            decode_read = decode_context if decode_window is None else minimum(decode_context, decode_window)
            flops = token_flops + pair_flops * (prefill_pairs + decode_read + decode_seqs)
            memory_bytes = weight_bytes + kv_bytes * (decode_read + prefill_read + tokens)
            return overhead_s + maximum(flops / compute_rate, memory_bytes / memory_rate) + extra_s

        return of_shape, seconds

    def step_time(self, shape: StepShape) -> float:
        of_shape, seconds = self._scalar
        return seconds(of_shape(shape), float(shape.decode_context_tokens))

    def decode_run_times(self, shape: StepShape, n: int) -> list[float] | np.ndarray:
        """``step_time`` of ``shape`` repeated ``n`` times, each decode one token further: the
        same formula on every context, so the values are identical."""
        context, seqs = float(shape.decode_context_tokens), float(shape.decode_seqs)
        if n <= SHORT_RUN:
            of_shape, seconds = self._scalar
            part = of_shape(shape)
            return [seconds(part, context + j * seqs) for j in range(n)]
        of_shape, seconds = self._vector
        return seconds(of_shape(shape), context + np.arange(n, dtype=np.float64) * seqs)
