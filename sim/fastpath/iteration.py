"""The fast path of iteration-level scheduling (``continuous`` and ``chunked``).

:class:`FastContinuous` makes the same decisions as :class:`ContinuousPolicy`, whose phases it
reuses, but keeps the running decodes in a :class:`LockstepDecodes` group: a batch gives them
as a count and a context sum instead of one :class:`ScheduledSeq` each, and a run of steps in
which nothing can be decided is accounted at once (:meth:`FastContinuous.on_steps_done`). The
other running requests - prefills not yet complete - are kept in ``prefilling``, in queue order.
"""

from __future__ import annotations

import bisect
import math

from sim.batch import Batch
from sim.fastpath.lockstep import LockstepDecodes
from sim.kv import BlockManager
from sim.metrics import GapRecorder
from sim.policies.base import SchedulerConfig
from sim.policies.chunked import ChunkedPolicy
from sim.policies.continuous import ContinuousPolicy, StepDraft
from sim.request import Request, Status


class FastContinuous(ContinuousPolicy):
    """``continuous`` for the simulator's fast path; answers equal to stepping the plain policy."""

    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        super().__init__(config, kv)
        self.group = LockstepDecodes(0 if config.preempt == "off" else kv.block_size)
        self.prefilling: list[Request] = []

    @staticmethod
    def possible(config: SchedulerConfig) -> bool:
        """A group decodes every member each step; a token budget below ``max_num_seqs`` could
        leave some out, which a group cannot express."""
        return config.token_budget is None or config.token_budget >= config.max_num_seqs

    # -- building a step -----------------------------------------------------------------------
    def _new_step(self) -> StepDraft:
        # Every member decodes (unless preempted while the step is built), unlisted.
        group = self.group
        return StepDraft(self.config.token_budget, len(group), group.context_tokens)

    def _schedule_running(self, step: StepDraft) -> None:
        """Phase 2 with the group: every member decodes; only those whose cache outgrows its
        blocks at this step need attention (in queue order, as the loop over running has)."""
        group, kv = self.group, self.kv
        t = group.steps + 1
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

    def _preempt(self, victim: Request, step: StepDraft) -> None:
        if victim in self.group:
            # Bring the victim's counts up to date before the plain policy drops or swaps its cache.
            self.group.leave(victim)
            step.unlisted -= 1
            step.unlisted_context_tokens = self.group.context_tokens
            step.budget_left += 1
        else:
            self.prefilling.remove(victim)
        super()._preempt(victim, step)

    # -- runs of steps -------------------------------------------------------------------------
    def repeat_limit(self, batch: Batch) -> int:
        """How many steps in a row can run from ``batch`` with no decision in between, each
        next one decoding every sequence once more: until the first finish, or the first step
        whose new KV blocks the pool cannot supply (a preemption). Prefill chunks may be in
        the first step if each completes its prompt and nothing waits (a later step could
        admit it). Arrivals are the executor's to watch, through :meth:`arrival_may_reschedule`."""
        group = self.group
        if batch.preempted or batch.swap_in_blocks or batch.swap_out_blocks:
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

    def on_step_done(self, batch: Batch, now: float) -> list[Request]:
        raise TypeError("a fast-path policy reports its steps with on_steps_done")

    def on_steps_done(self, batch: Batch, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        """Account ``len(ends_s)`` steps from ``batch`` (more than one only when
        :meth:`repeat_limit` allowed it) and record their inter-token gaps in ``itl``."""
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


class FastChunked(FastContinuous, ChunkedPolicy):
    """``chunked`` for the simulator's fast path."""
