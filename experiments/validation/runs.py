"""The two executors of a validation on the same requests and KV pool: the simulator with exactly
the live pool's blocks, and the live engine built by :func:`runtime.build.build_live_engine`.

Before and after the live run the calibration's control steps (else a few of the profile's own
grid steps) are timed again (:func:`speed_check`): near saturation queueing amplifies a cost
error several times, so a device running slower than when it was calibrated (another process, a
throttled CPU) must be told apart from an error of the simulator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from sim.batch import StepShape
from sim.cluster import make_router
from sim.cost import CostModel
from sim.engine import SimResult, simulate
from sim.kv import BlockManager
from sim.policies import make_policy
from sim.request import Request

if TYPE_CHECKING:
    from runtime.config import LiveConfig
    from runtime.engine import LiveResult
    from runtime.runner import ModelRunner

SPEED_CHECK_POINTS = 8
"""Profile steps re-timed before and after a live run to see whether the device changed."""
SPEED_CHECK_MS = 20.0
"""Steps up to this long are re-timed (tiny's are a few ms); a model whose cheapest steps are
longer (small's take 0.1 s and more on a CPU) gets its cheapest few instead, up to
:data:`SPEED_CHECK_BUDGET_MS` of calibrated time per pass (at least two)."""
SPEED_CHECK_BUDGET_MS = 500.0


def sim_pool(live: LiveConfig) -> BlockManager:
    """A fresh block manager shaped as the live config's pool, which must be given in full
    (``kv_blocks``)."""
    if live.kv_blocks is None:
        raise ValueError("a validation needs the KV pool's size (kv_blocks) to give both executors the same pool")
    return BlockManager(live.kv_blocks, live.block_size, live.host_blocks(live.kv_blocks))


def simulate_run(requests: Sequence[Request], live: LiveConfig, cost: CostModel) -> SimResult:
    """One replica in the simulator with the live config's scheduler and exactly its pool."""
    return simulate(requests, lambda: make_policy(live.scheduler, sim_pool(live)), cost, make_router("round_robin"), 1)


@dataclass(frozen=True)
class SpeedReference:
    """What a speed check times again: the calibration's control steps (timed at each of its
    checkpoints, ``then_ms`` their mean) or, for a profile without them, its grid samples."""

    points: tuple[Any, ...] = ()
    """The control steps' :class:`~calibrate.grid.GridPoint`; empty: use ``samples``."""
    then_ms: tuple[float, ...] = ()
    samples: tuple[Any, ...] = ()

    @property
    def source(self) -> str:
        return "the calibration's control steps" if self.points else "the profile's grid steps"


def speed_reference(profile: Any) -> SpeedReference | None:
    """The control steps of ``profile``'s drift record when it has them (each one's reference
    time the mean over the checkpoints, which a steady calibration keeps within 1%, 2026-12-03),
    else its samples; None for neither."""
    from calibrate.grid import GridPoint

    drift = profile.drift or {}
    checkpoints = [c["control_ms"] for c in drift.get("checkpoints") or []]
    if drift.get("control_points") and checkpoints:
        points = tuple(GridPoint.from_dict(p) for p in drift["control_points"])
        return SpeedReference(points, tuple(float(np.mean(ms)) for ms in zip(*checkpoints, strict=True)))
    return SpeedReference(samples=tuple(profile.samples)) if profile.samples else None


@dataclass(frozen=True)
class LiveRun:
    """One live run and the device's speed around it."""

    result: LiveResult
    speed_before: float | None = None
    speed_after: float | None = None
    """:func:`speed_check` just before and just after the run (None: not checked)."""


def live_run(requests: Sequence[Request], live: LiveConfig, progress: bool = True,
             speed: SpeedReference | None = None) -> LiveRun:
    """Serve ``requests`` on the live engine of ``live`` (its pool as given there), with a speed
    check before and after when a reference is given."""
    from runtime.build import build_live_engine, paused_gc
    from sim.models import get_model

    engine = build_live_engine(live, requests, progress=progress)
    max_len = get_model(live.model).max_position
    before = speed_check(engine.runner, speed, max_len)
    with paused_gc(not live.collect_garbage):
        result = engine.run(requests)
    return LiveRun(result, before, speed_check(engine.runner, speed, max_len))


def speed_check(runner: ModelRunner, reference: SpeedReference | None, max_len: int) -> float | None:
    """How much slower the device is now than when it was calibrated (1.1: 10% slower now).
    The control steps are timed as calibration timed them at its checkpoints
    (:func:`calibrate.measure.time_controls`), and the speed is the mean of now / then, as a
    checkpoint's drift is; without them, :func:`grid_speed_check`. None when nothing can be
    timed again (no reference, or its steps do not fit the pool)."""
    if reference is None:
        return None
    if not reference.points:
        return grid_speed_check(runner, reference.samples, max_len)
    from calibrate.measure import time_controls

    pairs = [(p, then) for p, then in zip(reference.points, reference.then_ms, strict=True)
             if p.fits(max_len, runner.blocks.num_free, runner.blocks.block_size)]
    if not pairs:
        return None
    now = time_controls(runner, [p for p, _ in pairs])
    return float(np.mean([x / then for x, (_, then) in zip(now, pairs, strict=True)]))


def grid_speed_check(runner: ModelRunner, samples: Sequence[Any], max_len: int,
                     max_points: int = SPEED_CHECK_POINTS, max_step_ms: float = SPEED_CHECK_MS,
                     budget_ms: float = SPEED_CHECK_BUDGET_MS) -> float | None:
    """The speed check of a profile without control steps: a few of its own grid steps timed
    again on ``runner`` the way calibration timed them; the median of now / then. Half the
    points are lone prefills and half decode batches (:func:`cheapest_points` of each within
    half of ``max_points`` and ``budget_ms``). A single grid sample carries its own timing
    noise (the small model's, 2026-12-03: 1-in-10 of them 10-30% off the fit), which is why the
    control steps, timed at every checkpoint, are preferred. None when no sample can be
    rebuilt (a profile fitted from a CSV has mixed shapes)."""
    if not samples:
        return None
    from calibrate.measure import measure_grid

    then: dict[StepShape, tuple[Any, float]] = {}  # shape -> (grid point, step_ms at calibration)
    for s in sorted(samples, key=lambda s: s.step_ms):
        point = _grid_point(s)
        if point is not None and point.fits(max_len, runner.blocks.num_free, runner.blocks.block_size):
            then[_shape_key(s)] = (point, s.step_ms)
    if not then:
        return None
    chosen = []
    for kind in ("prefill", "decode"):
        of_kind = [c for c in then.values() if c[0].kind == kind]
        chosen += cheapest_points(of_kind, max(1, max_points // 2), max_step_ms, budget_ms / 2) if of_kind else []
    measured = measure_grid(runner, [p for p, _ in chosen], repeats=3, warmup=2, progress=False).samples
    ratios = [m.step_ms / then[_shape_key(m)][1] for m in measured if _shape_key(m) in then]
    return float(np.median(ratios)) if ratios else None


def cheapest_points(candidates: Sequence[tuple[Any, float]], max_points: int, max_step_ms: float,
                    budget_ms: float) -> list[tuple[Any, float]]:
    """From ``(point, step_ms)`` sorted by time: those under ``max_step_ms`` spread over their
    range (at most ``max_points``); when none is, the cheapest ones whose summed time stays
    within ``budget_ms`` (at least two, at most ``max_points``)."""
    short = [c for c in candidates if c[1] <= max_step_ms]
    if short:
        return [short[i] for i in sorted({round(i) for i in np.linspace(0, len(short) - 1, max_points)})]
    chosen: list[tuple[Any, float]] = []
    total_ms = 0.0
    for c in candidates[:max_points]:
        if len(chosen) >= 2 and total_ms + c[1] > budget_ms:
            break
        chosen.append(c)
        total_ms += c[1]
    return chosen


def _shape_key(s: Any) -> StepShape:
    return s.shape


def _grid_point(s: Any) -> Any:
    """A grid point of a grid sample's shape when the sample is a lone kind, else None: a prefill
    whose chunks are all alike, or a decode batch (:func:`_decode_contexts`)."""
    from calibrate.grid import GridPoint

    shape = s.shape
    if s.origin != "grid" or bool(shape.decode_seqs) == bool(shape.prefill_seqs):
        return None
    if shape.decode_seqs:
        if shape.decode_context_tokens < shape.decode_seqs:
            return None
        return GridPoint(decode=_decode_contexts(shape.decode_seqs, shape.decode_context_tokens))
    chunk, rest = divmod(shape.prefill_tokens, shape.prefill_seqs)
    context, rest2 = divmod(shape.prefill_context_tokens, shape.prefill_seqs)
    if rest or rest2 or chunk < 1:
        return None
    return GridPoint(prefill=((chunk, context),) * shape.prefill_seqs)


def _decode_contexts(batch: int, total: int) -> tuple[int, ...]:
    """``batch`` decode contexts summing to ``total``: the calibration grid's
    :func:`calibrate.grid.spread_contexts` ``(c, batch)`` when some ``c`` gives that sum (the last
    context is ``c`` and none falls as ``c`` grows, so the sum grows strictly with ``c``: a
    bisection finds it), else ``total`` split evenly (a grid given by hand). Either is a step of
    the sample's shape, which is all the profile prices."""
    from calibrate.grid import spread_contexts

    lo, hi = 1, total
    while lo < hi:  # the least c whose spread sums to total or more
        mid = (lo + hi) // 2
        if sum(spread_contexts(mid, batch)) >= total:
            hi = mid
        else:
            lo = mid + 1
    if sum(spread_contexts(lo, batch)) == total:
        return spread_contexts(lo, batch)
    share, extra = divmod(total, batch)
    return tuple(share + (j < extra) for j in range(batch))
