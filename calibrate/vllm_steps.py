"""vLLM's engine steps as servesim step shapes: what each step scheduled, read from its
scheduler's output, and how long the engine core spent on it.

This module imports no vLLM at module level (servesim's own environment has none); the
recorder is used inside a python that has vLLM (:mod:`calibrate.vllm_inproc`). It relies on
these vLLM v1 internals (0.32.0), checked by :func:`require_api`, which names what is missing:

- ``vllm.v1.engine.core.EngineCore.scheduler``, whose ``step_fn`` (``step``, or
  ``step_with_batch_queue`` with async scheduling or pipeline parallelism) calls, per engine
  step, ``schedule`` and later ``update_from_output`` with that step's output;
- ``vllm.v1.core.sched.scheduler.Scheduler``: ``schedule()``, returning a ``SchedulerOutput``,
  ``update_from_output(scheduler_output, model_runner_output)``, and ``requests`` (request
  id -> ``Request`` with ``num_prompt_tokens``);
- ``vllm.v1.core.sched.output.SchedulerOutput``: ``num_scheduled_tokens`` (request id ->
  tokens this step), ``scheduled_new_reqs`` (``NewRequestData``: ``req_id``,
  ``num_computed_tokens``), ``scheduled_cached_reqs`` (``CachedRequestData``: ``req_ids``,
  ``num_computed_tokens``, parallel lists) and ``scheduled_spec_decode_tokens``.

``num_computed_tokens`` in a scheduler output is the count before the step (vLLM advances it
in ``Scheduler._update_after_schedule``, after building the output), so it is the context the
step's tokens attend to, prefix-cache hits included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sim.batch import StepShape, chunk_attention

API = (
    "vllm.v1.engine.core.EngineCore.scheduler",
    "vllm.v1.core.sched.scheduler.Scheduler.schedule",
    "vllm.v1.core.sched.scheduler.Scheduler.update_from_output(scheduler_output, ...)",
    "vllm.v1.core.sched.scheduler.Scheduler.requests[id].num_prompt_tokens",
    "SchedulerOutput.num_scheduled_tokens",
    "SchedulerOutput.scheduled_new_reqs[].req_id, .num_computed_tokens",
    "SchedulerOutput.scheduled_cached_reqs.req_ids, .num_computed_tokens",
    "SchedulerOutput.scheduled_spec_decode_tokens",
)
"""The vLLM internals relied on (recorded in a profile's provenance)."""
_OUTPUT_FIELDS = ("num_scheduled_tokens", "scheduled_new_reqs", "scheduled_cached_reqs")


class VllmApiError(RuntimeError):
    """This vLLM lacks an internal API the step recorder relies on; the message names it."""


def _missing(obj: object, names: tuple[str, ...], where: str) -> list[str]:
    return [f"{where}.{n}" for n in names if not hasattr(obj, n)]


def require_api(core: object, version: str = "?") -> None:
    """Raise :class:`VllmApiError` unless ``core`` (an ``EngineCore``) has what :data:`API` lists."""
    missing = _missing(core, ("scheduler",), "EngineCore")
    scheduler = getattr(core, "scheduler", None)
    if scheduler is not None:
        missing += _missing(scheduler, ("schedule", "update_from_output", "requests"), "Scheduler")
    if missing:
        raise VllmApiError(f"vLLM {version} lacks {', '.join(missing)}: servesim's in-process calibration reads "
                           "each engine step from these internals of vLLM v1 (written against 0.32.0); use "
                           "`servesim calibrate --engine vllm --url URL` (black-box, over HTTP) instead")


def _check_output(output: object) -> None:
    missing = _missing(output, _OUTPUT_FIELDS, "SchedulerOutput")
    cached = getattr(output, "scheduled_cached_reqs", None)
    if cached is not None:
        missing += _missing(cached, ("req_ids", "num_computed_tokens"), "CachedRequestData")
    if missing:
        raise VllmApiError(f"this vLLM's scheduler output lacks {', '.join(missing)} (servesim reads vLLM 0.32.0's)")


def step_shape(output: Any, prompt_tokens: Mapping[str, int]) -> StepShape:
    """The :class:`StepShape` of one vLLM ``SchedulerOutput``; ``prompt_tokens`` maps each
    scheduled request id to its prompt length.

    A request is a decode when the step computes one token at or past the end of its prompt
    (the last sampled token: its context is the prompt plus every output but that one);
    anything else is a prefill chunk of ``num_scheduled_tokens`` after ``num_computed_tokens``
    of context, a resumed (preempted) request's recomputation included, as servesim's own
    ``ScheduledSeq`` counts it.
    """
    _check_output(output)
    if getattr(output, "scheduled_spec_decode_tokens", None):
        raise ValueError("the step scheduled speculative tokens: servesim's step model has no speculative "
                         "decoding; calibrate without a speculative config")
    context: dict[str, int] = {r.req_id: r.num_computed_tokens for r in output.scheduled_new_reqs}
    cached = output.scheduled_cached_reqs
    context.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    prefill_tokens = prefill_seqs = prefill_context = decode_seqs = decode_context = 0
    attention = 0.0
    for req_id, num_tokens in output.num_scheduled_tokens.items():
        if req_id not in context or req_id not in prompt_tokens:
            raise ValueError(f"scheduler output: request {req_id!r} is scheduled but its computed tokens or "
                             "prompt length are unknown")
        start = context[req_id]
        if num_tokens == 1 and start >= prompt_tokens[req_id]:
            decode_seqs += 1
            decode_context += start
        elif num_tokens > 0:
            prefill_tokens += num_tokens
            prefill_seqs += 1
            prefill_context += start
            attention += chunk_attention(num_tokens, start)
    return StepShape(prefill_tokens=prefill_tokens, prefill_seqs=prefill_seqs, prefill_context_tokens=prefill_context,
                     decode_seqs=decode_seqs, decode_context_tokens=decode_context,
                     prefill_attention_tokens=attention)


@dataclass(frozen=True)
class RecordedStep:
    """One engine step: its shape, wall seconds, the phase label it ran under, and when it ended."""

    shape: StepShape
    step_s: float
    phase: str
    end_s: float


class StepRecorder:
    """Wraps one ``EngineCore``'s ``scheduler.schedule`` and ``scheduler.update_from_output``
    (on the instance, not the class) so that every step that scheduled tokens is kept as a
    :class:`RecordedStep`.

    A step starts when ``schedule`` is called for it, or when the previous step ended if that
    was later (with async scheduling the next batch is scheduled while one runs), and ends
    when ``update_from_output`` has processed its output: scheduling, the forward pass and
    sampling, and the scheduler's update, which is what the engine core's loop spends per step.
    Without a batch queue (vLLM's CPU backend) that is exactly one ``step_fn`` call. The shape
    is built after the step from what ``schedule`` returned, so the recorder's own work is not
    timed; only the prompt lengths are read at schedule time (finished requests are gone after).
    ``phase`` labels the steps that follow; ``phase = None`` stops keeping them (warm-up).
    """

    def __init__(self, core: Any, version: str = "?", clock: Callable[[], float] = time.perf_counter) -> None:
        require_api(core, version)
        self.steps: list[RecordedStep] = []
        self.phase: str | None = None
        self._pending: dict[int, tuple[float, dict[str, int], str | None]] = {}
        self._last_end = -math.inf
        scheduler = core.scheduler
        schedule, update = scheduler.schedule, scheduler.update_from_output

        def recording_schedule(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            output = schedule(*args, **kwargs)
            requests = scheduler.requests
            self._pending[id(output)] = (t0, {r: requests[r].num_prompt_tokens for r in output.num_scheduled_tokens},
                                         self.phase)
            return output

        def timed_update(scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
            result = update(scheduler_output, *args, **kwargs)
            t1 = clock()
            started = self._pending.pop(id(scheduler_output), None)
            if started is not None:
                t0, prompts, phase = started
                begin = max(t0, self._last_end)
                self._last_end = t1
                if phase is not None:
                    shape = step_shape(scheduler_output, prompts)
                    if shape.num_tokens:
                        self.steps.append(RecordedStep(shape, t1 - begin, phase, t1))
            return result

        scheduler.schedule = recording_schedule
        scheduler.update_from_output = timed_update
