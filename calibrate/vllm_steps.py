"""vLLM's engine steps as servesim step shapes: what each step scheduled, read from its
scheduler's output, and how long the engine core spent on it.

This module imports no vLLM at module level (servesim's own environment has none); the
recorder is used inside a python that has vLLM (:mod:`calibrate.vllm_inproc`). It relies on
these vLLM v1 internals (0.32.0), checked by :func:`require_api`, which names what is missing:

- ``vllm.v1.engine.core.EngineCore``: ``scheduler`` and ``step_fn``, the bound step the
  in-process client (``InprocClient.get_output``) calls once per engine step: schedule,
  execute the model, update from its output;
- ``vllm.v1.core.sched.scheduler.Scheduler``: ``schedule()``, returning a ``SchedulerOutput``,
  and ``requests`` (request id -> ``Request`` with ``num_prompt_tokens``);
- ``vllm.v1.core.sched.output.SchedulerOutput``: ``num_scheduled_tokens`` (request id ->
  tokens this step), ``scheduled_new_reqs`` (``NewRequestData``: ``req_id``,
  ``num_computed_tokens``), ``scheduled_cached_reqs`` (``CachedRequestData``: ``req_ids``,
  ``num_computed_tokens``, parallel lists) and ``scheduled_spec_decode_tokens``.

``num_computed_tokens`` in a scheduler output is the count before the step (vLLM advances it
in ``Scheduler._update_after_schedule``, after building the output), so it is the context the
step's tokens attend to, prefix-cache hits included.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sim.batch import StepShape, chunk_attention

API = (
    "vllm.v1.engine.core.EngineCore.step_fn",
    "vllm.v1.engine.core.EngineCore.scheduler",
    "vllm.v1.core.sched.scheduler.Scheduler.schedule",
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
    missing = _missing(core, ("step_fn", "scheduler"), "EngineCore")
    scheduler = getattr(core, "scheduler", None)
    if scheduler is not None:
        missing += _missing(scheduler, ("schedule", "requests"), "Scheduler")
    if missing:
        raise VllmApiError(f"vLLM {version} lacks {', '.join(missing)}: servesim's in-process calibration reads "
                           "each engine step from these internals of vLLM v1 (written against 0.32.0); use "
                           "`servesim calibrate --engine vllm --url URL` (black-box, over HTTP) instead")
    if getattr(core, "batch_queue", None) is not None:
        raise VllmApiError("the engine runs several batches in flight (a batch queue, e.g. pipeline parallelism): "
                           "its steps overlap, so one step's time cannot be taken; calibrate with pipeline "
                           "parallelism 1")


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
    """Wraps one ``EngineCore``'s ``scheduler.schedule`` and ``step_fn`` (on the instance, not
    the class) so that every step that scheduled tokens is kept as a :class:`RecordedStep`.

    The step's time is the wall time of ``step_fn``: scheduling, the forward pass and sampling,
    and the scheduler's update, which is what the engine core's busy loop spends per step. The
    shape is built after the step from what ``schedule`` returned, so the recorder's own work
    is not timed; only the prompt lengths are read inside (finished requests are gone after).
    ``phase`` labels the steps that follow; ``phase = None`` stops keeping them (warm-up).
    """

    def __init__(self, core: Any, version: str = "?", clock: Callable[[], float] = time.perf_counter) -> None:
        require_api(core, version)
        self.steps: list[RecordedStep] = []
        self.phase: str | None = None
        self._clock = clock
        self._scheduled: tuple[Any, dict[str, int]] | None = None
        scheduler = core.scheduler
        schedule, step_fn = scheduler.schedule, core.step_fn

        def recording_schedule(*args: Any, **kwargs: Any) -> Any:
            output = schedule(*args, **kwargs)
            requests = scheduler.requests
            self._scheduled = (output, {r: requests[r].num_prompt_tokens for r in output.num_scheduled_tokens})
            return output

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            self._scheduled = None
            t0 = clock()
            result = step_fn(*args, **kwargs)
            t1 = clock()
            if self._scheduled is not None and self.phase is not None:
                output, prompts = self._scheduled
                shape = step_shape(output, prompts)
                if shape.num_tokens:
                    self.steps.append(RecordedStep(shape, t1 - t0, self.phase, t1))
            return result

        scheduler.schedule = recording_schedule
        core.step_fn = timed_step
