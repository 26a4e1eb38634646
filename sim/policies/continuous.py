"""Iteration-level scheduling (Orca, vLLM): requests join and leave the batch at every step.

``continuous`` prefills a whole prompt in one step; :mod:`sim.policies.chunked` reuses this
class with chunking switched on. One step is built in four phases:

1. priority preemption - with queue order ``priority`` and preemption on, a waiting request
   that cannot be admitted may preempt running requests of strictly lower priority;
2. running requests (decodes first, then unfinished prefill chunks), each given the KV blocks
   its new tokens need - when blocks run out, a victim is preempted (lowest priority, then
   latest arrival), possibly the request itself;
3. swapped requests come back, if this step preempted nothing for lack of memory;
4. waiting requests are admitted in queue order while a slot, the token budget and KV blocks
   allow (head-of-line: the first one that does not fit stops admission, so nobody starves).

With ``preempt="off"`` a request reserves the blocks for its whole output when admitted, so a
running request never needs a block that is not there.
"""

from __future__ import annotations

import bisect
import heapq
import math

from sim.batch import Batch, ScheduledSeq
from sim.kv import BlockManager, blocks_for
from sim.metrics import GapRecorder
from sim.policies.base import SchedulerConfig, register
from sim.policies.decode_group import DecodeGroup
from sim.queues import OrderKey, order_key
from sim.request import Request, Status


