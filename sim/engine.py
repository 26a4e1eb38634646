"""The simulated executor: SimPy processes for arrivals and for each replica's engine loop.

A replica loop asks its policy for a batch, lets simulated time pass by the cost model's price
of that batch, and tells the policy the step is done: the same loop the live engine runs with
a wall clock. Ties at one timestamp are explicit: arrivals are scheduled with SimPy's URGENT
priority, so a request arriving at time t is visible to every scheduling decision made at t.

Fast path (the default; ``exact_steps=True`` turns it off): when a batch is only decodes, the
policy says how many times it can repeat before it could decide differently
(``repeat_limit``), and the loop prices all those steps at once - each one differs only by
context length - and ends the run early at the first step that ends after an arrival the
policy (or a KV-reading router) would react to. Times are summed in the same order as step
by step, so both modes give the same timestamps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import simpy
from simpy.core import URGENT

from sim.batch import StepShape
from sim.cluster import Router
from sim.cost import CostModel, decode_run_times
from sim.metrics import GapRecorder, TimeSeries
from sim.policies.base import Policy
from sim.request import Request


@dataclass
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0
    itl: GapRecorder = field(default_factory=GapRecorder)
    timeseries: TimeSeries = field(default_factory=TimeSeries)


class ArrivalFeed:
    """The time of the next request not yet handed to a replica (inf when none is left)."""

    def __init__(self, requests: Sequence[Request]) -> None:
        self.requests = requests
        self.index = 0

    @property
    def next_s(self) -> float:
        return self.requests[self.index].arrival_s if self.index < len(self.requests) else math.inf


class Replica:
    """One engine: a policy (with its KV blocks) priced by a cost model."""

    def __init__(self, index: int, policy: Policy, cost: CostModel, feed: ArrivalFeed | None = None,
                 watch_arrivals: bool = False) -> None:
        self.index = index
        self.policy = policy
        self.cost = cost
        self.stats = ReplicaStats()
        self._wakeup: simpy.Event | None = None
        self.feed = feed  # None: step every iteration
        self.watch_arrivals = watch_arrivals

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
            shape = batch.shape()
            step_s = self.cost.step_time(shape)
            if step_s < 0:
                raise ValueError(f"cost model returned a negative step time {step_s}")
            repeats = policy.repeat_limit(batch) if self.feed is not None else 1
            if repeats == 1:
                yield env.timeout(step_s)
                last = [s.request.last_token_s for s in batch.seqs]
                policy.on_step_done(batch, env.now)
                stats.steps += 1
                stats.busy_s += step_s
                record_gaps(stats.itl, batch.seqs, last, env.now)
                continue
            ends_s, steps_s = self._run_ends(env.now, shape, step_s, repeats)
            yield env.timeout(_delay_until(env.now, ends_s[-1]))
            before = [(s.request.last_token_s, s.request.num_generated) for s in batch.seqs]
            policy.on_steps_done(batch, ends_s)
            stats.steps += len(ends_s)
            for d in steps_s:
                stats.busy_s += d
            record_run_gaps(stats.itl, batch.seqs, before, ends_s)

    def _run_ends(self, now: float, shape: StepShape, first_s: float, repeats: int) -> tuple[list[float], list[float]]:
        """End times of up to ``repeats`` decode steps from ``now``; a step ending after the next
        arrival that matters is not run (the arrival happens during or before it)."""
        assert self.feed is not None
        limit_s = math.inf
        if self.watch_arrivals or self.policy.arrival_may_reschedule():
            limit_s = self.feed.next_s
        if limit_s < math.inf:
            # Cutting a run short is always exact (the scheduler is simply asked again), so
            # price only the steps that could fit before the arrival if none got slower.
            repeats = min(repeats, int((limit_s - now) / first_s) + 2)
        steps = decode_run_times(self.cost, shape, repeats)
        steps[0] = first_s
        # Sequential sums from ``now``, exactly as stepping one at a time adds them.
        ends = np.cumsum(np.concatenate(([now], steps)))[1:]
        m = max(1, int(np.searchsorted(ends, limit_s, side="right")))
        return ends[:m].tolist(), steps[:m].tolist()


def record_gaps(itl: GapRecorder, seqs, last_token_s: Sequence[float | None], now: float) -> None:
    """Add the inter-token gap of every sequence that sampled a token at ``now`` and had one before."""
    gaps: dict[float, int] = {}
    for s, prev in zip(seqs, last_token_s, strict=True):
        if prev is not None and s.request.last_token_s == now:
            gap = now - prev
            gaps[gap] = gaps.get(gap, 0) + 1
    for gap, count in gaps.items():
        itl.add(gap, count)


def record_run_gaps(itl: GapRecorder, seqs, before: Sequence[tuple[float | None, int]], ends_s: list[float]) -> None:
    """Inter-token gaps of a run of decode steps: the first step's per sequence, then one gap
    per step shared by every sequence that produced a token in it."""
    produced = []
    first_gaps: dict[float, int] = {}
    for s, (prev, generated) in zip(seqs, before, strict=True):
        k = s.request.num_generated - generated
        produced.append(k)
        if k > 0 and prev is not None:
            gap = ends_s[0] - prev
            first_gaps[gap] = first_gaps.get(gap, 0) + 1
    for gap, count in first_gaps.items():
        itl.add(gap, count)
    if len(ends_s) > 1:
        ends = np.asarray(ends_s)
        # Step j (from 1) gives a token to every sequence that produced more than j tokens.
        done_by = np.searchsorted(np.sort(np.asarray(produced)), np.arange(1, len(ends_s)), side="right")
        itl.add_many(np.diff(ends), len(produced) - done_by)


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


def arrivals(env: simpy.Environment, feed: ArrivalFeed, replicas: Sequence[Replica], router: Router):
    policies = [r.policy for r in replicas]
    for request in feed.requests:
        if request.arrival_s > env.now:
            yield _urgent_timeout(env, _delay_until(env.now, request.arrival_s))
        feed.index += 1
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
             router: Router, num_replicas: int = 1, token_times: bool = False,
             exact_steps: bool = False) -> SimResult:
    """Replay ``requests`` (sorted by arrival) on ``num_replicas`` replicas until all are done.

    ``exact_steps`` asks the policy at every iteration (the reference the fast path must match)."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
        raise ValueError("requests must be sorted by arrival_s")
    if token_times:
        for r in requests:
            r.token_times_s = []
    env = simpy.Environment()
    feed = ArrivalFeed(requests)
    watch = num_replicas > 1 and router.reads_kv
    replicas = [Replica(i, make_policy(), cost, None if exact_steps else feed, watch) for i in range(num_replicas)]
    env.process(arrivals(env, feed, replicas, router))
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
