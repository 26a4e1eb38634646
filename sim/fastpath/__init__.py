"""The simulator's fast path: an optional capability of the simulated executor, not of the
scheduling interface that the live engine uses.

A fast variant of a policy makes exactly the decisions of the plain policy (it subclasses it)
but can say how many steps may follow a batch before any decision could differ
(``repeat_limit``) and account such a run at once (``on_steps_done``); the executor then prices
the run with one call (:func:`sim.cost.decode_run_times`) and skips the scheduler in between.
``--exact-steps`` and the live engine never build one. A policy without a fast variant is
simply stepped every iteration; ``tests/test_fastpath.py`` checks that answers are identical.
"""

from __future__ import annotations

from typing import Protocol

from sim.batch import Batch
from sim.fastpath.iteration import FastChunked, FastContinuous
from sim.fastpath.static import StaticRuns
from sim.metrics import GapRecorder
from sim.policies.base import Policy
from sim.policies.chunked import ChunkedPolicy
from sim.policies.continuous import ContinuousPolicy
from sim.policies.static import StaticPolicy
from sim.request import Request


class FastPolicy(Policy, Protocol):
    """A policy that the simulated executor can run many steps at a time."""

    def repeat_limit(self, batch: Batch) -> int:
        """Steps that can run from ``batch`` with no decision in between (1: only this one),
        each after the first decoding every sequence of the one before once more."""

    def arrival_may_reschedule(self) -> bool:
        """Whether an arrival now could change the next batch."""

    def on_steps_done(self, batch: Batch, ends_s: list[float], itl: GapRecorder) -> list[Request]:
        """Account ``len(ends_s)`` repeats of ``batch`` that ended at ``ends_s`` and record their
        inter-token gaps in ``itl``; returns the requests they finished. Every step of a fast
        policy is reported this way, never with ``on_step_done``."""


_FAST_VARIANTS: dict[type, type[StaticRuns] | type[FastContinuous]] = {
    StaticPolicy: StaticRuns,
    ContinuousPolicy: FastContinuous,
    ChunkedPolicy: FastChunked,
}


def fast_variant(policy: Policy) -> FastPolicy | None:
    """The fast variant of a fresh ``policy`` (same config and block manager), or None when its
    class has none or its config rules the fast path out."""
    variant = _FAST_VARIANTS.get(type(policy))
    if variant is None:
        return None
    if not variant.possible(policy.config):
        return None
    if policy.num_running or policy.num_waiting or policy.kv.num_used:
        raise ValueError("a fast variant replaces a policy before its first request")
    return variant(policy.config, policy.kv)


__all__ = ["FastPolicy", "fast_variant"]
