"""Timing grid points through the real model runner, and the host link that swap crosses.

Each grid point becomes fake requests whose blocks are allocated in the runner's own
:class:`~sim.kv.BlockManager`, so the step reads and writes the real KV pool. The timed region
is the whole engine step as the live engine spends it: building the :class:`~sim.batch.Batch`,
``ModelRunner.execute`` (input preparation, forward pass, sampling), with the device
synchronised before and after. Warm-up runs are excluded; the mean of the repeats is kept
with the min and max (the mean, not the median: the simulator must reproduce the time a
stream of such steps takes, slow ones included).
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from calibrate.drift import DriftMonitor
from calibrate.grid import GridPoint
from calibrate.samples import Sample
from runtime.runner import ModelRunner
from sim.batch import Batch, ScheduledSeq
from sim.request import Request

UNBOUNDED_OUTPUT = 1 << 30
"""Fake requests never finish, so the runner keeps their token ids between repeats."""
MAX_REPEATS_PER_VISIT = 50
MAX_VISIT_MS = 1000.0
"""A visit stops repeating a step once its timed runs took this long (one run at least): the
small model's steps of half a second to two seconds on a CPU took 128 of a quick grid's 183 s
at 2 s a visit (2026-12-02, 2 threads, idle 2-core VM); at 1 s each still gets two runs per
visit, four in all, and the fit pools 57 points."""
WARM_STEP_MS = 100.0
"""A point whose timed runs averaged this long is not warmed up again on later visits: a step
of a tenth of a second streams far more than the caches a previous step could have left cold,
and its first visit already paid the one-time costs of a new shape. The small model's grid
spent 45 s on warm-ups, 20 s of them on such repeat visits."""
CONTROL_MIN_RUNS = 5
CONTROL_MIN_MS = 200.0
CONTROL_MAX_RUNS = 200
"""A control step is run (after one warm-up) at least CONTROL_MIN_RUNS times and for
CONTROL_MIN_MS, at most CONTROL_MAX_RUNS times, and its median kept: a tiny model's
millisecond step needs hundreds of runs before its median holds still to a few percent."""
CONTROL_ID_BASE = 1 << 40
"""Control steps' fake requests are numbered from here, clear of the live phase's requests."""
SWAP_PROBE_BYTES = 128 * 2**20
"""KV bytes copied each way to time the host link: enough to reach its sustained rate."""


@dataclass
class Measurement:
    samples: list[Sample]
    interrupted: bool
    """True when Ctrl-C stopped the grid; ``samples`` holds the points finished before it."""
    wall_s: float
    out_of_memory: list[GridPoint] = field(default_factory=list)
    """Points left out because the device ran out of memory running them."""


class _FakeRequests:
    """The fake requests of grid points, shared between points with the same sequences: the
    runner keeps each request's token ids, so sharing bounds that memory by the largest point
    rather than the sum of the grid."""

    def __init__(self, id_base: int = 0) -> None:
        self.requests: dict[tuple[int, int, int], Request] = {}
        self.id_base = id_base

    def _get(self, chunk: int, context: int, j: int) -> Request:
        key = (chunk, context, j)
        r = self.requests.get(key)
        if r is None:
            if chunk == 0:  # a decode at ``context``: one output sampled already, its token computed now
                r = Request(id=self.id_base + len(self.requests), arrival_s=0.0, prompt_tokens=context,
                            output_tokens=UNBOUNDED_OUTPUT, num_computed_tokens=context, num_generated=1)
            else:
                r = Request(id=self.id_base + len(self.requests), arrival_s=0.0, prompt_tokens=context + chunk,
                            output_tokens=UNBOUNDED_OUTPUT, num_computed_tokens=context)
            self.requests[key] = r
        return r

    def seqs(self, point: GridPoint) -> list[tuple[Request, int, int]]:
        """(request, start, num_new_tokens) per sequence of ``point``."""
        out = []
        seen: dict[tuple[int, int], int] = {}
        for chunk, context in [(0, c) for c in point.decode] + list(point.prefill):
            j = seen[chunk, context] = seen.get((chunk, context), -1) + 1
            out.append((self._get(chunk, context, j), context, max(chunk, 1)))
        return out


def time_step(runner: ModelRunner, seqs: list[tuple[Request, int, int]]) -> tuple[float, Batch]:
    """Milliseconds of one engine step over ``seqs``, whose blocks are allocated for the step only."""
    blocks = runner.blocks
    for r, start, n in seqs:
        blocks.allocate(r, start + n)
    try:
        runner.synchronize()
        t0 = time.perf_counter()
        batch = Batch([ScheduledSeq(r, start, n) for r, start, n in seqs], block_size=blocks.block_size)
        runner.execute(batch)
        runner.synchronize()
        step_ms = (time.perf_counter() - t0) * 1000
    finally:
        for r, _, _ in seqs:
            blocks.free(r)
    return step_ms, batch


def _sample(batch: Batch, times_ms: list[float]) -> Sample:
    return Sample(batch.shape(), step_ms=statistics.fmean(times_ms), step_ms_min=min(times_ms),
                  step_ms_max=max(times_ms), repeats=len(times_ms), origin="grid")


def measure_grid(runner: ModelRunner, grid: Sequence[GridPoint], repeats: int = 3, warmup: int = 1,
                 passes: int = 2, min_visit_ms: float = 20.0, seed: int = 0, progress: bool = True,
                 max_visit_ms: float = MAX_VISIT_MS, drift: DriftMonitor | None = None) -> Measurement:
    """Time every point at least ``repeats x passes`` times and keep the mean, min and max.

    Each visit of a point runs it ``warmup`` times untimed (on later visits only when its mean
    so far is under :data:`WARM_STEP_MS`), then times it ``repeats`` times or for
    ``min_visit_ms``, whichever is more (at most :data:`MAX_REPEATS_PER_VISIT` runs), but
    stops once ``max_visit_ms`` has been timed: a sub-millisecond step jitters by tens of
    percent, and many runs of it cost little; a step of seconds jitters little. Back
    to back: a serving engine runs similar steps in a row, and timing a small step right after
    a large one measures the caches the large one evicted (on CPU that doubles a tiny model's
    decode step), not the step. The grid is visited ``passes`` times, each in an order
    shuffled with ``seed``, so that a burst of interference from the machine hits one visit of
    a point rather than all its repeats, and drift spreads over the grid. Ctrl-C stops early
    and keeps every point timed at least once.

    With ``drift`` (its reference checkpoint taken), the visits are two segments, the first
    and second half, each checked against the control steps (:meth:`DriftMonitor.segment`):
    a segment that drifted is timed again once, and :class:`~calibrate.drift.DriftError`
    propagates when that does not help.
    """
    if repeats < 1 or warmup < 0 or passes < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, passes >= 1; got {repeats}, {warmup}, {passes}")
    rng = np.random.default_rng(seed)
    fakes = _FakeRequests()
    seqs = [fakes.seqs(p) for p in grid]
    visits = [int(i) for _ in range(passes) for i in rng.permutation(len(grid))]
    times_ms: list[list[float]] = [[] for _ in grid]
    batches: list[Batch | None] = [None] * len(grid)
    out_of_memory: set[int] = set()
    attempt: list[list[float]] = []  # the current segment's times per point, kept when the segment is
    started: list[list[int]] = []  # segments begun (a second start is a re-measurement)

    def run_visits(part: list[int]) -> list[list[float]]:
        nonlocal attempt
        if any(p is part for p in started):  # a segment measured again
            bar.total += len(part)
        started.append(part)
        attempt = [[] for _ in grid]
        for i in part:
            if i not in out_of_memory:
                try:
                    seen = times_ms[i] + attempt[i]
                    if not seen or statistics.fmean(seen) < WARM_STEP_MS:
                        for _ in range(warmup):
                            time_step(runner, seqs[i])
                    visit_ms: list[float] = []
                    while len(visit_ms) < 1 or (
                            sum(visit_ms) < max_visit_ms
                            and (len(visit_ms) < repeats
                                 or (sum(visit_ms) < min_visit_ms and len(visit_ms) < MAX_REPEATS_PER_VISIT))):
                        step_ms, batches[i] = time_step(runner, seqs[i])
                        visit_ms.append(step_ms)
                        attempt[i].append(step_ms)
                except torch.OutOfMemoryError:
                    # The pool took the memory the engine would give it; a step whose
                    # activations do not fit the rest cannot run live either: left out.
                    out_of_memory.add(i)
                    if runner.device.type == "cuda":
                        torch.cuda.empty_cache()
            bar.update()
        return attempt

    def keep(part_ms: list[list[float]]) -> None:
        nonlocal attempt
        for i, ms in enumerate(part_ms):
            times_ms[i] += ms
        attempt = []

    # Python's cyclic GC is paused, as serving engines (and experiments.validation's live runs)
    # do: its pauses would land in random repeats.
    gc_enabled = gc.isenabled()
    gc.disable()
    t0 = time.perf_counter()
    interrupted = False
    bar = tqdm(total=len(visits), unit="step", desc="calibrating", disable=not progress, leave=False)
    try:
        if drift is None:
            keep(run_visits(visits))
        else:
            half = len(visits) // 2
            for name, end, part in (("the grid's first half", "grid middle", visits[:half]),
                                    ("the grid's second half", "grid end", visits[half:])):
                keep(drift.segment(name, end, functools.partial(run_visits, part)))
    except KeyboardInterrupt:
        interrupted = True
        keep(attempt)  # what the interrupted segment measured so far
    finally:
        bar.close()
        if gc_enabled:
            gc.enable()
        for r in fakes.requests.values():
            runner.release(r.id)
    samples = [_sample(b, t) for i, (b, t) in enumerate(zip(batches, times_ms, strict=True))
               if t and b is not None and i not in out_of_memory]
    return Measurement(samples, interrupted, time.perf_counter() - t0, [grid[i] for i in sorted(out_of_memory)])


def time_controls(runner: ModelRunner, points: Sequence[GridPoint]) -> list[float]:
    """Each control point's median step time (ms) now: one warm-up, then at least
    :data:`CONTROL_MIN_RUNS` runs and :data:`CONTROL_MIN_MS`, back to back. The pool must have
    room for the largest point; its fake requests are released after."""
    fakes = _FakeRequests(CONTROL_ID_BASE)
    out = []
    try:
        for p in points:
            seqs = fakes.seqs(p)
            time_step(runner, seqs)
            runs_ms: list[float] = []
            while len(runs_ms) < CONTROL_MIN_RUNS or (sum(runs_ms) < CONTROL_MIN_MS
                                                      and len(runs_ms) < CONTROL_MAX_RUNS):
                runs_ms.append(time_step(runner, seqs)[0])
            out.append(statistics.median(runs_ms))
    finally:
        for r in fakes.requests.values():
            runner.release(r.id)
    return out


def measure_host_link(runner: ModelRunner, repeats: int = 3) -> float | None:
    """Bytes per second of swap copies through the runner's KV cache (device -> host, then
    back), or None when the runner has no host pool."""
    cache = runner.cache
    blocks = min(cache.num_host_blocks, cache.num_blocks)
    if blocks < 1:
        return None
    block_bytes = cache.kv_bytes_per_token * cache.block_size
    blocks = min(blocks, max(1, SWAP_PROBE_BYTES // block_bytes))
    pairs = [(i, i) for i in range(blocks)]
    times_s = []
    for _ in range(repeats + 1):  # the first round warms up
        runner.synchronize()
        t0 = time.perf_counter()
        cache.swap_out(pairs)
        cache.swap_in(pairs)
        runner.synchronize()
        times_s.append(time.perf_counter() - t0)
    return 2 * blocks * block_bytes / statistics.median(times_s[1:])
