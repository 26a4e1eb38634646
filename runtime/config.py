"""The resolved configuration of a live engine, beside :class:`sim.config.SimConfig`.

A frozen dataclass validated on construction, with no torch import: the CLI builds one from
its options, :func:`runtime.build.build_live_engine` turns it into a running engine, and
``to_dict()`` is what a run directory records. Everything the simulator also needs (the
scheduler, the KV pool's shape) is the simulator's own type, so a live run and its simulation
are configured by the same values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sim.kv import blocks_for
from sim.models import get_model
from sim.policies.base import SchedulerConfig
from sim.request import Request

DEVICE_FORMS = "auto, cpu or cuda[:N]"
DTYPES = ("float32", "bfloat16", "float16")
CPU_MAX_KV_BLOCKS = 2048
"""The default pool on CPU: room for every request of the workload at once, at most this many
blocks (a CPU run is small, and allocating the memory of a GPU's pool would only cost time)."""
DEFAULT_MEMORY_UTILIZATION = 0.9  # vLLM's gpu_memory_utilization default


@dataclass(frozen=True)
class LiveConfig:
    """Everything but the workload: the network, the device, the KV pool and the scheduler.

    ``kv_blocks`` None: from free device memory on CUDA (``memory_utilization`` of it, minus
    what is in use), on CPU room for the workload given to the builder (at most
    :data:`CPU_MAX_KV_BLOCKS`). ``swap_blocks`` None: as many host blocks as device blocks
    with swap preemption, else 0. ``weights`` None: random weights drawn from ``seed``.
    ``scheduler.max_model_len`` None becomes the model's positions, as in ``SimConfig``: a
    longer request is rejected and counted, never run past the network's position table.
    """

    model: str = "tiny"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    weights: str | None = None
    device: str = "auto"
    dtype: str | None = None
    """None: bfloat16 on CUDA, float32 on CPU."""
    threads: int | None = None
    """torch CPU threads; None keeps torch's default."""
    seed: int = 0
    """Random weights and the synthetic prompt token ids."""
    kv_blocks: int | None = None
    block_size: int = 16
    swap_blocks: int | None = None
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION
    collect_garbage: bool = True
    """False: Python's cyclic GC is paused while the engine serves (as serving engines freeze
    it), so that its pauses do not land in random steps (:func:`runtime.build.paused_gc`)."""

    def __post_init__(self) -> None:
        spec = get_model(self.model)
        if self.scheduler.max_model_len is None:
            # vLLM's default max_model_len: the model's positions.
            object.__setattr__(self, "scheduler",
                               dataclasses.replace(self.scheduler, max_model_len=spec.max_position))
        elif self.scheduler.max_model_len > spec.max_position:
            raise ValueError(f"scheduler max_model_len {self.scheduler.max_model_len} exceeds {spec.name}'s "
                             f"{spec.max_position} positions")
        if self.device != "auto" and self.device not in ("cpu", "cuda") and not _is_cuda_index(self.device):
            raise ValueError(f"device must be {DEVICE_FORMS}, got {self.device!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)} or None, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be >= 1 or None, got {self.kv_blocks}")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"block_size must be in 1..1024, got {self.block_size}")
        if self.swap_blocks is not None and self.swap_blocks < 0:
            raise ValueError(f"swap_blocks must be >= 0 or None, got {self.swap_blocks}")
        if not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization must be in (0, 1], got {self.memory_utilization}")

    def host_blocks(self, num_blocks: int) -> int:
        """Host (swap) blocks of a pool of ``num_blocks`` device blocks: ``swap_blocks``, else as
        many as the device's with swap preemption, else 0."""
        if self.swap_blocks is not None:
            return self.swap_blocks
        return num_blocks if self.scheduler.preempt == "swap" else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_kv_blocks(requests: Sequence[Request], block_size: int) -> int:
    """Room for every request at once (so a run at moderate load never preempts), at most
    :data:`CPU_MAX_KV_BLOCKS`; with no requests known, the cap."""
    if not requests:
        return CPU_MAX_KV_BLOCKS
    need = sum(blocks_for(r.max_tokens, block_size) for r in requests)
    return max(1, min(CPU_MAX_KV_BLOCKS, need))


def _is_cuda_index(device: str) -> bool:
    prefix, sep, index = device.partition(":")
    return prefix == "cuda" and bool(sep) and index.isdigit()
