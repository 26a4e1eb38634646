"""Chunked prefill with a per-step token budget (Sarathi-Serve, vLLM v1).

Running decodes are scheduled first, then the unfinished prefills, then new requests; each
prefill is cut into chunks that fit what is left of the budget, so a long prompt no longer
stalls every decode behind it for a whole step.
"""

from __future__ import annotations

from dataclasses import replace

from sim.kv import BlockManager
from sim.policies.base import SchedulerConfig, register
from sim.policies.continuous import ContinuousPolicy

DEFAULT_TOKEN_BUDGET = 512


@register("chunked")
class ChunkedPolicy(ContinuousPolicy):
    chunked_prefill = True

    def __init__(self, config: SchedulerConfig, kv: BlockManager) -> None:
        if config.token_budget is None:
            config = replace(config, token_budget=DEFAULT_TOKEN_BUDGET)
        super().__init__(config, kv)
