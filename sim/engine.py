"""The simulated executor: SimPy processes for arrivals and for each replica's engine loop.

A replica loop asks its policy for a batch, lets simulated time pass by the cost model's price
of that batch, and tells the policy the step is done: the same loop the live engine runs with
a wall clock. Ties at one timestamp are explicit: arrivals are scheduled with SimPy's URGENT
priority, so a request arriving at time t is visible to every scheduling decision made at t.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import simpy
from simpy.core import URGENT

from sim.cluster import Router
from sim.cost import CostModel
from sim.metrics import GapRecorder, TimeSeries
from sim.policies.base import Policy
from sim.request import Request


@dataclass
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0
    itl: GapRecorder = field(default_factory=GapRecorder)
    timeseries: TimeSeries = field(default_factory=TimeSeries)


class Replica:
    """One engine: a policy (with its KV blocks) priced by a cost model."""

    def __init__(self, index: int, policy: Policy, cost: CostModel) -> None:
        self.index = index
        self.policy = policy
        self.cost = cost
        self.stats = ReplicaStats()
        self._wakeup: simpy.Event | None = None

    def admit(self, request: Request, now: float) -> None:
        request.replica = self.index
        self.policy.add(request, now)
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    def loop(self, env: simpy.Environment):
        policy, stats = self.policy, self.stats
        while True:
            batch = policy.schedule(env.now)
            stats.timeseries.record(env.now, len(batch.seqs) if batch else 0, policy.num_waiting,
                                    policy.num_running, policy.kv.num_used)
            if batch is None:
                self._wakeup = env.event()
                wake_s = policy.next_wakeup_s(env.now)
                if wake_s is None:
                    yield self._wakeup
                else:
                    yield self._wakeup | env.timeout(max(0.0, wake_s - env.now))
                self._wakeup = None
                continue
            step_s = self.cost.step_time(batch.shape())
            if step_s < 0:
                raise ValueError(f"cost model returned a negative step time {step_s}")
            yield env.timeout(step_s)
            last = [s.request.last_token_s for s in batch.seqs]
            policy.on_step_done(batch, env.now)
            stats.steps += 1
            stats.busy_s += step_s
            record_gaps(stats.itl, batch.seqs, last, env.now)


def record_gaps(itl: GapRecorder, seqs, last_token_s: Sequence[float | None], now: float) -> None:
    """Add the inter-token gap of every sequence that sampled a token at ``now`` and had one before."""
    gaps: dict[float, int] = {}
    for s, prev in zip(seqs, last_token_s, strict=True):
        if prev is not None and s.request.last_token_s == now:
            gap = now - prev
            gaps[gap] = gaps.get(gap, 0) + 1
    for gap, count in gaps.items():
        itl.add(gap, count)


def _urgent_timeout(env: simpy.Environment, delay: float) -> simpy.Event:
    # simpy.Timeout always uses NORMAL priority; this is the same event at URGENT priority.
    event = simpy.Event(env)
    event._ok = True
    event._value = None
    env.schedule(event, URGENT, delay)
    return event


def _delay_until(now: float, t: float) -> float:
    """A delay such that ``now + delay`` is exactly ``t`` (plain ``t - now`` can miss by an ulp)."""
    delay = t - now
    # When t - now is inexact, now >= t / 2 does not hold, so delay's ulp is at least half of
    # t's and a step or two reaches t.
    while now + delay < t:
        delay = math.nextafter(delay, math.inf)
    return delay


def arrivals(env: simpy.Environment, requests: Sequence[Request], replicas: Sequence[Replica], router: Router):
    policies = [r.policy for r in replicas]
    for request in requests:
        if request.arrival_s > env.now:
            yield _urgent_timeout(env, _delay_until(env.now, request.arrival_s))
        replicas[router.route(request, policies)].admit(request, env.now)


@dataclass
class SimResult:
    requests: list[Request]
    replicas: list[ReplicaStats]
    num_preemptions: int

    def itl(self) -> GapRecorder:
        merged = GapRecorder()
        for r in self.replicas:
            merged.extend(r.itl)
        return merged


def simulate(requests: Sequence[Request], make_policy: Callable[[], Policy], cost: CostModel,
             router: Router, num_replicas: int = 1, token_times: bool = False) -> SimResult:
    """Replay ``requests`` (sorted by arrival) on ``num_replicas`` replicas until all are done."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
        raise ValueError("requests must be sorted by arrival_s")
    if token_times:
        for r in requests:
            r.token_times_s = []
    env = simpy.Environment()
    replicas = [Replica(i, make_policy(), cost) for i in range(num_replicas)]
    env.process(arrivals(env, requests, replicas, router))
    for replica in replicas:
        env.process(replica.loop(env))
    env.run()
    stuck = [r for r in requests if r.finish_s is None and r.reject_reason is None]
    if stuck:
        raise RuntimeError(f"simulation ended with {len(stuck)} requests unfinished (first: id {stuck[0].id})")
    return SimResult(
        requests=list(requests),
        replicas=[r.stats for r in replicas],
        num_preemptions=sum(r.policy.num_preemptions for r in replicas),
    )
