"""vLLM v1's scheduler, mirrored: the decisions of ``vllm.v1.core.sched.scheduler.Scheduler``
(vLLM 0.32.0, read in the installed package) for plain text requests without prefix caching.

Citations name the vLLM function a rule comes from: ``schedule()`` and ``_preempt_request()``
in ``vllm/v1/core/sched/scheduler.py``, ``allocate_slots()`` in
``vllm/v1/core/kv_cache_manager.py``, ``BlockPool.__init__`` in ``vllm/v1/core/block_pool.py``,
the queues in ``vllm/v1/core/sched/request_queue.py``. The code is ours.

One step, as ``schedule()`` builds it:

1. running requests in the order they were admitted (no decodes-first reordering), each asking
   for every token it has not computed, capped by ``long_prefill_token_threshold`` and by the
   token budget left. When its KV blocks cannot be allocated, the last running request is
   preempted (priority order: the lowest priority, then the latest arrival), possibly the
   request itself, until they can; a request that still cannot run ends the running phase;
2. only if this step preempted nobody, waiting requests in queue order (FCFS: arrival order,
   with preempted requests put back at the front; priority: a heap by priority and arrival),
   while a running slot (``max_num_seqs``) and budget are left: a prompt is chunked to the
   budget left, and admitted only if KV blocks for its whole sequence are free (plus the
   watermark when requests are running); the first that does not fit stops admission.

Preemption is by recompute (vLLM v1 has no swap): blocks freed, the prefill redone later.
``kv.num_blocks`` is vLLM's ``num_gpu_blocks`` (what ``/metrics`` reports as
``vllm:cache_config_info``), one of which is vLLM's null block and never holds a request.

Left out, as they do not change decisions for plain text requests on one engine without
prefix caching: speculative decoding, async scheduling's output placeholders, KV connectors,
encoder inputs, LoRA limits, Mamba alignment, pipeline parallel and DP prefill throttling.
"""

from __future__ import annotations

import heapq
from collections import deque

from sim.batch import Batch, ScheduledSeq
from sim.kv import BlockManager, blocks_for
from sim.policies.base import SchedulerConfig, register
from sim.policies.continuous import StepDraft
from sim.queues import OrderKey, priority_key
from sim.request import Request, Status

VLLM_VERSION = "0.32.0"
"""The vLLM whose scheduler this policy mirrors (``tests/data/vllm_scheduler_cases.json``)."""

DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
"""vLLM's ``max_num_batched_tokens`` for its OpenAI server on CPU and on most GPUs (vLLM:
``EngineArgs.get_batch_defaults``; 8192 on H100/H200, 16384 on >= 160 GB devices)."""

NULL_BLOCKS = 1
"""vLLM: ``BlockPool.__init__`` takes one block out of the free queue as the null block."""


