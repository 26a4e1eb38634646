"""One simulation from a config and a list of requests: builds the policy per replica, the
router and the cost model, then runs the SimPy executor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sim.cluster import make_router
from sim.config import Capacity, SimConfig, build_cost, make_block_manager, resolve_capacity
from sim.cost import CostModel
from sim.engine import SimResult, simulate
from sim.metrics import DEFAULT_PERCENTILES, summarize
from sim.policies import make_policy
from sim.request import Request


@dataclass
class SimRun:
    config: SimConfig
    capacity: Capacity
    result: SimResult

    def summary(self, goodput: dict[str, float] | None = None,
                percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
        summary = summarize(self.result.requests, self.result.itl(), percentiles, goodput,
                            self.result.num_preemptions)
        summary["num_gpus"] = self.config.num_gpus  # every replica's GPUs, TP x PP each
        return summary

    def replica_summaries(self, goodput: dict[str, float] | None = None,
                          percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> list[dict[str, Any]]:
        out = []
        for i, stats in enumerate(self.result.replicas):
            mine = [r for r in self.result.requests if r.replica == i]
            out.append(summarize(mine, stats.itl, percentiles, goodput, sum(r.preemptions for r in mine)))
        return out


def run_simulation(config: SimConfig, requests: Sequence[Request], profile: Any | None = None,
                   cost: CostModel | None = None) -> SimRun:
    """Simulate ``requests`` (fresh Request objects, sorted by arrival) under ``config``."""
    capacity = resolve_capacity(config, profile)
    cost = cost if cost is not None else build_cost(config, profile)

    def policy_factory():
        return make_policy(config.scheduler, make_block_manager(capacity))

    result = simulate(requests, policy_factory, cost, make_router(config.router), config.replicas,
                      token_times=config.token_times, exact_steps=config.exact_steps)
    return SimRun(config, capacity, result)
