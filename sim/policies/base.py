"""The policy interface, its configuration and the registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from sim.batch import Batch
from sim.kv import BlockManager
from sim.queues import ORDERS
from sim.request import Request

PREEMPT_MODES = ("recompute", "swap", "off")


@dataclass(frozen=True)
class SchedulerConfig:
    """Knobs of every policy; each policy reads the ones it uses.

    ``token_budget`` caps the tokens one step computes (vLLM's ``max_num_batched_tokens``);
    ``None`` means the policy's default (:attr:`PolicyInfo.default_token_budget`; for most, no
    cap: whole-prompt prefill of any length). ``preempt`` ``None`` means the policy's default
    (the first of its :attr:`PolicyInfo.preempt_modes`). Both are resolved here, so a config
    written to ``config.json`` says what ran. ``batch_size`` and ``max_wait_s`` are static
    batching's. ``max_model_len`` is the longest sequence (prompt + output) the model takes;
    a longer request is rejected with that reason (``None``: no limit but KV capacity).
    ``long_prefill_token_threshold`` (vLLM's knob of that name; 0: off) caps the tokens one
    request's prefill computes per step, and ``kv_watermark`` (vLLM's ``watermark``) is the
    fraction of KV blocks kept free when admitting a waiting request; the ``vllm`` policy
    reads both.
    """

    policy: str = "continuous"
    order: str = "fcfs"
    max_num_seqs: int = 256
    token_budget: int | None = None
    batch_size: int = 16
    max_wait_s: float = 1.0
    preempt: str | None = None
    max_model_len: int | None = None
    long_prefill_token_threshold: int = 0
    kv_watermark: float = 0.0

    def __post_init__(self) -> None:
        info = policy_info(self.policy)
        if self.order not in ORDERS:
            raise ValueError(f"unknown queue order {self.order!r}; known: {', '.join(ORDERS)}")
        if info.orders is not None and self.order not in info.orders:
            raise ValueError(f"order must be one of {', '.join(info.orders)} for policy {self.policy!r}, "
                             f"got {self.order!r}")
        if self.preempt is None:
            object.__setattr__(self, "preempt", info.preempt_modes[0])
        if self.preempt not in info.preempt_modes:
            if info.preempt_modes == ("off",):
                raise ValueError(f"policy {self.policy!r} never preempts ({info.summary}); "
                                 f"preempt must be 'off', got {self.preempt!r}")
            raise ValueError(f"preempt must be one of {', '.join(info.preempt_modes)} for policy {self.policy!r}, "
                             f"got {self.preempt!r}")
        if self.token_budget is None and info.default_token_budget is not None:
            object.__setattr__(self, "token_budget", info.default_token_budget)
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.token_budget is not None and self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1 or None, got {self.token_budget}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {self.max_wait_s}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 or None, got {self.max_model_len}")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0 (0: off), "
                             f"got {self.long_prefill_token_threshold}")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")

    def reject_reason(self, prompt_tokens: int, output_tokens: int) -> str | None:
        """Why a request of these lengths can never run under this config (None: it can)."""
        if self.max_model_len is not None and prompt_tokens + output_tokens > self.max_model_len:
            return (f"{prompt_tokens} prompt + {output_tokens} output tokens exceed the model's "
                    f"{self.max_model_len} positions")
        return None


class Policy(Protocol):
    """What an executor needs from a scheduling policy.

    The executor loop is: ``batch = policy.schedule(now)``; if it is ``None`` wait for an
    arrival (or until ``next_wakeup_s``); else run the batch, then call
    ``policy.on_step_done(batch, now)`` with the time the step ended. The policy owns the
    queues and the :class:`BlockManager`; it never reads a clock. The live engine and the
    simulator (step by step) use exactly this; the simulator's optional fast path is a
    separate capability (:mod:`sim.fastpath`).
    """

    config: SchedulerConfig
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


@dataclass(frozen=True)
class PolicyInfo:
    """A registered policy: how to build it and what the CLI and defaults need to know."""

    name: str
    factory: PolicyFactory
    summary: str
    preempt_modes: tuple[str, ...] = PREEMPT_MODES
    """Preemption modes it supports, its default first."""
    default_token_budget: int | None = None
    orders: tuple[str, ...] | None = None
    """Queue orders it supports (``None``: every one in :data:`sim.queues.ORDERS`)."""


POLICIES: dict[str, PolicyInfo] = {}


def register(name: str, *, summary: str, preempt_modes: tuple[str, ...] = PREEMPT_MODES,
             default_token_budget: int | None = None,
             orders: tuple[str, ...] | None = None) -> Callable[[PolicyFactory], PolicyFactory]:
    """Class decorator: make a policy available by ``name`` (CLI choices, defaults and the test
    matrix all read :data:`POLICIES`)."""
    unknown = [m for m in preempt_modes if m not in PREEMPT_MODES]
    if not preempt_modes or unknown:
        raise ValueError(f"preempt_modes must be a non-empty subset of {PREEMPT_MODES}, got {preempt_modes}")
    if orders is not None and (not orders or any(o not in ORDERS for o in orders)):
        raise ValueError(f"orders must be a non-empty subset of {tuple(ORDERS)}, got {orders}")

    def deco(factory: PolicyFactory) -> PolicyFactory:
        if name in POLICIES:
            raise ValueError(f"policy {name!r} registered twice")
        POLICIES[name] = PolicyInfo(name, factory, summary, preempt_modes, default_token_budget, orders)
        return factory

    return deco


def policy_info(name: str) -> PolicyInfo:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; known: {', '.join(sorted(POLICIES))}") from None


def make_policy(config: SchedulerConfig, kv: BlockManager) -> Policy:
    return policy_info(config.policy).factory(config, kv)
