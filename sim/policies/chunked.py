"""Chunked prefill with a per-step token budget (Sarathi-Serve, vLLM v1).

Running decodes are scheduled first, then the unfinished prefills, then new requests; each
prefill is cut into chunks that fit what is left of the budget, so a long prompt no longer
stalls every decode behind it for a whole step.
"""

from __future__ import annotations

from sim.policies.base import register
from sim.policies.continuous import ContinuousPolicy

DEFAULT_TOKEN_BUDGET = 512


@register("chunked", summary="chunked prefill under a per-step token budget, decodes first (Sarathi-Serve, vLLM v1)",
          default_token_budget=DEFAULT_TOKEN_BUDGET)
class ChunkedPolicy(ContinuousPolicy):
    chunked_prefill = True
