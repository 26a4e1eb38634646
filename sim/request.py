"""A request and its lifecycle, as the scheduler and the metrics see it.

Token accounting follows vLLM v1: a request holds ``num_tokens`` tokens (prompt plus the
outputs generated so far), of which ``num_computed_tokens`` are already in the KV cache. A
step computes some new tokens for it; when the cache then covers every token, the step also
samples the next output token. Whole-prompt prefill, chunked prefill, decode and the prefill
redone after a recompute preemption are all the same rule with different chunk sizes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"
    FINISHED = "finished"
    REJECTED = "rejected"
    FAILED = "failed"
    """An external engine's request that errored (``servesim bench``); ``reject_reason`` says why."""


@dataclass(eq=False, slots=True)
class Request:
    """One request. ``id`` is assigned by the workload that created it (never a global counter)."""

    id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    """Lower value is served first (as in vLLM's priority scheduling)."""

    status: Status = Status.WAITING
    num_computed_tokens: int = 0
    num_generated: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_s: float | None = None
    preemptions: int = 0
    reject_reason: str | None = None
    replica: int = 0
    token_times_s: list[float] | None = field(default=None, repr=False)
    """Every output token's time, kept only when the run asks for per-token times."""

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1:
            raise ValueError(f"request {self.id}: prompt_tokens must be >= 1, got {self.prompt_tokens}")
        if self.output_tokens < 1:
            raise ValueError(f"request {self.id}: output_tokens must be >= 1, got {self.output_tokens}")

    @property
    def num_tokens(self) -> int:
        """Prompt plus the output tokens generated so far."""
        return self.prompt_tokens + self.num_generated

    @property
    def max_tokens(self) -> int:
        """Tokens the KV cache must hold at the request's last step (the last output is never cached)."""
        return self.prompt_tokens + self.output_tokens - 1

    @property
    def remaining_prefill(self) -> int:
        """Tokens still to compute before the next output token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_done(self) -> bool:
        return self.num_generated >= self.output_tokens

    @property
    def in_decode(self) -> bool:
        """True when the next step computes exactly the last sampled token."""
        return self.num_generated >= 1 and self.remaining_prefill == 1

    def record_tokens(self, times_s: list[float]) -> None:
        """Count one sampled output token at each of ``times_s`` (ascending)."""
        if not times_s:
            return
        self.num_generated += len(times_s)
        if self.first_token_s is None:
            self.first_token_s = times_s[0]
        self.last_token_s = times_s[-1]
        if self.token_times_s is not None:
            self.token_times_s.extend(times_s)

    def record_token(self, now: float) -> None:
        """Count one sampled output token at time ``now``."""
        self.num_generated += 1
        if self.first_token_s is None:
            self.first_token_s = now
        self.last_token_s = now
        if self.token_times_s is not None:
            self.token_times_s.append(now)
