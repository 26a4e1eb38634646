"""Saturation throughput, defined once: the request throughput (req/s) the simulator predicts for
a mix of requests when every one of them is queued at t = 0 on one replica - the most this
engine can serve of this mix, whatever the arrival process.

Validation scales a trace slice to a fraction of it, calibration's live phase loads the engine
at fractions of it, and ``compare --rates auto`` and the demo place their rates around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sim.cluster import make_router
from sim.config import SimConfig, build_cost, make_block_manager, resolve_capacity
from sim.cost import CostModel
from sim.engine import simulate
from sim.metrics import summarize
from sim.policies import make_policy
from sim.policies.base import Policy
from sim.request import Request


def all_at_once(requests: Sequence[Request]) -> list[Request]:
    """Fresh copies of ``requests`` that all arrive at t = 0 (ids, lengths and priorities kept)."""
    return [Request(r.id, 0.0, r.prompt_tokens, r.output_tokens, r.priority) for r in requests]


def saturation_rps(requests: Sequence[Request], policy_factory: Callable[[], Policy], cost: CostModel) -> float:
    """Request throughput with every request of ``requests`` queued at t = 0 on one replica of
    ``policy_factory()`` priced by ``cost``; 0.0 when no request completes (none fits the pool,
    or every one is rejected)."""
    result = simulate(all_at_once(requests), policy_factory, cost, make_router("round_robin"), 1)
    return float(summarize(result.requests, result.itl())["request_throughput"])


def config_saturation_rps(config: SimConfig, requests: Sequence[Request], profile: Any | None = None) -> float:
    """:func:`saturation_rps` of one replica of ``config`` (its scheduler, KV capacity and cost
    model; its replica count and router do not enter)."""
    capacity = resolve_capacity(config, profile)
    return saturation_rps(requests, lambda: make_policy(config.scheduler, make_block_manager(capacity)),
                          build_cost(config, profile))
