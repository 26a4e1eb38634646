"""The live executor: the simulator's replica loop (:meth:`sim.engine.Replica.loop`) on a wall clock.

The same policy objects schedule; a :class:`ModelRunner` executes each batch on the device and
the clock advances by however long that really took. Requests are handed to the policy when
their arrival time comes (the engine sleeps when it has nothing to run). Statistics are the
simulator's :class:`ReplicaStats`, and every step is logged as ``(StepShape, step_s)`` so that
validation can price the same step with a cost model and compare.

A step's time runs from the moment the engine turns to it (the end of the previous step, or
the wake-up after an idle wait) to the end of ``execute``: arrivals, scheduling, input
preparation, swaps, the forward pass and sampling - everything a cost model's step must cover.
"""

from __future__ import annotations

import itertools
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from runtime.runner import ModelRunner
from sim.batch import StepShape
from sim.engine import ReplicaStats, SimResult
from sim.metrics import record_gaps
from sim.policies.base import Policy
from sim.request import Request, Status


@dataclass
class LiveResult(SimResult):
    """A :class:`SimResult` (so ``summarize`` and ``write_run`` take it) plus every step measured."""

    step_log: list[tuple[StepShape, float]] = field(default_factory=list)
    outputs: dict[int, list[int]] = field(default_factory=dict)
    """The token ids each request generated."""


@dataclass
class Arrival:
    """A request handed to a serving engine (:meth:`LiveEngine.serve`) from another thread.

    ``request.arrival_s`` is on the engine's clock (seconds since the ``t0`` given to ``serve``)."""

    request: Request
    prompt_ids: list[int]
    stop_ids: frozenset[int] = frozenset()
    """Token ids that end the request early when sampled (EOS, unless the client ignores it)."""


@dataclass(frozen=True)
class Cancel:
    """Stop a request at its next token (its client went away)."""

    request_id: int


@dataclass(frozen=True)
class EngineState:
    """What a server reports about its engine, published after every step."""

    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    num_preemptions: int = 0
    steps: int = 0


class ServeListener(Protocol):
    """Called on the engine thread by :meth:`LiveEngine.serve`; must not block."""

    def on_rejected(self, request: Request) -> None:
        """``request`` can never run (its ``reject_reason`` says why)."""

    def on_step(self, end_s: float, tokens: dict[int, int], finished: list[Request], state: EngineState) -> None:
        """A step ended at ``end_s``: each request in ``tokens`` got that one new token;
        ``finished`` are done (their last token is in ``tokens``)."""


