"""Sim-vs-live validation: the same requests, policy, seed and KV pool served twice, once by
the live engine (:mod:`runtime`) and once by the simulator priced with a calibrated profile,
then compared metric by metric and step by step.

Two errors are reported:

- per metric (TTFT, TPOT, ITL, E2EL: mean, median, p90, p99; throughputs; preemptions): the
  relative error ``(sim - live) / live`` of the whole run;
- per step: every step the live engine ran (its :class:`~sim.batch.StepShape` from the step
  log) priced by the profile, against the measured time. This isolates the cost model from
  the queueing that amplifies or hides its error in the run metrics.

The KV pool of both runs is one :class:`~sim.config.Capacity`, so the simulator's scheduler
sees exactly the blocks the live engine's pool has. Before and after the live run a few of the
profile's own grid steps are timed again (:func:`speed_check`): near saturation queueing
amplifies a cost error several times, so a device running slower than when it was calibrated
(another process, a throttled CPU) must be told apart from an error of the simulator.
"""

from __future__ import annotations

import dataclasses
import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sim.batch import StepShape
from sim.cluster import make_router
from sim.config import Capacity, make_block_manager
from sim.cost import CostModel
from sim.engine import SimResult, simulate
from sim.kv import blocks_for
from sim.metrics import summarize
from sim.policies import make_policy
from sim.policies.base import SchedulerConfig
from sim.request import Request
from sim.workload import TraceReplay

PERCENTILES = (90.0, 99.0)
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))
STATS = ("mean", "median", "p90", "p99")
SCALARS = (("request_throughput", "request throughput (req/s)"),
           ("output_throughput", "output throughput (tok/s)"),
           ("num_preemptions", "preemptions"))
SPEED_CHECK_POINTS = 8
"""Profile steps re-timed before and after a live run to see whether the device changed."""
DRIFT_WARN = 0.10
"""A device speed change (re-timed profile steps, or the live steps' median signed error)
beyond this is reported with the results."""
CPU_MAX_KV_BLOCKS = 2048
"""Default pool on CPU: room for every request at once, at most this many blocks (as ``servesim run``)."""


def metric_names() -> list[tuple[str, str]]:
    """(summary key, label) of every compared metric, in table order."""
    out = [(f"{stat}_{key}_ms", f"{stat} {label} (ms)") for key, label in LATENCIES for stat in STATS]
    return out + list(SCALARS)


def rel_error(live: float, sim: float) -> float | None:
    """(sim - live) / live; 0 when both are 0, None when only live is."""
    if live == 0:
        return 0.0 if sim == 0 else None
    return (sim - live) / live


# -- workload and capacity ---------------------------------------------------------------------


def default_kv_blocks(requests: Sequence[Request], block_size: int) -> int:
    """Room for every request at once (so a run at moderate load never preempts), capped."""
    need = sum(blocks_for(r.max_tokens, block_size) for r in requests)
    return max(1, min(CPU_MAX_KV_BLOCKS, need))


def native_rate(workload: TraceReplay) -> float:
    """Mean request rate of the slice as recorded, (n - 1) / span, in req/s."""
    requests = dataclasses.replace(workload, time_scale=1.0).requests()
    span_s = requests[-1].arrival_s - requests[0].arrival_s
    if len(requests) < 2 or span_s <= 0:
        raise ValueError("the trace slice needs at least 2 requests at different times to scale it to a load")
    return (len(requests) - 1) / span_s


def all_at_once(requests: Sequence[Request]) -> list[Request]:
    """Fresh copies of ``requests`` that all arrive at t = 0."""
    return [Request(r.id, 0.0, r.prompt_tokens, r.output_tokens, r.priority) for r in requests]


def saturation_throughput(requests: Sequence[Request], scheduler: SchedulerConfig, capacity: Capacity,
                          cost: CostModel) -> float:
    """Request throughput (req/s) the simulator predicts with every request queued at t = 0:
    the most this engine can serve of this mix."""
    result = simulate_run(all_at_once(requests), scheduler, capacity, cost)
    summary = summarize(result.requests, result.itl(), PERCENTILES)
    if summary["request_throughput"] <= 0:
        raise ValueError("no request completed in the saturation run (do they fit the KV pool?)")
    return float(summary["request_throughput"])


def time_scale_for_load(workload: TraceReplay, load: float, capacity_rps: float) -> float:
    """The time scale that makes the slice's mean arrival rate ``load`` x ``capacity_rps``."""
    if not load > 0:
        raise ValueError(f"load must be > 0 (a fraction of capacity), got {load}")
    return load * capacity_rps / native_rate(workload)