@register("continuous", summary="iteration-level scheduling, whole-prompt prefill (Orca, vLLM v0)")
class ContinuousPolicy:
    chunked_prefill = False

    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        self.config = config
        self.kv = kv
        self.key = order_key(config.order)
        self.waiting: list[tuple[OrderKey, Request]] = []
        self.swapped: list[tuple[OrderKey, Request]] = []
        self.running: list[Request] = []
        self.rejected: list[Request] = []
        self._preemptions = 0
        # Keep a few blocks free when admitting next to running requests, so that admission
        # does not force an immediate preemption at the next block boundary (vLLM: 1%).
        self.watermark_blocks = max(1, kv.num_blocks // 100)
        # The simulator's fast path (begin_fast): running decodes live in a group, the other
        # running requests in ``prefilling`` (queue order).
        self.group: DecodeGroup | None = None
        self.prefilling: list[Request] = []

    # -- Policy protocol ---------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.swapped)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_preemptions(self) -> int:
        return self._preemptions

    def next_wakeup_s(self, now: float) -> float | None:
        return None

    def add(self, request: Request, now: float) -> None:
        reason = self.reject_reason(request)
        if reason is not None:
            request.status = Status.REJECTED
            request.reject_reason = reason
            self.rejected.append(request)
            return
        request.status = Status.WAITING
        heapq.heappush(self.waiting, (self.key(request), request))

    def reject_reason(self, request: Request) -> str | None:
        too_long = self.config.reject_reason(request.prompt_tokens, request.output_tokens)
        if too_long is not None:
            return too_long
        if not self.kv.fits_at_all(request.max_tokens):
            need = blocks_for(request.max_tokens, self.kv.block_size)
            return f"needs {need} KV blocks for {request.max_tokens} tokens; capacity is {self.kv.num_blocks}"
        budget = self.config.token_budget
        if not self.chunked_prefill and budget is not None and request.prompt_tokens > budget:
            return f"prompt of {request.prompt_tokens} tokens exceeds the token budget {budget} without chunked prefill"
        return None

    def schedule(self, now: float) -> Batch | None:
        step = _Step(budget=self.config.token_budget)
        if self.group is not None:
            step.unlisted = len(self.group)  # every member decodes (unless preempted below)
            step.budget_left -= step.unlisted
        if self.config.order == "priority" and self.config.preempt != "off":
            self._preempt_for_priority(step)
        if self.group is None:
            self._schedule_running(step)
        else:
            self._schedule_group(step, self.group)
        if not step.memory_preempted:
            self._schedule_swapped(step, now)
            if not self.swapped:
                self._schedule_waiting(step, now)
        if not step.seqs and not step.unlisted:
            if step.swap_out:
                raise RuntimeError("scheduler preempted requests but scheduled nothing")
            return None
        return Batch(
            seqs=step.seqs,
            swap_out_blocks=step.swap_out,
            swap_in_blocks=step.swap_in,
            preempted=step.preempted,
            block_size=self.kv.block_size,
            group_decodes=step.unlisted,
            group_context_tokens=self.group.context_tokens if step.unlisted and self.group is not None else 0,
        )

    def on_step_done(self, batch: Batch, now: float) -> list[Request]:
        finished: list[Request] = []
        for s in batch.seqs:
            r = s.request
            r.num_computed_tokens = s.start + s.num_new_tokens
            if r.num_computed_tokens == r.num_tokens:
                r.record_token(now)
                if r.is_done:
                    r.status = Status.FINISHED
                    r.finish_s = now
                    self.kv.free(r)
                    finished.append(r)
        if finished:
            self.running = [r for r in self.running if r.status is Status.RUNNING]
        return finished

    # -- the simulator's fast path -------------------------------------------------------------
    def begin_fast(self) -> bool:
        """Keep running decodes in a :class:`DecodeGroup` from now on: ``schedule`` leaves them
        out of ``Batch.seqs`` and steps are reported with :meth:`on_steps_done`. Not possible
        when a token budget below ``max_num_seqs`` can leave some decodes out of a step."""
        budget = self.config.token_budget
        if budget is not None and budget < self.config.max_num_seqs:
            return False
        assert not self.running, "begin_fast must come before the first step"
        self.group = DecodeGroup(0 if self.config.preempt == "off" else self.kv.block_size)
        return True

    def repeat_limit(self, batch: Batch) -> int:
        """How many steps in a row can run from ``batch`` with no decision in between, each
        next one decoding every sequence once more: until the first finish, or the first step
        whose new KV blocks the pool cannot supply (a preemption). Prefill chunks may be in
        the first step if each completes its prompt and nothing waits (a later step could
        admit it). Arrivals are the executor's to watch, through :meth:`arrival_may_reschedule`."""
        group = self.group
        if group is None or batch.preempted or batch.swap_in_blocks or batch.swap_out_blocks:
            return 1
        if self.config.order == "priority" and self.config.preempt != "off" and self.waiting:
            return 1  # a waiting request may become worth a priority preemption as blocks run out
        n = group.steps_to_finish() if len(group) else math.inf
        joining: list[tuple[int, int]] = []  # (tokens cached, blocks held) after the first step
        if batch.seqs:
            if self.waiting or self.swapped:
                return 1  # the next step could admit one
            listed_prefills = 0
            for s in batch.seqs:
                r = s.request
                cached = s.start + s.num_new_tokens
                if cached != r.num_tokens:
                    return 1  # a prefill continues in the next step
                listed_prefills += r in self.prefilling
                n = min(n, r.output_tokens - r.num_generated)  # its last token's step
                joining.append((cached, self.kv.blocks_held(r)))
            if listed_prefills < len(self.prefilling):
                return 1  # a prefill this step had no budget for runs in the next
        if n <= 1:
            return 1
        return group.block_limited_steps(int(n), self.kv.num_free, joining)

    def arrival_may_reschedule(self) -> bool:
        """Whether an arrival now could change the next step (else a run may go past it)."""
        if self.config.order == "priority" and self.config.preempt != "off":
            return True
        if len(self.running) >= self.config.max_num_seqs:
            return False
        # FCFS: a newcomer queues behind a head that cannot be admitted now, and nothing in a
        # run of decodes frees a slot or a block for that head.
        return not (self.config.order == "fcfs" and (self.waiting or self.swapped))

    def on_steps_done(self, batch: Batch, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        """Account ``len(ends_s)`` steps from ``batch`` (more than one only when
        :meth:`repeat_limit` allowed it) and record their inter-token gaps in ``itl``."""
        assert self.group is not None, "on_steps_done needs begin_fast"
        if not batch.seqs:
            return self._group_steps_done(ends_s, itl)
        finished = self._group_steps_done(ends_s[:1], itl)
        # Listed sequences after the group's: a request whose prompt completes joins the group
        # for the steps after this one.
        now, group, prefilling = ends_s[0], self.group, self.prefilling
        for s in batch.seqs:
            r = s.request
            r.num_computed_tokens = s.start + s.num_new_tokens
            if r.num_computed_tokens < r.num_tokens:
                if r not in prefilling:
                    bisect.insort(prefilling, r, key=self.key)
                continue
            prev = r.last_token_s
            r.record_token(now)
            if prev is not None:
                itl.add(now - prev)
            if r in prefilling:
                prefilling.remove(r)
            if r.is_done:
                self._finish(r, now)
                finished.append(r)
            else:
                group.join(r, self.key(r), self.kv.blocks_held(r))
        if len(ends_s) > 1:
            # The first step completed every prefill in it; the rest are the group's decodes.
            assert not finished
            finished = self._group_steps_done(ends_s[1:], itl)
        return finished

    def _group_steps_done(self, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        group, kv = self.group, self.kv
        assert group is not None
        # Blocks for the steps after the first: the first's were given when it was scheduled,
        # and repeat_limit made sure the pool has these.
        for m in group.needing_blocks(group.steps + len(ends_s)):
            kv.append_block(m.request)
        finished = group.advance(ends_s, itl)
        for r in finished:
            group.leave(r)
            self._finish(r, ends_s[-1])
        return finished

    def _finish(self, r: Request, now: float) -> None:
        r.status = Status.FINISHED
        r.finish_s = now
        self.kv.free(r)
        self.running.remove(r)

    def _schedule_group(self, step: _Step, group: DecodeGroup) -> None:
        """Phase 2 with a decode group: every member decodes; only those whose cache outgrows
        its blocks at this step need attention (in queue order, as the loop over running has)."""
        t = group.steps + 1
        kv = self.kv
        for m in group.needing_blocks(t):
            r = m.request
            if r not in group:
                continue  # preempted earlier in this step
            if kv.num_free:
                kv.append_block(r)  # what _make_room does when a block is free
            else:
                self._make_room(r, group.tokens_to_hold(m, t), step)
        if self.prefilling:
            self._schedule_prefills(step, list(self.prefilling))

    # -- phases ------------------------------------------------------------------------------
    def _chunk(self, request: Request, step: _Step) -> int:
        """Tokens ``request`` computes this step, or 0 when it must wait."""
        remaining = request.remaining_prefill
        if self.chunked_prefill:
            return int(min(remaining, step.budget_left))
        if remaining <= step.budget_left or not (step.seqs or step.unlisted):
            # A whole prefill that is larger than the budget (only a recompute can be) runs
            # alone in its own step rather than never.
            return remaining
        return 0

    def _tokens_to_hold(self, request: Request, num_new: int) -> int:
        if self.config.preempt == "off":
            return request.max_tokens
        return request.num_computed_tokens + num_new

    def _schedule_running(self, step: _Step) -> None:
        # self.running is kept in queue order; decodes go first, then unfinished prefills.
        decodes: list[Request] = []
        prefills: list[Request] = []
        for r in self.running:
            if r.num_generated and r.prompt_tokens + r.num_generated - r.num_computed_tokens == 1:
                decodes.append(r)
            else:
                prefills.append(r)
        tables, bs = self.kv.tables, self.kv.block_size
        reserved = self.config.preempt == "off"
        for r in decodes:
            if r.status is not Status.RUNNING:
                continue  # preempted earlier in this step
            if step.budget_left <= 0:
                return
            hold = r.num_computed_tokens + 1
            if not reserved and hold > len(tables[r.id]) * bs and not self._make_room(r, hold, step):
                continue
            step.add(ScheduledSeq(r, r.num_computed_tokens, 1))
        self._schedule_prefills(step, prefills)

    def _schedule_prefills(self, step: _Step, prefills: list[Request]) -> None:
        for r in prefills:
            if r.status is not Status.RUNNING:
                continue
            if step.budget_left <= 0:
                return
            n = self._chunk(r, step)
            if n == 0:
                continue
            hold = self._tokens_to_hold(r, n)
            if not self._make_room(r, hold, step):
                continue
            step.add(ScheduledSeq(r, r.num_computed_tokens, n))

    def _make_room(self, r: Request, hold: int, step: _Step) -> bool:
        """Allocate blocks for ``r`` to hold ``hold`` tokens, preempting victims if needed;
        False when ``r`` itself was preempted."""
        while not self.kv.can_allocate(r, hold):
            victim = self._victim(exclude=r, step=step)
            if victim is None or self.key(victim) < self.key(r):
                victim = r
            self._preempt(victim, step)
            step.memory_preempted = True
            if victim is r:
                return False
        self.kv.allocate(r, hold)
        return True

    def _schedule_swapped(self, step: _Step, now: float) -> None:
        while self.swapped and len(self.running) < self.config.max_num_seqs and step.budget_left > 0:
            r = self.swapped[0][1]
            n = self._chunk(r, step)
            if n == 0:
                break
            held = len(self.kv.host_tables.get(r.id, ()))
            grow = max(0, blocks_for(self._tokens_to_hold(r, n), self.kv.block_size) - held)
            if not self.kv.can_swap_in(r, reserve=grow):
                break
            heapq.heappop(self.swapped)
            step.swap_in.extend(self.kv.swap_in(r))
            step.swapped_in.add(r.id)
            self.kv.allocate(r, self._tokens_to_hold(r, n))
            r.status = Status.RUNNING
            self._run(r)
            step.add(ScheduledSeq(r, r.num_computed_tokens, n))

    def _schedule_waiting(self, step: _Step, now: float) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs and step.budget_left > 0:
            r = self.waiting[0][1]
            n = self._chunk(r, step)
            if n == 0:
                break
            reserve = self.watermark_blocks if self.running else 0
            if not self.kv.can_allocate(r, self._tokens_to_hold(r, n), reserve=reserve):
                break
            heapq.heappop(self.waiting)
            self.kv.allocate(r, self._tokens_to_hold(r, n))
            r.status = Status.RUNNING
            if r.first_scheduled_s is None:
                r.first_scheduled_s = now
            self._run(r)
            step.add(ScheduledSeq(r, r.num_computed_tokens, n))

    def _run(self, request: Request) -> None:
        """Add ``request`` to the running list, which stays in queue order."""
        bisect.insort(self.running, request, key=self.key)

    def _preempt_for_priority(self, step: _Step) -> None:
        if not self.waiting:
            return
        head = self.waiting[0][1]
        while not self._admissible(head):
            victim = self._victim(exclude=None, step=step)
            if victim is None or victim.priority <= head.priority:
                return
            self._preempt(victim, step)

    def _admissible(self, request: Request) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        n = request.remaining_prefill
        if self.config.token_budget is not None:
            n = min(n, self.config.token_budget)
        return self.kv.can_allocate(request, self._tokens_to_hold(request, n))

    def _victim(self, exclude: Request | None, step: _Step) -> Request | None:
        """The running request to preempt first: lowest priority, then latest arrival."""
        best: Request | None = None
        for r in self.running:
            if r is exclude or r.id in step.swapped_in:
                continue
            if best is None or (r.priority, r.arrival_s, r.id) > (best.priority, best.arrival_s, best.id):
                best = r
        return best

    def _preempt(self, victim: Request, step: _Step) -> None:
        self.running.remove(victim)
        if self.group is not None:
            if victim in self.group:
                self.group.leave(victim)
                step.unlisted -= 1
                step.budget_left += 1
            else:
                self.prefilling.remove(victim)
        step.remove(victim)
        step.preempted.append(victim)
        victim.preemptions += 1
        self._preemptions += 1
        if self.config.preempt == "swap" and self.kv.can_swap_out(victim):
            step.swap_out.extend(self.kv.swap_out(victim))
            victim.status = Status.SWAPPED
            heapq.heappush(self.swapped, (self.key(victim), victim))
        else:
            # recompute (or swap space exhausted): drop the cache, redo the prefill later.
            self.kv.free(victim)
            victim.num_computed_tokens = 0
            victim.status = Status.WAITING
            heapq.heappush(self.waiting, (self.key(victim), victim))


class _Step:
    """The batch being built in one ``schedule`` call."""

    def __init__(self, budget: int | None) -> None:
        self.budget_left: float = math.inf if budget is None else budget
        self.seqs: list[ScheduledSeq] = []
        self.swap_out: list[tuple[int, int]] = []
        self.swap_in: list[tuple[int, int]] = []
        self.swapped_in: set[int] = set()
        self.preempted: list[Request] = []
        self.memory_preempted = False
        self.unlisted = 0  # decodes of the policy's group, in the step but not in ``seqs``

    def add(self, seq: ScheduledSeq) -> None:
        self.seqs.append(seq)
        self.budget_left -= seq.num_new_tokens

    def remove(self, request: Request) -> None:
        for i, s in enumerate(self.seqs):
            if s.request is request:
                self.budget_left += s.num_new_tokens
                del self.seqs[i]
                return
