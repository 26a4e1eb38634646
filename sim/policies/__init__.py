"""Scheduling policies: the one implementation of scheduling that both executors run.

A policy is a small object with ``add``, ``schedule`` and ``on_step_done`` (see
:class:`sim.policies.base.Policy`). A new policy is one new module that decorates its class
with :func:`register`, plus one import line below.
"""

from __future__ import annotations

from sim.policies import chunked as _chunked  # noqa: F401
from sim.policies import continuous as _continuous  # noqa: F401

# Importing the modules registers their policies.
from sim.policies import static as _static  # noqa: F401
from sim.policies import vllm as _vllm  # noqa: F401
from sim.policies.base import POLICIES, Policy, SchedulerConfig, make_policy, register

__all__ = ["POLICIES", "Policy", "SchedulerConfig", "make_policy", "register"]