# -- the two executors ---------------------------------------------------------------------------


def simulate_run(requests: Sequence[Request], scheduler: SchedulerConfig, capacity: Capacity,
                 cost: CostModel) -> SimResult:
    """One replica in the simulator with exactly ``capacity`` (device and host blocks)."""
    return simulate(requests, lambda: make_policy(scheduler, make_block_manager(capacity)), cost,
                    make_router("round_robin"), 1)


@dataclass(frozen=True)
class LiveSetup:
    """How to build the live engine; ``threads`` None keeps torch's default."""

    model: str
    device: str = "auto"
    dtype: str | None = None
    threads: int | None = None
    seed: int = 0
    collect_garbage: bool = False
    """False: Python's cyclic GC is paused during the run (as serving engines freeze it), so
    its pauses do not land in random steps; the calibration grid does not see them either."""


@dataclass
class LiveRun:
    result: Any
    """The live engine's ``LiveResult`` (a SimResult with the step log)."""
    speed_before: float | None = None
    speed_after: float | None = None
    """:func:`speed_check` just before and just after the run (None: not checked)."""


def live_run(requests: Sequence[Request], scheduler: SchedulerConfig, capacity: Capacity, setup: LiveSetup,
             progress: bool = True, profile_samples: Sequence[Any] = ()) -> LiveRun:
    """Serve ``requests`` on the live engine, with a speed check before and after when the
    profile's samples are given."""
    import torch

    from runtime.engine import LiveEngine
    from runtime.runner import ModelRunner
    from runtime.weights import load_model, resolve_device, resolve_dtype
    from sim.kv import BlockManager
    from sim.models import get_model

    spec = get_model(setup.model)
    dev = resolve_device(setup.device)
    if setup.threads is not None:
        torch.set_num_threads(setup.threads)
    net = load_model(spec, None, resolve_dtype(setup.dtype, dev), dev, setup.seed)
    blocks = BlockManager(capacity.num_blocks, capacity.block_size, capacity.num_host_blocks)
    runner = ModelRunner(net, blocks, seed=setup.seed)
    engine = LiveEngine(runner, make_policy(scheduler, blocks), progress=progress)
    before = speed_check(runner, profile_samples, spec.max_position)
    paused = gc.isenabled() and not setup.collect_garbage
    if paused:
        gc.collect()
        gc.disable()
    try:
        result = engine.run(requests)
    finally:
        if paused:
            gc.enable()
    return LiveRun(result, before, speed_check(runner, profile_samples, spec.max_position))


def speed_check(runner: Any, samples: Sequence[Any], max_len: int, max_points: int = SPEED_CHECK_POINTS,
                max_step_ms: float = 20.0) -> float | None:
    """How much slower the device is now than when it was calibrated: a few of the profile's
    own grid steps (at most ``max_points``, each under ``max_step_ms``) timed again on
    ``runner`` the way calibration timed them; the median of now / then (1.1: 10% slower now).
    None when no sample can be rebuilt (a profile fitted from a CSV has mixed shapes)."""
    if not samples:
        return None
    from calibrate.measure import measure_grid

    then: dict[StepShape, tuple[Any, float]] = {}  # shape -> (grid point, step_ms at calibration)
    for s in sorted(samples, key=lambda s: s.step_ms):
        point = _grid_point(s)
        if (point is not None and s.step_ms <= max_step_ms and point.fits(max_len, runner.blocks.num_free,
                                                                          runner.blocks.block_size)):
            then[_shape_key(s)] = (point, s.step_ms)
    if not then:
        return None
    chosen = list(then.values())
    chosen = [chosen[i] for i in sorted({round(i) for i in np.linspace(0, len(chosen) - 1, max_points)})]
    measured = measure_grid(runner, [p for p, _ in chosen], repeats=3, warmup=2, progress=False).samples
    ratios = [m.step_ms / then[_shape_key(m)][1] for m in measured if _shape_key(m) in then]
    return float(np.median(ratios)) if ratios else None


def _shape_key(s: Any) -> StepShape:
    return s.shape


def _grid_point(s: Any) -> Any:
    """The calibration grid point of a prefill-only grid sample whose chunks are all alike,
    else None (a decode grid point spreads its contexts, which the sums do not give back)."""
    from calibrate.grid import GridPoint

    shape = s.shape
    if s.origin != "grid" or shape.decode_seqs or not shape.prefill_seqs:
        return None
    chunk, rest = divmod(shape.prefill_tokens, shape.prefill_seqs)
    context, rest2 = divmod(shape.prefill_context_tokens, shape.prefill_seqs)
    if rest or rest2 or chunk < 1:
        return None
    return GridPoint(prefill=((chunk, context),) * shape.prefill_seqs)


