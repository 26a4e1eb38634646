"""Assembling the live engine from a :class:`~runtime.config.LiveConfig`: the one place where a
network, a KV pool, a block manager, a policy and the engine loop are put together, used by
``servesim run``, ``validate``, ``calibrate``, ``serve`` and the runtime benchmark.

The scheduler's :class:`~sim.kv.BlockManager` and the runner's paged pool are built from the
same numbers, so the policy's accounting is the engine's memory (``LiveEngine`` checks that
the policy schedules over the runner's block manager).
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from runtime.config import LiveConfig, default_kv_blocks
from runtime.engine import LiveEngine
from runtime.kvcache import blocks_from_memory, kv_bytes_per_token
from runtime.model import Transformer
from runtime.runner import ModelRunner
from runtime.weights import dtype_name, load_model, resolve_device, resolve_dtype
from sim.kv import BlockManager
from sim.models import get_model
from sim.policies import make_policy
from sim.request import Request


@dataclass(frozen=True)
class Placement:
    """Where a config's network runs: the resolved device and dtype."""

    device: torch.device
    dtype: torch.dtype

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def device_name(self) -> str:
        """The CUDA device's name, or ``cpu``."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"


def place(config: LiveConfig) -> Placement:
    """Resolve ``auto`` device and default dtype (ValueError for a CUDA device torch cannot see)."""
    device = resolve_device(config.device)
    return Placement(device, resolve_dtype(config.dtype, device))


def load_network(config: LiveConfig) -> Transformer:
    """The network on its device (weights from ``config.weights`` or random from the seed), with
    torch's CPU threads set first when the config names them."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    where = place(config)
    return load_model(get_model(config.model), config.weights, where.dtype, where.device, config.seed)


def pool_blocks(config: LiveConfig, net: Transformer, requests: Sequence[Request] = ()) -> tuple[int, int]:
    """(device blocks, host blocks) of the config's pool; on CUDA measured with ``net`` loaded."""
    num_blocks = config.kv_blocks
    if num_blocks is None:
        if net.device.type == "cuda":
            num_blocks = blocks_from_memory(net.spec, config.block_size, net.dtype, net.device,
                                            config.memory_utilization)
        else:
            num_blocks = default_kv_blocks(requests, config.block_size)
    return num_blocks, config.host_blocks(num_blocks)


def build_runner(config: LiveConfig, requests: Sequence[Request] = (), net: Transformer | None = None) -> ModelRunner:
    """A model runner over a fresh pool sized by :func:`pool_blocks` (``net``: reuse a loaded network)."""
    net = net if net is not None else load_network(config)
    num_blocks, host_blocks = pool_blocks(config, net, requests)
    return ModelRunner(net, BlockManager(num_blocks, config.block_size, host_blocks), seed=config.seed)


def build_live_engine(config: LiveConfig, requests: Sequence[Request] = (), *, net: Transformer | None = None,
                      runner: ModelRunner | None = None, progress: bool = False) -> LiveEngine:
    """The live engine of ``config``: its policy over the runner's block manager.

    ``runner``: serve on an existing runner and its pool (calibration times its grid and then
    serves on the same one; the pool must be empty), ignoring the config's pool size.
    ``requests`` sizes the default pool on CPU; the engine serves whatever ``run`` is given.
    Raises ValueError (bad device, no room for a KV pool) with a message for people."""
    if runner is None:
        runner = build_runner(config, requests, net)
    return LiveEngine(runner, make_policy(config.scheduler, runner.blocks), progress=progress)


def kv_description(engine: LiveEngine) -> dict[str, int]:
    """The pool an engine serves from, for a run's ``config.json``."""
    blocks = engine.runner.blocks
    return {"num_blocks": blocks.num_blocks, "block_size": blocks.block_size,
            "num_host_blocks": blocks.num_host_blocks,
            "kv_bytes_per_token": kv_bytes_per_token(engine.runner.model.spec, engine.runner.model.dtype)}


@contextmanager
def paused_gc(pause: bool = True) -> Iterator[None]:
    """Python's cyclic garbage collector paused (after one collection) for the block, restored
    after; serving engines freeze it so that its pauses do not land in random timed steps."""
    paused = pause and gc.isenabled()
    if paused:
        gc.collect()
        gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()
