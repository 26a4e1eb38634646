"""What one engine step does: the scheduler's output and the executor's input.

A :class:`Batch` lists, per running request, how many new tokens the step computes and from
which offset. Its :class:`StepShape` is the summary a cost model prices. Swap traffic and the
padding of static batching are part of the step because the engine really spends time on them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from operator import add, attrgetter

from sim.request import Request


@dataclass(frozen=True)
class StepShape:
    """The features of one engine step that its cost depends on.

    ``prefill_context_tokens`` are the tokens already in the KV cache before this step's
    prefill chunks, summed over the prefilling sequences. ``prefill_attention_tokens`` is the
    attention work of the prefill chunks, sum over chunks of ``chunk * (context + (chunk + 1) / 2)``
    (query-key pairs under a causal mask); 0 means "estimate it from the sums".
    ``decode_context_tokens`` are the cached tokens each decoding sequence attends to, summed.

    A new step quantity is one field here (every field is a sum over the step's sequences,
    >= 0) plus its sum in :meth:`Batch.shape` (the padding's part included); adding shapes,
    validation, the columns of measured samples and their CSV and profile files follow from
    :data:`STEP_FIELDS`.
    """

    prefill_tokens: int = 0
    prefill_seqs: int = 0
    prefill_context_tokens: int = 0
    decode_seqs: int = 0
    decode_context_tokens: int = 0
    prefill_attention_tokens: float = 0.0
    swap_in_tokens: int = 0
    swap_out_tokens: int = 0
    """KV token slots copied host -> device / device -> host before the step (whole blocks)."""

    def __post_init__(self) -> None:
        # A shape is built every step: check the common case at once, every field in one call.
        # (Not through self.__dict__: reading it makes CPython build the instance's dict, and
        # every later attribute read of the shape slower.)
        if min(shape_values(self)) >= 0:
            return
        for name in STEP_FIELDS:
            if getattr(self, name) < 0:
                raise ValueError(f"StepShape.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def attention_work(self) -> float:
        """Prefill query-key pairs, exact when known, else estimated assuming equal chunks."""
        if self.prefill_attention_tokens > 0 or self.prefill_tokens == 0:
            return self.prefill_attention_tokens
        seqs = max(self.prefill_seqs, 1)
        chunk = self.prefill_tokens / seqs
        context = self.prefill_context_tokens / seqs
        return seqs * chunk * (context + (chunk + 1) / 2)

    @property
    def num_tokens(self) -> int:
        """Tokens the forward pass computes."""
        return self.prefill_tokens + self.decode_seqs

    def then_decode(self) -> StepShape:
        """The next step when every sequence of this one decodes once more: a decode one token
        further, a prefill chunk that completed its prompt now a decode (nothing swapped)."""
        return StepShape(
            decode_seqs=self.decode_seqs + self.prefill_seqs,
            decode_context_tokens=self.decode_context_tokens + self.decode_seqs + self.prefill_context_tokens
            + self.prefill_tokens,
        )

    def __add__(self, other: StepShape) -> StepShape:
        """Field-wise sum: the step that does the work of both (every field is a sum)."""
        return StepShape(*map(add, shape_values(self), shape_values(other)))


STEP_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StepShape))
"""The fields of :class:`StepShape`, in order."""
shape_values = attrgetter(*STEP_FIELDS)
"""``shape_values(shape)``: the tuple of a shape's field values, in :data:`STEP_FIELDS` order."""


def chunk_attention(chunk: int, context: int) -> float:
    """Query-key pairs of a causal prefill chunk of ``chunk`` tokens after ``context`` cached ones."""
    return chunk * (context + (chunk + 1) / 2)


class ScheduledSeq:
    """``num_new_tokens`` of ``request`` computed this step, starting at cache offset ``start``.

    ``is_decode`` (the step computes exactly the last sampled token) and ``samples_token``
    (the cache covers every token after the step, so the next output is sampled) are fixed
    when the step is scheduled, before the step changes the request's counts.
    """

    __slots__ = ("is_decode", "num_new_tokens", "request", "samples_token", "start")

    def __init__(self, request: Request, start: int, num_new_tokens: int) -> None:
        self.request = request
        self.start = start
        self.num_new_tokens = num_new_tokens
        total = request.prompt_tokens + request.num_generated
        self.samples_token = start + num_new_tokens == total
        self.is_decode = num_new_tokens == 1 and request.num_generated >= 1 and start == total - 1

    def __repr__(self) -> str:
        return f"ScheduledSeq(request={self.request.id}, start={self.start}, num_new_tokens={self.num_new_tokens})"


NO_PADDING = StepShape()


@dataclass
class Batch:
    """One engine step: the sequences it computes plus swap traffic and padding.

    Before the forward pass the executor copies ``swap_out_blocks`` (device, host) pairs to host
    memory, then ``swap_in_blocks`` (host, device) pairs back to the device. ``preempted``
    lists the requests this step's scheduling preempted (for the executor's bookkeeping; their
    blocks are already accounted). ``padding`` is work the engine does for no request (static
    batching pads every sequence to the longest prompt and keeps finished slots busy until the
    whole batch ends).

    On the simulator's fast path a policy may leave its running decodes out of ``seqs`` and
    give only their number and summed context, ``group_decodes`` and ``group_context_tokens``
    (see :mod:`sim.fastpath`); a batch for the live engine always
    lists every sequence.
    """

    seqs: list[ScheduledSeq]
    swap_out_blocks: list[tuple[int, int]] = field(default_factory=list)
    swap_in_blocks: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    padding: StepShape = NO_PADDING
    block_size: int = 16
    group_decodes: int = 0
    group_context_tokens: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.seqs) + self.group_decodes

    def shape(self) -> StepShape:
        """The step's sums: its sequences', the group's, the swaps' and the padding's (one
        shape built per step; the padding is added last, as ``own + padding`` would)."""
        prefill_tokens = prefill_seqs = prefill_context = 0
        decode_seqs, decode_context = self.group_decodes, self.group_context_tokens
        attention = 0.0
        for s in self.seqs:
            if s.is_decode:
                decode_seqs += 1
                decode_context += s.start
            else:
                prefill_tokens += s.num_new_tokens
                prefill_seqs += 1
                prefill_context += s.start
                attention += chunk_attention(s.num_new_tokens, s.start)
        pad = self.padding
        return StepShape(
            prefill_tokens=prefill_tokens + pad.prefill_tokens,
            prefill_seqs=prefill_seqs + pad.prefill_seqs,
            prefill_context_tokens=prefill_context + pad.prefill_context_tokens,
            decode_seqs=decode_seqs + pad.decode_seqs,
            decode_context_tokens=decode_context + pad.decode_context_tokens,
            prefill_attention_tokens=attention + pad.prefill_attention_tokens,
            swap_in_tokens=len(self.swap_in_blocks) * self.block_size + pad.swap_in_tokens,
            swap_out_tokens=len(self.swap_out_blocks) * self.block_size + pad.swap_out_tokens,
        )

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs) + self.group_decodes