# -- comparison ----------------------------------------------------------------------------------


def step_kind(shape: StepShape) -> str:
    """``prefill``, ``decode`` or ``mixed`` (a prefill chunk among decodes)."""
    if shape.prefill_tokens and shape.decode_seqs:
        return "mixed"
    return "prefill" if shape.prefill_tokens else "decode"


BATCH_BANDS = ((1, 1), (2, 3), (4, 15), (16, 63), (64, None))
"""Decode batch sizes (sequences, inclusive; None: no upper end) whose steps are summarised
together: a light-load run is mostly single decodes, while the few large batches carry the time
(and the TPOT) of a loaded one, and a cost model can be right on one and off on the other."""


@dataclass(frozen=True)
class StepErrors:
    """Measured and predicted seconds of every live step, their kinds, decode batch sizes,
    and relative errors."""

    measured_s: np.ndarray
    predicted_s: np.ndarray
    kinds: tuple[str, ...] = ()
    decode_seqs: tuple[int, ...] = ()

    @property
    def rel_errors(self) -> np.ndarray:
        return (self.predicted_s - self.measured_s) / self.measured_s

    @property
    def total_rel_error(self) -> float:
        """(predicted - measured) / measured of the summed step time: the bias the run metrics
        feel, tails included (a median can be right while slow outliers add up)."""
        measured = float(self.measured_s.sum())
        return float(self.predicted_s.sum()) / measured - 1 if measured > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        """Median and p90 of |relative error|, the median signed error (the bias), and the
        same per kind of step."""
        out: dict[str, Any] = _error_stats(self.rel_errors)
        kinds = np.asarray(self.kinds)
        out["step_errors_by_kind"] = {
            kind: {"steps": int((kinds == kind).sum()), **_error_stats(self.rel_errors[kinds == kind])}
            for kind in ("prefill", "decode", "mixed") if (kinds == kind).any()}
        out["step_errors_by_batch"] = self.by_batch()
        return out

    def by_batch(self) -> dict[str, dict[str, float]]:
        """Per band of :data:`BATCH_BANDS` (steps with decodes, prefill chunks or not): steps,
        share of the measured time, median signed error and the summed time's error."""
        seqs = np.asarray(self.decode_seqs, dtype=np.int64)
        total = float(self.measured_s.sum())
        out: dict[str, dict[str, float]] = {}
        if seqs.size != self.measured_s.size or total <= 0:
            return out
        for lo, hi in BATCH_BANDS:
            sel = (seqs >= lo) & (seqs <= (hi if hi is not None else seqs.max()))
            if not sel.any():
                continue
            name = str(lo) if lo == hi else f"{lo}-{hi}" if hi is not None else f"{lo}+"
            measured = float(self.measured_s[sel].sum())
            out[name] = {"steps": int(sel.sum()), "time_share": measured / total,
                         "median_step_signed_error": float(np.median(self.rel_errors[sel])),
                         "total_rel_error": float(self.predicted_s[sel].sum()) / measured - 1}
        return out


def _error_stats(err: np.ndarray) -> dict[str, float]:
    if err.size == 0:
        return {"median_step_rel_error": 0.0, "p90_step_rel_error": 0.0, "median_step_signed_error": 0.0}
    return {"median_step_rel_error": float(np.median(np.abs(err))),
            "p90_step_rel_error": float(np.percentile(np.abs(err), 90)),
            "median_step_signed_error": float(np.median(err))}


def profile_live_error(samples: Sequence[Any], cost: CostModel) -> dict[str, float] | None:
    """The cost model's error on the profile's own live samples (the steps the live engine ran
    during calibration), in the units of :meth:`StepErrors.summary`; None without live samples.

    It is what a validation's per-step error compares with: no model fits noisy steps exactly,
    and the jitter of short steps is skewed (a few much slower), so even on its own samples
    the prediction is off by a few percent and a little above the median step. A validation
    whose median signed error matches it shows no drift; the difference is the device's."""
    live = [s for s in samples if getattr(s, "origin", None) == "live"]
    if not live:
        return None
    measured = np.array([s.step_ms / 1000 for s in live])
    predicted = np.array([cost.step_time(s.shape) for s in live])
    return {"steps": len(live), **_error_stats((predicted - measured) / measured)}