class WaitingQueue:
    """vLLM's waiting queue (``request_queue.py``): ``FCFSRequestQueue`` is a deque that
    preemption prepends to; ``PriorityRequestQueue`` a heap by (priority, arrival, id), where
    "prepending" is a push."""

    def __init__(self, order: str) -> None:
        self.priority = order == "priority"
        self._deque: deque[Request] = deque()
        self._heap: list[tuple[OrderKey, Request]] = []

    def __len__(self) -> int:
        return len(self._heap) if self.priority else len(self._deque)

    def peek(self) -> Request:
        return self._heap[0][1] if self.priority else self._deque[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[1] if self.priority else self._deque.popleft()

    def append(self, request: Request) -> None:
        if self.priority:
            heapq.heappush(self._heap, (priority_key(request), request))
        else:
            self._deque.append(request)

    def prepend(self, request: Request) -> None:
        if self.priority:
            heapq.heappush(self._heap, (priority_key(request), request))
        else:
            self._deque.appendleft(request)


@register("vllm", summary=f"vLLM v1's scheduler ({VLLM_VERSION}): running requests first in admission order, "
                          "chunked prefill, the last running request preempted by recompute",
          preempt_modes=("recompute",), default_token_budget=DEFAULT_MAX_NUM_BATCHED_TOKENS,
          orders=("fcfs", "priority"))
class VllmPolicy:
    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting = WaitingQueue(config.order)
        self.running: list[Request] = []
        self.rejected: list[Request] = []
        self._preemptions = 0
        # vLLM: KVCacheManager.__init__, watermark_blocks = int(watermark * num_blocks).
        self.watermark_blocks = int(config.kv_watermark * kv.num_blocks)

    # -- Policy protocol ---------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

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
        # vLLM: Scheduler.add_request -> _enqueue_waiting_request, appended to the waiting queue.
        request.status = Status.WAITING
        self.waiting.append(request)

    def reject_reason(self, request: Request) -> str | None:
        too_long = self.config.reject_reason(request.prompt_tokens, request.output_tokens)
        if too_long is not None:
            return too_long
        # vLLM refuses to start when max_model_len does not fit its pool; here a request that
        # could never fit is rejected instead of blocking the queue.
        usable = self.kv.num_blocks - NULL_BLOCKS
        need = blocks_for(request.max_tokens, self.kv.block_size)
        if need > usable:
            return (f"needs {need} KV blocks for {request.max_tokens} tokens; capacity is {usable} "
                    f"(vLLM's {self.kv.num_blocks} less its null block)")
        return None

    def schedule(self, now: float) -> Batch | None:
        step = StepDraft(self.config.token_budget)
        preempted: list[Request] = []
        while True:
            self._schedule_once(step, now)
            preempted += step.preempted
            if not step.empty or not step.preempted:
                break
            # Priority preemption can preempt the first running request itself, leaving vLLM an
            # empty step (no forward pass, no time) whose successor schedules the rest: run it.
            step = StepDraft(self.config.token_budget)
        if step.empty:
            return None
        return Batch(seqs=step.seqs, preempted=preempted, block_size=self.kv.block_size)

    def on_step_done(self, batch: Batch, now: float) -> list[Request]:
        # vLLM: update_from_output. A request whose cache covers all its tokens samples one;
        # it stops at max_tokens (check_stop) and is freed and leaves the running list.
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

    # -- one vLLM schedule() call --------------------------------------------------------------
    def _free_blocks(self) -> int:
        return self.kv.num_free - NULL_BLOCKS

    def _schedule_once(self, step: StepDraft, now: float) -> None:
        # vLLM: schedule(), the cap is lifted when only one request is running or waiting,
        # as there is nobody for a long prefill to starve.
        threshold = self.config.long_prefill_token_threshold
        if len(self.running) + len(self.waiting) <= 1:
            threshold = 0
        self._schedule_running(step, threshold)
        # vLLM: schedule(), "Next, schedule the WAITING requests" only `if not preempted_reqs`.
        if not step.preempted:
            self._schedule_waiting(step, threshold, now)

    def _num_new_tokens(self, request: Request, threshold: int, step: StepDraft) -> int:
        # vLLM: schedule(), num_new_tokens = num_tokens - num_computed_tokens, then
        # `if 0 < long_prefill_token_threshold < num_new_tokens`, then the token budget.
        n = request.num_tokens - request.num_computed_tokens
        if 0 < threshold < n:
            n = threshold
        return int(min(n, step.budget_left))

    def _schedule_running(self, step: StepDraft, threshold: int) -> None:
        # vLLM: schedule(), "First, schedule the RUNNING requests": self.running in order while
        # token budget is left.
        index = 0
        while index < len(self.running) and step.budget_left > 0:
            request = self.running[index]
            n = self._num_new_tokens(request, threshold, step)
            if self.config.max_model_len is not None:
                # vLLM: schedule(), a running request's input positions stay below max_model_len
                # (one kept for the sampled token).
                n = min(n, self.config.max_model_len - request.num_computed_tokens - 1)
            if n <= 0:
                index += 1  # vLLM: `continue`, not `break`: later requests may still run
                continue
            hold = request.num_computed_tokens + n
            # vLLM: allocate_slots() for a running request applies no watermark and no
            # full-sequence check: blocks for its computed plus new tokens, the free pool.
            while self.kv.extra_blocks(request, hold) > self._free_blocks():
                victim = self._victim()
                victim_index = self.running.index(victim)
                del self.running[victim_index]
                if victim_index < index:
                    index -= 1  # vLLM: priority mode may preempt a request already scheduled
                self._preempt(victim, step)
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                # vLLM: `if new_blocks is None: break`, the running phase ends here.
                return
            self.kv.allocate(request, hold)
            step.add(ScheduledSeq(request, request.num_computed_tokens, n))
            index += 1

    def _victim(self) -> Request:
        # vLLM: schedule(), FCFS preempts `self.running.pop()`, the last admitted; priority
        # preempts max(self.running, key=(priority, arrival_time)), the first such in the list.
        if self.config.order == "priority":
            return max(self.running, key=lambda r: (r.priority, r.arrival_s))
        return self.running[-1]

    def _preempt(self, victim: Request, step: StepDraft) -> None:
        # vLLM: _preempt_request(): blocks freed, num_computed_tokens = 0, status PREEMPTED,
        # waiting.prepend_request(); a victim scheduled earlier this step gives its tokens back.
        step.remove(victim)
        step.preempted.append(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.status = Status.WAITING
        victim.preemptions += 1
        self._preemptions += 1
        self.waiting.prepend(victim)

    def _schedule_waiting(self, step: StepDraft, threshold: int, now: float) -> None:
        # vLLM: schedule(), the waiting loop `while token_budget > 0`, stopping at
        # `len(self.running) >= max_num_running_reqs`.
        bs = self.kv.block_size
        while self.waiting and step.budget_left > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            # Without prefix caching a waiting request has computed nothing (a preempted one
            # was reset to 0): the whole sequence so far, outputs included, is prefilled.
            n = self._num_new_tokens(request, threshold, step)
            if n <= 0:
                break
            # vLLM: allocate_slots(full_sequence_must_fit=scheduler_reserve_full_isl (default
            # True), has_scheduled_reqs=bool(self.running)): blocks for the whole sequence,
            # plus the watermark for a waiting request when any request is running.
            watermark = self.watermark_blocks if self.running else 0
            whole = request.num_tokens
            if self.config.max_model_len is not None:
                whole = min(whole, self.config.max_model_len)
            if blocks_for(whole, bs) + watermark > self._free_blocks():
                break
            if blocks_for(n, bs) + watermark > self._free_blocks():
                break
            # vLLM: pop_request(), self.running.append(request), status RUNNING.
            self.waiting.pop()
            self.running.append(request)
            request.status = Status.RUNNING
            if request.first_scheduled_s is None:
                request.first_scheduled_s = now
            self.kv.allocate(request, n)
            step.add(ScheduledSeq(request, 0, n))
