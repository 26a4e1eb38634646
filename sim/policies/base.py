"""The policy interface, its configuration and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sim.batch import Batch
from sim.kv import BlockManager
from sim.metrics import GapRecorder
from sim.queues import ORDERS
from sim.request import Request

PREEMPT_MODES = ("recompute", "swap", "off")


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of every policy; each policy reads the ones it uses.

    ``token_budget`` caps the tokens one step computes (vLLM's ``max_num_batched_tokens``);
    ``None`` means no cap (whole-prompt prefill of any length). ``batch_size`` and
    ``max_wait_s`` are static batching's.
    """

    policy: str = "continuous"
    order: str = "fcfs"
    max_num_seqs: int = 256
    token_budget: int | None = None
    batch_size: int = 16
    max_wait_s: float = 1.0
    preempt: str = "recompute"

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(sorted(POLICIES))}")
        if self.order not in ORDERS:
            raise ValueError(f"unknown queue order {self.order!r}; known: {', '.join(ORDERS)}")
        if self.preempt not in PREEMPT_MODES:
            raise ValueError(f"preempt must be one of {', '.join(PREEMPT_MODES)}, got {self.preempt!r}")
        if self.policy == "static" and self.preempt != "off":
            raise ValueError(f"static batching reserves KV for the whole batch and never preempts; "
                             f"preempt must be 'off', got {self.preempt!r}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1 or None, got {self.token_budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")


class Policy(Protocol):
    """What an executor needs from a scheduling policy.

    The executor loop is: ``batch = policy.schedule(now)``; if it is ``None`` wait for an
    arrival (or until ``next_wakeup_s``); else run the batch, then call
    ``policy.on_step_done(batch, now)`` with the time the step ended. The policy owns the
    queues and the :class:`BlockManager`; it never reads a clock.
    """

    kv: BlockManager
    rejected: list[Request]

    def add(self, request: Request, now: float) -> None:
        """A request arrives; it is queued, or rejected (status REJECTED, with a reason)."""

    def schedule(self, now: float) -> Batch | None:
        """The next step's batch, or ``None`` when nothing can run now."""

    def on_step_done(self, batch: Batch, now: float) -> list[Request]:
        """Account the step that ended at ``now``; returns the requests it finished."""

    def next_wakeup_s(self, now: float) -> float | None:
        """When an idle policy may have work without a new arrival (a batching timeout)."""

    # The simulator's fast path; the live engine never calls these.
    def begin_fast(self) -> bool:
        """Switch to the fast path's bookkeeping before the first step (False: not possible,
        the executor steps every iteration). After it, ``schedule`` may leave grouped decodes
        out of ``Batch.seqs`` and every step is reported with ``on_steps_done``."""

    def repeat_limit(self, batch: Batch) -> int:
        """Steps that can run from ``batch`` with no decision in between (1: only this one),
        each after the first decoding every sequence of the one before once more."""

    def arrival_may_reschedule(self) -> bool:
        """Whether an arrival now could change the next batch."""

    def on_steps_done(self, batch: Batch, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        """Account ``len(ends_s)`` repeats of ``batch`` that ended at ``ends_s`` and record their
        inter-token gaps in ``itl``; returns the requests they finished."""

    @property
    def num_waiting(self) -> int:
        """Requests queued and not running (swapped ones included)."""

    @property
    def num_running(self) -> int:
        """Requests holding a running slot."""

    @property
    def num_preemptions(self) -> int:
        """Preemptions so far."""


PolicyFactory = Callable[[SchedulerConfig, BlockManager], Policy]
POLICIES: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy available by ``name``."""

    def deco(factory: PolicyFactory) -> PolicyFactory:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        POLICIES[name] = factory
        return factory

    return deco


def make_policy(config: SchedulerConfig, kv: BlockManager) -> Policy:
    try:
        factory = POLICIES[config.policy]
    except KeyError:
        raise ValueError(f"unknown policy {config.policy!r}; known: {', '.join(sorted(POLICIES))}") from None
    return factory(config, kv)
