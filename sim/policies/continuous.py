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
from sim.policies.base import SchedulerConfig, register
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
        step = self._new_step()
        if self.config.order == "priority" and self.config.preempt != "off":
            self._preempt_for_priority(step)
        self._schedule_running(step)
        if not step.memory_preempted:
            self._schedule_swapped(step, now)
            if not self.swapped:
                self._schedule_waiting(step, now)
        if not step.seqs and not step.unlisted:  # step.empty, inlined (read once per step)
            if step.swap_out:
                raise RuntimeError("scheduler preempted requests but scheduled nothing")
            return None
        return Batch(seqs=step.seqs, swap_out_blocks=step.swap_out, swap_in_blocks=step.swap_in,
                     preempted=step.preempted, block_size=self.kv.block_size, group_decodes=step.unlisted,
                     group_context_tokens=step.unlisted_context_tokens)

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

    # -- building a step (the simulator's fast path, sim.fastpath, overrides _new_step) -----
    def _new_step(self) -> StepDraft:
        return StepDraft(self.config.token_budget)

    # -- phases ------------------------------------------------------------------------------
    def _chunk(self, request: Request, step: StepDraft) -> int:
        """Tokens ``request`` computes this step, or 0 when it must wait."""
        remaining = request.remaining_prefill
        if self.chunked_prefill:
            return int(min(remaining, step.budget_left))
        if remaining <= step.budget_left or step.empty:
            # A whole prefill that is larger than the budget (only a recompute can be) runs
            # alone in its own step rather than never.
            return remaining
        return 0

    def _tokens_to_hold(self, request: Request, num_new: int) -> int:
        if self.config.preempt == "off":
            return request.max_tokens
        return request.num_computed_tokens + num_new

    def _schedule_running(self, step: StepDraft) -> None:
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

    def _schedule_prefills(self, step: StepDraft, prefills: list[Request]) -> None:
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

    def _make_room(self, r: Request, hold: int, step: StepDraft) -> bool:
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

    def _schedule_swapped(self, step: StepDraft, now: float) -> None:
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

    def _schedule_waiting(self, step: StepDraft, now: float) -> None:
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

    def _preempt_for_priority(self, step: StepDraft) -> None:
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

    def _victim(self, exclude: Request | None, step: StepDraft) -> Request | None:
        """The running request to preempt first: lowest priority, then latest arrival."""
        best: Request | None = None
        for r in self.running:
            if r is exclude or r.id in step.swapped_in:
                continue
            if best is None or (r.priority, r.arrival_s, r.id) > (best.priority, best.arrival_s, best.id):
                best = r
        return best

    def _preempt(self, victim: Request, step: StepDraft) -> None:
        self.running.remove(victim)
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


class StepDraft:
    """The batch being built in one ``schedule`` call.

    ``unlisted`` decodes are in the step but not in ``seqs``: the simulator's fast path keeps its
    running decodes as a group (:mod:`sim.fastpath`) and gives only their number and summed
    context (``unlisted_context_tokens``), which the batch carries as ``group_decodes`` and
    ``group_context_tokens``. They take their tokens from the budget like listed decodes."""

    def __init__(self, budget: int | None, unlisted: int = 0, unlisted_context_tokens: int = 0) -> None:
        self.budget_left: float = (math.inf if budget is None else budget) - unlisted
        self.unlisted = unlisted
        self.unlisted_context_tokens = unlisted_context_tokens
        self.seqs: list[ScheduledSeq] = []
        self.swap_out: list[tuple[int, int]] = []
        self.swap_in: list[tuple[int, int]] = []
        self.swapped_in: set[int] = set()
        self.preempted: list[Request] = []
        self.memory_preempted = False

    @property
    def empty(self) -> bool:
        return not self.seqs and not self.unlisted

    def add(self, seq: ScheduledSeq) -> None:
        self.seqs.append(seq)
        self.budget_left -= seq.num_new_tokens

    def remove(self, request: Request) -> None:
        for i, s in enumerate(self.seqs):
            if s.request is request:
                self.budget_left += s.num_new_tokens
                del self.seqs[i]
                return