def step_errors(step_log: Sequence[tuple[StepShape, float]], cost: CostModel) -> StepErrors:
    """Price every logged live step ``(shape, measured_s)`` with ``cost``."""
    measured = np.array([s for _, s in step_log], dtype=np.float64)
    predicted = np.array([cost.step_time(shape) for shape, _ in step_log], dtype=np.float64)
    return StepErrors(measured, predicted, tuple(step_kind(shape) for shape, _ in step_log),
                      tuple(shape.decode_seqs for shape, _ in step_log))


def compare_summaries(live: dict[str, Any], sim: dict[str, Any],
                      live_runs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """``{metric: {"live", "sim", "rel_error"}}`` for every metric of :func:`metric_names`; with
    several live runs (``live`` their mean), each entry also lists them under ``live_runs``."""
    out: dict[str, Any] = {}
    for key, _ in metric_names():
        out[key] = {"live": float(live[key]), "sim": float(sim[key]), "rel_error": rel_error(live[key], sim[key])}
        if len(live_runs) > 1:
            out[key]["live_runs"] = [float(run[key]) for run in live_runs]
    return out


def mean_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The mean of several runs' summaries, key by key (numbers only; other values from the first)."""
    out = dict(summaries[0])
    for key in list(out):
        values = [s.get(key) for s in summaries]
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in values):
            out[key] = float(np.mean(values))  # type: ignore[arg-type]
    return out


def format_spread(spread: float | None) -> str:
    return "-" if spread is None else f"{spread * 100:.1f}%"


def live_spread(v: Validation, key: str) -> float | None:
    """(max - min) / mean of a metric over the live runs: how far the live engine is from
    reproducing itself; None with a single run."""
    runs = v.metrics[key].get("live_runs")
    if not runs or len(runs) < 2:
        return None
    mean = float(np.mean(runs))
    return (max(runs) - min(runs)) / mean if mean else 0.0


