"""A whole calibration: build the engine, time the grid, fit, and assemble the profile with
its provenance. Also the profile of step timings measured elsewhere (``calibrate fit``).

On CUDA the KV pool is what the live engine would get (``memory_utilization`` of the device
memory, minus the weights); on CPU it is just large enough for the grid's largest step, at most
:data:`CPU_KV_MEMORY_BYTES`, and ``kv_memory_bytes`` records that pool.
"""

from __future__ import annotations

import dataclasses
import datetime
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from calibrate.drift import DRIFT_THRESHOLD, Checkpoint, DriftMonitor, control_points, describe
from calibrate.errors import CalibrationError, DriftError
from calibrate.fit import fit, fit_step_model, padding_pairs
from calibrate.grid import GridPoint, make_grid
from calibrate.host import cpu_device
from calibrate.profile import DEFAULT_HOST_LINK_BYTES_PER_S, Profile
from calibrate.samples import Sample
from sim.models import get_model

if TYPE_CHECKING:
    from runtime.runner import ModelRunner

__all__ = ["CalibrationError", "DriftError", "FitCheck", "check_fit", "poor_fit_problems", "profile_from_samples",
           "run_calibration"]

CPU_KV_MEMORY_BYTES = 2**30
"""The largest KV pool calibration allocates on CPU (1 GiB); the grid is bounded by it."""
FIT_LIMITS_PCT = {"median_ape_pct": 20.0, "p90_ape_pct": 60.0}
"""Held-out error (on the live engine's steps when there are any, else on all) beyond which a
profile is poor. A quick calibration on a busy machine gave 27% and 113% (issue 15), and that
must fail. The shipped tiny CPU profile has a live median of 4.4% and p90 of 14%, but on this
project's 2-core VM with nothing else running, good quick tiny calibrations gave medians of
11-16% and p90s of 27-49% (five runs on 2026-12-01, both at this commit and at the one before
the check existed), so limits of 10% / 30% refused most of them: 20% / 60% passes those and
still refuses the bad one."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def device_provenance(device) -> dict:
    """Device name, driver and CUDA versions (None on CPU), torch threads."""
    import torch

    if device.type == "cuda":
        return {"device": torch.cuda.get_device_name(device), "driver_version": _nvidia_driver(),
                "cuda_version": torch.version.cuda, "torch_threads": None}
    return {"device": cpu_device(), "driver_version": None,
            "cuda_version": None, "torch_threads": torch.get_num_threads()}


@dataclass(frozen=True)
class FitCheck:
    """A profile's held-out error against :data:`FIT_LIMITS_PCT` (recorded as ``fit_check``)."""

    row: str | None
    """The error-table row checked: ``live``, ``all``, or None (too few samples to hold out)."""
    values_pct: dict[str, float]
    limits_pct: dict[str, float]
    accepted_poor_fit: bool = False

    @property
    def passed(self) -> bool:
        return all(self.values_pct[k] <= limit for k, limit in self.limits_pct.items() if k in self.values_pct)

    def to_dict(self) -> dict:
        return {"row": self.row, "values_pct": self.values_pct, "limits_pct": self.limits_pct,
                "passed": self.passed, "accepted_poor_fit": self.accepted_poor_fit}


def check_fit(errors: dict, limits_pct: dict[str, float] | None = None) -> FitCheck:
    """The held-out error of ``errors`` (a profile's) on its live steps, else on all steps."""
    limits = dict(FIT_LIMITS_PCT if limits_pct is None else limits_pct)
    held = errors.get("held_out") or {}
    row = "live" if "live" in held else "all" if "all" in held else None
    values = {k: float(held[row][k]) for k in limits} if row is not None else {}
    return FitCheck(row, values, limits)


def poor_fit_problems(check: dict) -> list[str]:
    """``held-out live median_ape_pct 27.0% > 10%`` for each limit a profile's ``fit_check`` exceeds."""
    return [f"held-out {check['row']} {k} {check['values_pct'][k]:.1f}% > {limit:g}%"
            for k, limit in check["limits_pct"].items() if check["values_pct"].get(k, 0.0) > limit]


