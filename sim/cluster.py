"""Routers: which replica an arriving request goes to.

Ties go to the lowest replica index, so routing is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from sim.policies.base import Policy
from sim.request import Request


class Router(Protocol):
    reads_kv: bool
    """Whether routing reads KV blocks in use, which change inside a run of decode steps."""

    def route(self, request: Request, replicas: Sequence[Policy]) -> int:
        """Index of the replica that gets ``request``."""


class RoundRobin:
    reads_kv = False

    def __init__(self) -> None:
        self._next = 0

    def route(self, request: Request, replicas: Sequence[Policy]) -> int:
        i = self._next % len(replicas)
        self._next += 1
        return i


class LeastLoaded:
    """Fewest outstanding requests (queued plus running)."""

    reads_kv = False

    def route(self, request: Request, replicas: Sequence[Policy]) -> int:
        return min(range(len(replicas)), key=lambda i: (replicas[i].num_waiting + replicas[i].num_running, i))


class LeastKV:
    """Fewest KV blocks in use, then fewest queued requests."""

    reads_kv = True

    def route(self, request: Request, replicas: Sequence[Policy]) -> int:
        return min(range(len(replicas)), key=lambda i: (replicas[i].kv.num_used, replicas[i].num_waiting, i))


ROUTERS: dict[str, Callable[[], Router]] = {
    "round_robin": RoundRobin,
    "least_loaded": LeastLoaded,
    "least_kv": LeastKV,
}


def make_router(name: str) -> Router:
    try:
        return ROUTERS[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(ROUTERS)}") from None
