"""Request-level (static) batching, as in HF ``generate`` or FasterTransformer.

The policy waits until ``batch_size`` requests are queued or the oldest has waited
``max_wait_s``, then runs that batch to completion: one prefill step padded to the longest
prompt, then decode steps until the longest output is done. Finished sequences keep their
slot (and their padded KV reservation) until the whole batch ends, and the engine keeps
computing their padding, which the step's ``padding`` shape carries to the cost model.
"""

from __future__ import annotations

import heapq
from collections import deque

from sim.batch import Batch, ScheduledSeq, StepShape, chunk_attention
from sim.kv import BlockManager, blocks_for
from sim.policies.base import SchedulerConfig, register
from sim.queues import OrderKey, order_key
from sim.request import Request, Status


@register("static", summary="request-level batching: a batch runs to completion (HF generate)",
          preempt_modes=("off",))
class StaticPolicy:
    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        self.config = config
        self.kv = kv
        self.key = order_key(config.order)
        self.waiting: list[tuple[OrderKey, Request]] = []
        self._by_arrival: deque[Request] = deque()  # waiting requests in arrival order, lazily pruned
        self.rejected: list[Request] = []
        self.batch: list[Request] = []
        self.pad_len = 0  # longest prompt of the running batch
        self.steps_done = 0  # steps the running batch has taken

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.batch)

    @property
    def num_preemptions(self) -> int:
        return 0

    def add(self, request: Request, now: float) -> None:
        reason = self.config.reject_reason(request.prompt_tokens, request.output_tokens)
        if reason is None and not self.kv.fits_at_all(request.max_tokens):
            need = blocks_for(request.max_tokens, self.kv.block_size)
            reason = f"needs {need} KV blocks for {request.max_tokens} tokens; capacity is {self.kv.num_blocks}"
        if reason is not None:
            request.status = Status.REJECTED
            request.reject_reason = reason
            self.rejected.append(request)
            return
        heapq.heappush(self.waiting, (self.key(request), request))
        self._by_arrival.append(request)

    def next_wakeup_s(self, now: float) -> float | None:
        if self.batch or not self.waiting:
            return None
        oldest = self._by_arrival
        while oldest[0].status is not Status.WAITING:
            oldest.popleft()
        return oldest[0].arrival_s + self.config.max_wait_s

    def schedule(self, now: float) -> Batch | None:
        if not self.batch:
            return self._start_batch(now)
        active = [r for r in self.batch if not r.is_done]
        k = self.steps_done  # every active request has generated k tokens
        seqs = [ScheduledSeq(r, r.num_tokens - 1, 1) for r in active]
        own_context = sum(s.start for s in seqs)
        padding = StepShape(
            decode_seqs=len(self.batch) - len(active),
            decode_context_tokens=len(self.batch) * (self.pad_len + k - 1) - own_context,
        )
        return Batch(seqs=seqs, padding=padding, block_size=self.kv.block_size)

    def _start_batch(self, now: float) -> Batch | None:
        wakeup = self.next_wakeup_s(now)
        if wakeup is None or (len(self.waiting) < self.config.batch_size and now < wakeup):
            return None
        batch = [heapq.heappop(self.waiting)[1] for _ in range(min(self.config.batch_size, len(self.waiting)))]
        # Every slot is laid out padded to the longest prompt plus the longest output; shrink
        # the batch from its tail until those reservations fit.
        while True:
            pad_len = max(r.prompt_tokens for r in batch)
            slot_tokens = pad_len + max(r.output_tokens for r in batch) - 1
            if len(batch) == 1 or len(batch) * blocks_for(slot_tokens, self.kv.block_size) <= self.kv.num_free:
                break
            r = batch.pop()
            heapq.heappush(self.waiting, (self.key(r), r))
        if len(batch) == 1:
            slot_tokens = batch[0].max_tokens
        for r in batch:
            self.kv.allocate(r, slot_tokens)
            r.status = Status.RUNNING
            r.first_scheduled_s = now
        self.batch = batch
        self.pad_len = pad_len
        self.steps_done = 0
        seqs = [ScheduledSeq(r, 0, r.prompt_tokens) for r in batch]
        padding = StepShape(
            prefill_tokens=len(batch) * pad_len - sum(r.prompt_tokens for r in batch),
            prefill_attention_tokens=sum(
                chunk_attention(pad_len, 0) - chunk_attention(r.prompt_tokens, 0) for r in batch
            ),
        )
        return Batch(seqs=seqs, padding=padding, block_size=self.kv.block_size)

    def on_step_done(self, batch: Batch, now: float) -> list[Request]:
        finished: list[Request] = []
        for s in batch.seqs:
            r = s.request
            r.num_computed_tokens = s.start + s.num_new_tokens
            r.record_token(now)
            if r.is_done:
                r.status = Status.FINISHED
                r.finish_s = now
                finished.append(r)
        self.steps_done += 1
        self._end_batch_if_done()
        return finished

    def _end_batch_if_done(self) -> None:
        """The batch leaves (and its blocks are freed) when its longest output is done."""
        if all(r.is_done for r in self.batch):
            for r in self.batch:
                self.kv.free(r)
            self.batch = []
