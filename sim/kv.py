"""The paged KV block manager: device blocks, host (swap) blocks, and per-request block tables.

Blocks are real ids so that the runtime can use the same tables to index its KV pool: the
scheduler's accounting is the engine's memory. Free lists are stacks, so the ids handed out
depend only on the sequence of calls (deterministic).
"""

from __future__ import annotations

from sim.request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Device and host block pools with one block table per request id."""

    def __init__(self, num_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_host_blocks = num_host_blocks
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.host_tables: dict[int, list[int]] = {}

    # -- queries -----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_host_used(self) -> int:
        return self.num_host_blocks - len(self._host_free)

    @property
    def utilisation(self) -> float:
        return self.num_used / self.num_blocks

    def blocks_held(self, request: Request) -> int:
        return len(self.tables.get(request.id, ()))

    def extra_blocks(self, request: Request, num_tokens: int) -> int:
        """Blocks ``request`` still needs so that its cache can hold ``num_tokens`` tokens."""
        table = self.tables.get(request.id)
        held = len(table) if table is not None else 0
        need = -(-num_tokens // self.block_size) - held
        return need if need > 0 else 0

    def fits_at_all(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` tokens could ever fit, with the device empty."""
        return blocks_for(num_tokens, self.block_size) <= self.num_blocks

    # -- device blocks -----------------------------------------------------------------------
    def can_allocate(self, request: Request, num_tokens: int, reserve: int = 0) -> bool:
        """Whether ``request``'s cache can grow to ``num_tokens`` tokens leaving ``reserve`` blocks free."""
        return self.extra_blocks(request, num_tokens) + reserve <= len(self._free)

    def allocate(self, request: Request, num_tokens: int) -> list[int]:
        """Grow ``request``'s table to hold ``num_tokens`` tokens; returns the new block ids."""
        need = self.extra_blocks(request, num_tokens)
        if need == 0:
            return []
        if need > len(self._free):
            raise RuntimeError(
                f"request {request.id}: needs {need} blocks, {len(self._free)} free (call can_allocate first)"
            )
        new = self._free[-need:][::-1]  # popped one by one from the top of the stack
        del self._free[-need:]
        self.tables.setdefault(request.id, []).extend(new)
        return new

    def append_block(self, request: Request) -> None:
        """Give ``request`` one more block (check ``num_free`` first): the cheap case of
        :meth:`allocate` when a decode's cache crosses a block boundary."""
        self.tables[request.id].append(self._free.pop())

    def free(self, request: Request) -> None:
        """Return every device and host block ``request`` holds."""
        table = self.tables.pop(request.id, None)
        if table:
            self._free.extend(reversed(table))
        host = self.host_tables.pop(request.id, None)
        if host:
            self._host_free.extend(reversed(host))

    # -- swap --------------------------------------------------------------------------------
    def can_swap_out(self, request: Request) -> bool:
        return self.blocks_held(request) <= len(self._host_free)

    def swap_out(self, request: Request) -> list[tuple[int, int]]:
        """Move ``request``'s blocks to host memory; returns (device_block, host_block) pairs."""
        table = self.tables.pop(request.id, [])
        if len(table) > len(self._host_free):
            self.tables[request.id] = table
            raise RuntimeError(f"request {request.id}: swap space full (call can_swap_out first)")
        host = [self._host_free.pop() for _ in table]
        self.host_tables[request.id] = host
        self._free.extend(reversed(table))
        return list(zip(table, host, strict=True))

    def can_swap_in(self, request: Request, reserve: int = 0) -> bool:
        return len(self.host_tables.get(request.id, ())) + reserve <= len(self._free)

    def swap_in(self, request: Request) -> list[tuple[int, int]]:
        """Bring ``request``'s blocks back to the device; returns (host_block, device_block) pairs."""
        host = self.host_tables.pop(request.id, [])
        if len(host) > len(self._free):
            self.host_tables[request.id] = host
            raise RuntimeError(f"request {request.id}: not enough free blocks to swap in")
        device = [self._free.pop() for _ in host]
        self.tables[request.id] = device
        self._host_free.extend(reversed(host))
        return list(zip(host, device, strict=True))