class LiveEngine:
    """One replica: ``policy`` must schedule over ``runner.blocks`` (the pool's own BlockManager)."""

    def __init__(self, runner: ModelRunner, policy: Policy, progress: bool = False,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> None:
        if policy.kv is not runner.blocks:
            raise ValueError("the policy must schedule over the runner's BlockManager "
                             "(make_policy(config, runner.blocks))")
        self.runner = runner
        self.policy = policy
        self.progress = progress
        self.clock = clock
        self.sleep = sleep

    def run(self, requests: Sequence[Request], token_times: bool = False, warmup: bool = True) -> LiveResult:
        """Serve ``requests`` (sorted by arrival) until every one finished or was rejected.

        Every time is seconds since the run started; scaling a trace's time is the workload's
        job (``TraceReplay(time_scale=...)``). ``warmup`` runs a scratch step before the clock starts."""
        if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
            raise ValueError("requests must be sorted by arrival_s")
        if token_times:
            for r in requests:
                r.token_times_s = []
        policy, runner, stats = self.policy, self.runner, ReplicaStats()
        if warmup:
            runner.warmup()
        step_log: list[tuple[StepShape, float]] = []
        pending = list(reversed(requests))  # a stack: next arrival last
        settled = 0  # finished or rejected
        bar = tqdm(total=len(requests), disable=not self.progress, unit="req", desc="live")
        t0 = self.clock()

        def now() -> float:
            return self.clock() - t0

        step_start: float | None = None  # end of the previous step when the engine stayed busy
        while settled < len(requests):
            t = now()
            start = t if step_start is None else step_start
            while pending and pending[-1].arrival_s <= t:
                r = pending.pop()
                r.replica = 0
                policy.add(r, t)
                if r.status is Status.REJECTED:
                    settled += 1
                    bar.update(1)
            batch = policy.schedule(t)
            stats.timeseries.record(t, len(batch.seqs) if batch else 0, policy.num_waiting,
                                    policy.num_running, policy.kv.num_used)
            if batch is None:
                step_start = None
                if settled == len(requests):
                    break
                wake_s = policy.next_wakeup_s(t)
                targets = [x for x in (wake_s, pending[-1].arrival_s if pending else None) if x is not None]
                if not targets:
                    raise RuntimeError(f"live engine stuck: {len(requests) - settled} requests unsettled, "
                                       "nothing scheduled, no arrival or wake-up to wait for")
                self.sleep(max(0.0, min(targets) - now()))
                continue
            shape = batch.shape()  # what a cost model prices for this step (validation compares)
            runner.execute(batch)
            end = now()
            last = [s.request.last_token_s for s in batch.seqs]
            finished = policy.on_step_done(batch, end)
            step_s = end - start
            stats.steps += 1
            stats.busy_s += step_s
            record_gaps(stats.itl, batch.seqs, last, end)
            step_log.append((shape, step_s))
            settled += len(finished)
            bar.update(len(finished))
            step_start = end
        bar.close()
        return LiveResult(requests=list(requests), replicas=[stats], num_preemptions=policy.num_preemptions,
                          step_log=step_log, outputs={r.id: runner.outputs.get(r.id, []) for r in requests})

    def serve(self, inbox: queue.Queue[Arrival | Cancel | None], listener: ServeListener, t0: float) -> ReplicaStats:
        """Serve requests as other threads hand them in through ``inbox``, until it yields ``None``.

        The same loop as :meth:`run`, open-ended: arrivals are drained before every
        ``schedule``, and the engine blocks on the inbox when it has nothing to run. A request
        whose sampled token is one of its ``stop_ids``, or that was cancelled, finishes at that
        token: its ``output_tokens`` is cut to what it has, which the policies read as done.
        Steps are not logged (a server runs for hours); the statistics count them."""
        policy, runner, stats = self.policy, self.runner, ReplicaStats()
        stops: dict[int, frozenset[int]] = {}
        cancelled: set[int] = set()

        def admit(item: Arrival | Cancel) -> None:
            if isinstance(item, Cancel):
                if item.request_id in stops:
                    cancelled.add(item.request_id)
                return
            r = item.request
            runner.set_prompt(r.id, item.prompt_ids)
            policy.add(r, max(r.arrival_s, self.clock() - t0))
            if r.status is Status.REJECTED:
                runner.release(r.id)
                listener.on_rejected(r)
            else:
                stops[r.id] = item.stop_ids

        step_start: float | None = None
        while True:
            item: Arrival | Cancel | None
            while True:
                try:
                    item = inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    return stats
                admit(item)
            t = self.clock() - t0
            start = t if step_start is None else step_start
            batch = policy.schedule(t)
            if batch is None:
                step_start = None
                wake_s = policy.next_wakeup_s(t)
                try:
                    item = inbox.get(timeout=None if wake_s is None else max(0.0, wake_s - (self.clock() - t0)))
                except queue.Empty:
                    continue
                if item is None:
                    return stats
                admit(item)
                continue
            tokens = runner.execute(batch)
            end = self.clock() - t0
            for s in batch.seqs:
                r = s.request
                tok = tokens.get(r.id)
                if tok is not None and (tok in stops.get(r.id, ()) or r.id in cancelled):
                    r.output_tokens = r.num_generated + 1  # this token is its last
            finished = policy.on_step_done(batch, end)
            for r in finished:
                runner.release(r.id)
                stops.pop(r.id, None)
                cancelled.discard(r.id)
            stats.steps += 1
            stats.busy_s += end - start
            listener.on_step(end, tokens, finished, EngineState(
                policy.num_running, policy.num_waiting, policy.kv.num_used, policy.num_preemptions, stats.steps))
            step_start = end
