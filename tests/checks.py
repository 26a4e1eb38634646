"""The policy test matrix, and a policy wrapper that checks the scheduler's invariants at every step."""

from __future__ import annotations

import itertools

from sim.batch import Batch
from sim.policies import POLICIES, SchedulerConfig
from sim.policies.base import PREEMPT_MODES, Policy
from sim.queues import ORDERS
from sim.request import Request


def policy_matrix() -> list[tuple[str, str, str]]:
    """Every registered policy x queue order x preemption mode that the scheduler config accepts:
    the matrix of the invariant, fast-path and seam tests, read from the registries."""
    combos = []
    for policy, order, preempt in itertools.product(sorted(POLICIES), ORDERS, PREEMPT_MODES):
        try:
            SchedulerConfig(policy=policy, order=order, preempt=preempt)
        except ValueError:
            continue
        combos.append((policy, order, preempt))
    return combos


class CheckedPolicy:
    """Delegates to ``inner`` and asserts, per step: KV use within capacity, the token budget
    respected, no request scheduled twice, every scheduled request holding enough blocks."""

    def __init__(self, inner: Policy, token_budget: int | None = None) -> None:
        self.inner = inner
        self.token_budget = token_budget
        self.max_kv_used = 0
        self.steps = 0
        self.swapped_in_blocks = 0
        self.swapped_out_blocks = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def num_waiting(self) -> int:
        return self.inner.num_waiting

    @property
    def num_running(self) -> int:
        return self.inner.num_running

    @property
    def num_preemptions(self) -> int:
        return self.inner.num_preemptions

    def add(self, request: Request, now: float) -> None:
        self.inner.add(request, now)

    def next_wakeup_s(self, now: float) -> float | None:
        return self.inner.next_wakeup_s(now)

    def schedule(self, now: float) -> Batch | None:
        batch = self.inner.schedule(now)
        kv = self.inner.kv
        assert 0 <= kv.num_used <= kv.num_blocks
        assert kv.num_host_used <= kv.num_host_blocks
        self.max_kv_used = max(self.max_kv_used, kv.num_used)
        if batch is not None:
            ids = [s.request.id for s in batch.seqs]
            assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
            if self.token_budget is not None:
                assert batch.num_scheduled_tokens <= self.token_budget
            for s in batch.seqs:
                assert s.num_new_tokens >= 1
                assert s.start == s.request.num_computed_tokens
                assert s.start + s.num_new_tokens <= s.request.num_tokens
                held = kv.blocks_held(s.request) * kv.block_size
                assert held >= s.start + s.num_new_tokens, "scheduled tokens without KV blocks"
            self.swapped_in_blocks += len(batch.swap_in_blocks)
            self.swapped_out_blocks += len(batch.swap_out_blocks)
        return batch

    def on_step_done(self, batch: Batch, now: float) -> list[Request]:
        self.steps += 1
        return self.inner.on_step_done(batch, now)