@dataclass
class Validation:
    """Both runs, their summaries, and the errors."""

    live: Any
    """The live engine's ``LiveResult`` (the first run's when it was repeated)."""
    sim: SimResult
    live_summary: dict[str, Any]
    """The live summary (the mean over the runs when repeated)."""
    sim_summary: dict[str, Any]
    metrics: dict[str, Any]
    steps: StepErrors
    speed_before: float | None = None
    speed_after: float | None = None
    profile_live: dict[str, float] | None = None
    """:func:`profile_live_error`: the same model on the profile's own live steps."""
    live_runs: list[Any] = field(default_factory=list)
    """Every live run's ``LiveResult`` (``live`` is the first)."""

    def to_json(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """``validation.json``: each metric's live, sim and rel_error, then the step errors."""
        out: dict[str, Any] = dict(self.metrics)
        out.update(self.steps.summary())
        out["num_steps"] = int(self.steps.measured_s.size)
        out["total_step_time_rel_error"] = self.steps.total_rel_error
        out["completed"] = {"live": self.live_summary["completed"], "sim": self.sim_summary["completed"]}
        out["device_speed_vs_profile"] = {"before": self.speed_before, "after": self.speed_after}
        out["profile_live_step_error"] = self.profile_live
        out["live_runs"] = max(1, len(self.live_runs))
        return out | (extra or {})

    @property
    def drift(self) -> float:
        """The live steps' median signed error beyond the profile's own on its live samples
        (the device running slower, negative, or faster than when it was calibrated)."""
        own = self.profile_live["median_step_signed_error"] if self.profile_live else 0.0
        return self.steps.summary()["median_step_signed_error"] - own


def validate(requests: Sequence[Request], scheduler: SchedulerConfig, capacity: Capacity, cost: CostModel,
             setup: LiveSetup, progress: bool = True, profile_samples: Sequence[Any] = (),
             repeats: int = 1) -> Validation:
    """Run ``requests`` live ``repeats`` times and simulated once (each on fresh copies) and
    compare the simulation with the live runs' mean (a live engine on a shared or throttled
    device does not reproduce itself; the simulator is deterministic); the per-step error pools
    every live step. With the profile's samples, also check the device's speed against them
    before the first run and after the last."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    runs = [live_run([dataclasses.replace(r) for r in requests], scheduler, capacity, setup, progress,
                     profile_samples if k in (0, repeats - 1) else ()) for k in range(repeats)]
    results = [run.result for run in runs]
    sim = simulate_run([dataclasses.replace(r) for r in requests], scheduler, capacity, cost)
    summaries = [summarize(r.requests, r.itl(), PERCENTILES, None, r.num_preemptions) for r in results]
    live_summary = mean_summary(summaries)
    sim_summary = summarize(sim.requests, sim.itl(), PERCENTILES, None, sim.num_preemptions)
    steps = step_errors([step for r in results for step in r.step_log], cost)
    metrics = compare_summaries(live_summary, sim_summary, summaries)
    return Validation(results[0], sim, live_summary, sim_summary, metrics, steps, runs[0].speed_before,
                      runs[-1].speed_after, profile_live_error(profile_samples, cost), results)


def _fmt(value: float | None, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if pct:
        return f"{value * 100:+.1f}%"
    return f"{value:.2f}" if abs(value) < 1e4 else f"{value:.4g}"


def format_table(v: Validation) -> str:
    """The metrics table (live, sim, relative error; with repeated live runs ``live`` is their
    mean and ``live spread`` their (max - min) / mean) and the step error lines."""
    label_w = max(len(label) for _, label in metric_names())
    repeated = len(v.live_runs) > 1
    head = f"{'metric':<{label_w}}  {'live':>10}  {'sim':>10}  {'error':>8}"
    rule = f"{'-' * label_w}  {'-' * 10}  {'-' * 10}  {'-' * 8}"
    lines = [head + (f"  {'live spread':>11}" if repeated else ""), rule + (f"  {'-' * 11}" if repeated else "")]
    for key, label in metric_names():
        m = v.metrics[key]
        row = f"{label:<{label_w}}  {_fmt(m['live']):>10}  {_fmt(m['sim']):>10}  {_fmt(m['rel_error'], pct=True):>8}"
        if repeated:
            row += f"  {format_spread(live_spread(v, key)):>11}"
        lines.append(row)
    if repeated:
        lines.append(f"live: the mean of {len(v.live_runs)} runs of the same requests; live spread: how far apart "
                     "they were ((max - min) / mean)")
    s = v.steps.summary()
    lines.append(f"per-step error over {v.steps.measured_s.size} live steps: median |err| "
                 f"{s['median_step_rel_error'] * 100:.1f}%, p90 |err| {s['p90_step_rel_error'] * 100:.1f}%, "
                 f"median signed {s['median_step_signed_error'] * 100:+.1f}%; summed step time "
                 f"{v.steps.total_rel_error * 100:+.1f}%")
    kinds = ", ".join(f"{kind} {k['median_step_signed_error'] * 100:+.1f}% (n={k['steps']})"
                      for kind, k in s["step_errors_by_kind"].items())
    lines.append(f"  median signed per kind: {kinds}")
    bands = ", ".join(f"{name} {b['total_rel_error'] * 100:+.1f}% ({b['time_share'] * 100:.0f}% of time)"
                      for name, b in s["step_errors_by_batch"].items())
    if bands:
        lines.append(f"  summed step time by decode batch size: {bands}")
    if v.profile_live is not None:
        own = v.profile_live
        lines.append(f"  the profile on its own {own['steps']} calibration live steps: median |err| "
                     f"{own['median_step_rel_error'] * 100:.1f}%, median signed "
                     f"{own['median_step_signed_error'] * 100:+.1f}% (no model fits noisy steps "
                     "exactly; beyond this, the run's error is the device's drift)")
    if v.speed_before is not None or v.speed_after is not None:
        lines.append("device speed vs calibration (profile steps re-timed): "
                     f"{format_speed(v.speed_before)} before the live run, {format_speed(v.speed_after)} after")
    warning = drift_warning(v)
    if warning:
        lines.append(f"warning: {warning}")
    return "\n".join(lines)


def format_speed(ratio: float | None) -> str:
    if ratio is None:
        return "-"
    return f"{abs(ratio - 1) * 100:.0f}% {'slower' if ratio >= 1 else 'faster'}"


def drift_warning(v: Validation) -> str | None:
    """A warning when the device ran at another speed than when it was calibrated: the
    profile's steps re-timed, or the live steps uniformly off. The run metrics then measure
    that change, not the simulator (at 70% load a 5% slower device adds ~15% to latency)."""
    speeds = [x - 1 for x in (v.speed_before, v.speed_after) if x is not None]
    bias = v.drift
    if max([abs(x) for x in speeds] + [0.0]) <= DRIFT_WARN and abs(bias) <= DRIFT_WARN:
        return None
    return ("the device did not run at its calibrated speed (re-timed profile steps: "
            f"{format_speed(v.speed_before)} before, {format_speed(v.speed_after)} after; live steps "
            f"{abs(bias) * 100:.0f}% {'slower' if bias < 0 else 'faster'} than predicted at the median, beyond "
            "the profile's own offset on its calibration live steps). Other "
            "processes or a throttled CPU? Recalibrate just before validating, on an otherwise idle machine.")
