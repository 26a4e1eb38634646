"""The resolved configuration of a simulation, and building its parts from it.

Everything is a frozen dataclass validated on construction; building reads the trace and the
profile (the only I/O), so constructors stay pure. ``SimConfig.to_dict()`` is what the CLI
writes as ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sim.cost import CostModel
from sim.hardware import GIB, get_hardware
from sim.kv import BlockManager
from sim.models import ModelSpec, dtype_bytes, get_model
from sim.parallel import (
    Parallelism,
    activation_reserve_bytes,
    check_parallelism,
    kv_bytes_per_token_per_gpu,
    weight_bytes_per_gpu,
)
from sim.policies.base import PREEMPT_MODES, SchedulerConfig

DEFAULT_MEMORY_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default
DEFAULT_PROFILE_TOKENS = 8192
"""Tokens of vLLM's memory-profiling forward when no token budget is set (v1's default
``max_num_batched_tokens`` for online serving)."""


@dataclass(frozen=True)
class KVConfig:
    """KV capacity: ``num_blocks`` directly, or derived from each GPU's memory by vLLM's rule
(:func:`kv_blocks_from_memory`). ``gpu_memory_gib`` is per GPU; ``activation_reserve_gib``
replaces the estimated peak activation memory with a measured one."""

    num_blocks: int | None = None
    gpu_memory_gib: float | None = None
    block_size: int = 16
    swap_gib: float = 0.0
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION
    activation_reserve_gib: float | None = None

    def __post_init__(self) -> None:
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"kv num_blocks must be >= 1, got {self.num_blocks}")
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ValueError(f"gpu_memory_gib must be > 0, got {self.gpu_memory_gib}")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size must be in 1..1024, got {self.block_size}")
        if self.swap_gib < 0:
            raise ValueError(f"swap_gib must be >= 0, got {self.swap_gib}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")
        if self.activation_reserve_gib is not None and self.activation_reserve_gib < 0:
            raise ValueError(f"activation_reserve_gib must be >= 0, got {self.activation_reserve_gib}")


def kv_blocks_from_memory(memory_bytes: float, weight_bytes: float, kv_bytes_per_token: int, block_size: int,
                          utilization: float = DEFAULT_MEMORY_UTILIZATION, reserve_bytes: float = 0.0,
                          where: str = "") -> int:
    """vLLM's rule, on one GPU: the KV cache gets ``utilization`` of the memory minus the
    weights and the activation reserve; ``kv_bytes_per_token`` is what a token keeps on it."""
    free = memory_bytes * utilization - weight_bytes - reserve_bytes
    blocks = int(free // (kv_bytes_per_token * block_size))
    if blocks < 1:
        raise ValueError(
            f"no room for the KV cache{where}: {memory_bytes * utilization / GIB:.2f} GiB usable per GPU, "
            f"weights take {weight_bytes / GIB:.2f} GiB and activations {reserve_bytes / GIB:.2f} GiB "
            "(more GPUs per replica: --tp, --pp)"
        )
    return blocks


def kv_blocks_per_replica(model: ModelSpec, par: Parallelism, dtype: str, memory_bytes: float, kv: KVConfig,
                          scheduler: SchedulerConfig) -> int:
    """KV blocks of one replica of ``par.gpus`` GPUs of ``memory_bytes`` each: a block holds its
    tokens on every GPU at once, so the GPU with the least room (the largest stage) sets them."""
    if kv.activation_reserve_gib is not None:
        reserve = kv.activation_reserve_gib * GIB
    else:
        reserve = activation_reserve_bytes(model, par, dtype, scheduler.token_budget or DEFAULT_PROFILE_TOKENS,
                                           scheduler.max_num_seqs)
    where = f" of {model.name} on tp {par.tp} x pp {par.pp}" if par.gpus > 1 else f" of {model.name}"
    return kv_blocks_from_memory(memory_bytes, weight_bytes_per_gpu(model, par, dtype),
                                 kv_bytes_per_token_per_gpu(model, par, dtype), kv.block_size,
                                 kv.memory_utilization, reserve, where)


@dataclass(frozen=True)
class SimConfig:
    """Everything but the workload: the scheduler, the KV capacity, the cost model, the cluster."""

    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv: KVConfig = field(default_factory=KVConfig)
    model: str = "qwen2.5-7b"
    hardware: str = "h100-sxm"
    dtype: str = "bfloat16"
    profile: str | None = None
    replicas: int = 1
    router: str = "round_robin"
    token_times: bool = False
    exact_steps: bool = False
    tp: int = 1
    pp: int = 1
    """GPUs per replica: tensor-parallel ranks x pipeline stages."""

    def __post_init__(self) -> None:
        # A config.json path is read here: validating it means parsing it (a small file).
        model = get_model(self.model)
        check_parallelism(model, self.parallel)
        if self.scheduler.max_model_len is None:
            # vLLM's default max_model_len: the model's positions.
            object.__setattr__(self, "scheduler", dataclasses.replace(self.scheduler, max_model_len=model.max_position))
        get_hardware(self.hardware)
        dtype_bytes(self.dtype)
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        from sim.cluster import ROUTERS

        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; known: {', '.join(ROUTERS)}")

    @property
    def parallel(self) -> Parallelism:
        return Parallelism(self.tp, self.pp)

    @property
    def num_gpus(self) -> int:
        """GPUs of the whole cluster: tp x pp x replicas."""
        return self.tp * self.pp * self.replicas

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"num_gpus": self.num_gpus}


@dataclass(frozen=True)
class Capacity:
    num_blocks: int
    num_host_blocks: int
    block_size: int
    kv_bytes_per_token: int


def resolve_capacity(config: SimConfig, profile: Any | None = None) -> Capacity:
    """KV blocks per replica: explicit, else from the profile, else from device memory."""
    kv = config.kv
    model = get_model(config.model)
    if profile is not None and getattr(profile, "tp", 1) != config.tp:
        raise ValueError(f"the profile was measured at tp {getattr(profile, 'tp', 1)}, the simulation asks for "
                         f"tp {config.tp}: a profile prices steps on the GPUs it was measured on")
    kv_bytes = profile.kv_bytes_per_token if profile is not None else model.kv_bytes_per_token(config.dtype)
    if kv.num_blocks is not None:
        blocks = kv.num_blocks
    elif profile is not None and kv.gpu_memory_gib is None:
        if profile.kv_memory_bytes is None:
            raise ValueError("the profile records no KV memory (it was fitted from step timings alone); "
                             "give the KV capacity with --kv-blocks or --gpu-memory-gib")
        blocks = int(profile.kv_memory_bytes // (kv_bytes * kv.block_size))
    else:
        if kv.gpu_memory_gib is not None:
            memory = kv.gpu_memory_gib * GIB
        else:
            memory = get_hardware(config.hardware).memory_bytes
        blocks = kv_blocks_per_replica(model, config.parallel, config.dtype, memory, kv, config.scheduler)
    host_blocks = int(kv.swap_gib * GIB // (kv_bytes * kv.block_size))
    return Capacity(blocks, host_blocks, kv.block_size, kv_bytes)


def build_cost(config: SimConfig, profile: Any | None = None) -> CostModel:
    if profile is not None:
        from calibrate.profile import CalibratedCost

        return CalibratedCost(profile)
    from sim.roofline import RooflineCost

    return RooflineCost(get_model(config.model), get_hardware(config.hardware), config.dtype, config.parallel)


def make_block_manager(capacity: Capacity) -> BlockManager:
    return BlockManager(capacity.num_blocks, capacity.block_size, capacity.num_host_blocks)


def parse_policy(spec: str) -> tuple[str, str | None]:
    """``"chunked+swap"`` -> ``("chunked", "swap")``; ``"continuous"`` -> ``("continuous", None)``."""
    name, sep, preempt = spec.partition("+")
    if sep and preempt not in PREEMPT_MODES:
        raise ValueError(f"policy {spec!r}: preemption after '+' must be one of {', '.join(PREEMPT_MODES)}")
    return name, (preempt if sep else None)
