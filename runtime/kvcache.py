"""The paged KV cache: one preallocated device pool, and a host pool for swapped-out blocks.

The pool has exactly the blocks of the scheduler's :class:`sim.kv.BlockManager` (same count,
same block size, same ids), so a block table from the scheduler indexes it directly: the
scheduler's accounting is the engine's memory. Layout::

    device  (layers, 2, kv_heads, num_blocks, block_size, head_dim)       2 = K, V
    host    (layers, 2, kv_heads, num_host_blocks, block_size, head_dim)  pinned when on CUDA

Heads come before blocks so that gathering a sequence's blocks gives each head's keys
contiguous, the layout attention reads fastest (no transpose copy per layer). One indexed copy
moves a block of every layer and head: swap is one gather and one scatter.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sim.models import ModelSpec


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype) -> int:
    """K and V of every layer: 2 x layers x kv_heads x head_dim x dtype bytes."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * itemsize


class KVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, num_host_blocks: int = 0,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_blocks < 1 or block_size < 1 or num_host_blocks < 0:
            raise ValueError(f"KVCache: need num_blocks >= 1, block_size >= 1, num_host_blocks >= 0; got "
                             f"{num_blocks}, {block_size}, {num_host_blocks}")
        self.spec = spec
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_host_blocks = num_host_blocks
        self.dtype = dtype
        self.device = torch.device(device)
        lead = (spec.num_layers, 2, spec.num_kv_heads)
        self.pool = torch.zeros((*lead, num_blocks, block_size, spec.head_dim), dtype=dtype, device=self.device)
        pin = self.device.type == "cuda"
        self.host = torch.zeros((*lead, num_host_blocks, block_size, spec.head_dim), dtype=dtype, pin_memory=pin)
        # Per layer, (2, kv_heads, num_blocks, block_size, head_dim): views of the pool.
        self.layers: list[Tensor] = [self.pool[i] for i in range(spec.num_layers)]

    @property
    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.spec, self.dtype)

    @property
    def device_bytes(self) -> int:
        return self.pool.numel() * self.pool.element_size()

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (device_block, host_block) pairs to host memory."""
        if not pairs:
            return
        dev, host = self._indices(pairs)
        self.host[:, :, :, host] = self.pool[:, :, :, dev.to(self.device)].to("cpu")

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copy (host_block, device_block) pairs back to the device."""
        if not pairs:
            return
        host, dev = self._indices(pairs)
        blocks = self.host[:, :, :, host]
        if self.device.type == "cuda":
            blocks = blocks.pin_memory()
        self.pool[:, :, :, dev.to(self.device)] = blocks.to(self.device, non_blocking=True)

    @staticmethod
    def _indices(pairs: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        a, b = zip(*pairs, strict=True)
        return torch.tensor(a, dtype=torch.int64), torch.tensor(b, dtype=torch.int64)


def blocks_from_memory(spec: ModelSpec, block_size: int, dtype: torch.dtype, device: torch.device | str,
                       utilization: float = 0.9) -> int:
    """KV blocks that fit on a CUDA device with the model already loaded: ``utilization`` of the
    total memory, minus what is in use now (weights, the CUDA context, other processes)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("blocks_from_memory measures a CUDA device; on CPU give the number of blocks")
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    usable = total_bytes * utilization - (total_bytes - free_bytes)
    blocks = int(usable // (kv_bytes_per_token(spec, dtype) * block_size))
    if blocks < 1:
        raise ValueError(f"no room for a KV cache on {device}: {free_bytes / 2**30:.2f} GiB free of "
                         f"{total_bytes / 2**30:.2f} GiB, utilization {utilization}")
    return blocks