def run_calibration(model: str, weights: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                    block_size: int = 16, quick: bool = False, seed: int = 0, repeats: int = 3, warmup: int = 1,
                    passes: int = 2,
                    threads: int | None = None, memory_utilization: float = 0.9, folds: int = 5,
                    grid: Sequence[GridPoint] | None = None, progress: bool = True, live: bool = True,
                    live_plan=None, max_model_len: int | None = None, drift_threshold: float | None = DRIFT_THRESHOLD,
                    controls: Callable[[ModelRunner, Sequence[GridPoint]], Sequence[float]] | None = None,
                    ) -> Profile:
    """Calibrate ``model`` on ``device``: time the grid (or ``grid`` when given), then (``live``)
    serve a synthetic workload on the live engine (:mod:`calibrate.live`, ``live_plan`` or
    :meth:`LivePlan.for_model`), fit to both, return the profile. A custom ``grid`` gets a live
    phase only with an explicit ``live_plan``. ``max_model_len`` bounds the sequences of the
    grid and of the live phase below the model's positions (what the profile will be used
    for: a CPU cannot serve the small model's 4096 positions in minutes).

    Control steps (:mod:`calibrate.drift`) are re-timed at the start, middle and end of the
    grid and of the live phase unless ``drift_threshold`` is None; a segment that drifted
    beyond it is measured again once, then :class:`~calibrate.drift.DriftError` is raised.
    ``controls`` times them (default :func:`calibrate.measure.time_controls`). The profile's
    ``fit_check`` compares its held-out error with :data:`FIT_LIMITS_PCT`; refusing a poor
    profile is the caller's decision.

    Ctrl-C during the grid keeps what was measured: the profile says ``interrupted``.
    """
    import torch

    from calibrate.live import LivePlan, live_kv_blocks, run_live_phase
    from calibrate.measure import SWAP_PROBE_BYTES, measure_grid, measure_host_link, time_controls
    from runtime.build import build_runner, load_network, place
    from runtime.config import LiveConfig
    from runtime.kvcache import blocks_from_memory, kv_bytes_per_token
    from runtime.weights import dtype_name

    started = time.perf_counter()
    spec = get_model(model)
    if max_model_len is not None and not 2 <= max_model_len <= spec.max_position:
        raise ValueError(f"max_model_len must be in 2..{spec.max_position} ({model}'s positions), got {max_model_len}")
    engine_config = LiveConfig(model=model, weights=None if weights is None else str(weights), device=device,
                               dtype=dtype, threads=threads, seed=seed, block_size=block_size,
                               memory_utilization=memory_utilization)
    where = place(engine_config)
    dev, torch_dtype = where.device, where.dtype
    net = load_network(engine_config)
    pad_rows = padding_pairs(net.pad_rows)
    kv_bytes = kv_bytes_per_token(spec, torch_dtype)
    block_bytes = kv_bytes * block_size
    if dev.type == "cuda":
        num_blocks = blocks_from_memory(spec, block_size, torch_dtype, dev, memory_utilization)
    else:
        num_blocks = CPU_KV_MEMORY_BYTES // block_bytes
    max_len = spec.max_position if max_model_len is None else max_model_len
    points = list(grid) if grid is not None else make_grid(max_len, num_blocks, block_size, quick)
    if not points:
        raise CalibrationError(f"{model}: no grid point fits {num_blocks} KV blocks of {block_size} tokens")
    plan = None
    if live and (grid is None or live_plan is not None):
        plan = live_plan if live_plan is not None else LivePlan.for_model(max_len, quick, seed)
    if dev.type != "cuda":
        num_blocks = max(p.kv_blocks(block_size) for p in points)
        if plan is not None:
            num_blocks = max(num_blocks, live_kv_blocks(plan, block_size))
    host_blocks = max(1, min(num_blocks, SWAP_PROBE_BYTES // block_bytes))
    runner = build_runner(dataclasses.replace(engine_config, kv_blocks=num_blocks, swap_blocks=host_blocks),
                          net=net)
    link = measure_host_link(runner)
    monitor = None
    if drift_threshold is not None:
        monitor = _drift_monitor(runner, control_points(points), drift_threshold, controls or time_controls)
        monitor.warm_up()
        monitor.check("grid start")
    grid_started = time.perf_counter()
    measured = measure_grid(runner, points, repeats=repeats, warmup=warmup, passes=passes, seed=seed,
                            progress=progress, drift=monitor)
    grid_s = time.perf_counter() - grid_started
    if not measured.samples:
        raise CalibrationError("calibration interrupted before any step was measured; nothing to fit")
    samples = list(measured.samples)
    live_info = None
    if plan is not None and not measured.interrupted:
        try:
            grid_fit = fit_step_model(samples, pad_rows=pad_rows)
            live_samples, live_info = run_live_phase(runner, plan, grid_fit, progress=progress, drift=monitor)
        except KeyboardInterrupt:
            live_samples, live_info = [], plan.to_dict() | {"runs": [], "interrupted": True}
        samples += live_samples
    result = fit(samples, folds=folds, seed=seed, pad_rows=pad_rows)
    errors = {"folds": result.folds, "held_out": result.held_out, "in_sample": result.in_sample}
    return Profile(
        model_fit=result.model,
        samples=samples,
        live=live_info,
        **device_provenance(dev),
        dtype=dtype_name(torch_dtype),
        block_size=block_size,
        host_link_bytes_per_s=link if link is not None else DEFAULT_HOST_LINK_BYTES_PER_S,
        host_link_source="measured" if link is not None else "default",
        created_utc=utc_now(),
        source="measured",
        errors=errors,
        torch_version=torch.__version__,
        transformers_version=_version("transformers"),
        model=model,
        weights=None if weights is None else str(weights),
        kv_bytes_per_token=kv_bytes,
        kv_memory_bytes=num_blocks * block_bytes,
        num_kv_blocks=num_blocks,
        grid="custom" if grid is not None else "quick" if quick else "full",
        seed=seed,
        calibration_s=time.perf_counter() - started,
        interrupted=measured.interrupted,
        out_of_memory_steps=len(measured.out_of_memory),
        drift=None if monitor is None else monitor.to_dict() | {"control_s": monitor.control_s},
        fit_check=check_fit(errors).to_dict(),
        phases_s={"grid": grid_s, "live": live_info.get("wall_s") if live_info else None},
        max_model_len=max_model_len,
    )


class _TimedMonitor(DriftMonitor):
    """A :class:`DriftMonitor` that also adds up the wall time its control steps took."""

    control_s: float = 0.0

    def warm_up(self) -> None:
        t0 = time.perf_counter()
        try:
            super().warm_up()
        finally:
            self.control_s += time.perf_counter() - t0

    def check(self, name: str) -> Checkpoint:
        t0 = time.perf_counter()
        try:
            return super().check(name)
        finally:
            self.control_s += time.perf_counter() - t0


def _drift_monitor(runner: ModelRunner, points: list[GridPoint], threshold: float,
                   timer: Callable[[ModelRunner, Sequence[GridPoint]], Sequence[float]]) -> _TimedMonitor:
    return _TimedMonitor(lambda: timer(runner, points), [describe(p) for p in points], threshold, points=points)


def profile_from_samples(samples: Sequence[Sample], source: str, model: str | None = None,
                         dtype: str = "bfloat16", block_size: int = 16, device: str = "unknown",
                         kv_memory_bytes: int | None = None, host_link_bytes_per_s: float | None = None,
                         folds: int = 5, seed: int = 0) -> Profile:
    """A profile fitted to step timings measured elsewhere. Without ``model`` the KV fields are
    null (the profile then cannot price swaps); without ``kv_memory_bytes`` the pool is unknown."""
    result = fit(samples, folds=folds, seed=seed)
    kv_bytes = get_model(model).kv_bytes_per_token(dtype) if model is not None else None
    num_blocks = (kv_memory_bytes // (kv_bytes * block_size)
                  if kv_bytes is not None and kv_memory_bytes is not None else None)
    return Profile(
        model_fit=result.model,
        samples=list(samples),
        device=device,
        dtype=dtype,
        block_size=block_size,
        host_link_bytes_per_s=host_link_bytes_per_s or DEFAULT_HOST_LINK_BYTES_PER_S,
        host_link_source="given" if host_link_bytes_per_s else "default",
        created_utc=utc_now(),
        source=f"csv:{source}",
        errors={"folds": result.folds, "held_out": result.held_out, "in_sample": result.in_sample},
        model=model,
        kv_bytes_per_token=kv_bytes,
        kv_memory_bytes=kv_memory_bytes,
        num_kv_blocks=num_blocks,
        seed=seed,
    )
