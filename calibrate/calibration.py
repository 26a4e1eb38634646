"""A whole calibration: build the engine, time the grid, fit, and assemble the profile with
its provenance. Also the profile of step timings measured elsewhere (``calibrate fit``).

On CUDA the KV pool is what the live engine would get (``memory_utilization`` of the device
memory, minus the weights); on CPU it is just large enough for the grid's largest step, at most
:data:`CPU_KV_MEMORY_BYTES`, and ``kv_memory_bytes`` records that pool.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from calibrate.fit import fit, fit_step_model
from calibrate.grid import GridPoint, make_grid
from calibrate.profile import DEFAULT_HOST_LINK_BYTES_PER_S, Profile
from calibrate.samples import Sample
from sim.models import get_model

CPU_KV_MEMORY_BYTES = 2**30
"""The largest KV pool calibration allocates on CPU (1 GiB); the grid is bounded by it."""


class CalibrationError(RuntimeError):
    """Calibration could not produce a profile (e.g. stopped before any step was measured)."""


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    return {"device": f"cpu: {_cpu_name()} ({os.cpu_count()} logical cores)", "driver_version": None,
            "cuda_version": None, "torch_threads": torch.get_num_threads()}


def run_calibration(model: str, weights: str | Path | None = None, device: str = "auto", dtype: str | None = None,
                    block_size: int = 16, quick: bool = False, seed: int = 0, repeats: int = 3, warmup: int = 1,
                    passes: int = 2,
                    threads: int | None = None, memory_utilization: float = 0.9, folds: int = 5,
                    grid: Sequence[GridPoint] | None = None, progress: bool = True, live: bool = True,
                    live_plan=None) -> Profile:
    """Calibrate ``model`` on ``device``: time the grid (or ``grid`` when given), then (``live``)
    serve a synthetic workload on the live engine (:mod:`calibrate.live`, ``live_plan`` or
    :meth:`LivePlan.for_model`), fit to both, return the profile. A custom ``grid`` gets a live
    phase only with an explicit ``live_plan``.

    Ctrl-C during the grid keeps what was measured: the profile says ``interrupted``.
    """
    import torch

    from calibrate.live import LivePlan, live_kv_blocks, run_live_phase
    from calibrate.measure import SWAP_PROBE_BYTES, measure_grid, measure_host_link
    from runtime.build import build_runner, load_network, place
    from runtime.config import LiveConfig
    from runtime.kvcache import blocks_from_memory, kv_bytes_per_token
    from runtime.weights import dtype_name

    started = time.perf_counter()
    spec = get_model(model)
    engine_config = LiveConfig(model=model, weights=None if weights is None else str(weights), device=device,
                               dtype=dtype, threads=threads, seed=seed, block_size=block_size,
                               memory_utilization=memory_utilization)
    where = place(engine_config)
    dev, torch_dtype = where.device, where.dtype
    net = load_network(engine_config)
    kv_bytes = kv_bytes_per_token(spec, torch_dtype)
    block_bytes = kv_bytes * block_size
    if dev.type == "cuda":
        num_blocks = blocks_from_memory(spec, block_size, torch_dtype, dev, memory_utilization)
    else:
        num_blocks = CPU_KV_MEMORY_BYTES // block_bytes
    points = list(grid) if grid is not None else make_grid(spec.max_position, num_blocks, block_size, quick)
    if not points:
        raise CalibrationError(f"{model}: no grid point fits {num_blocks} KV blocks of {block_size} tokens")
    plan = None
    if live and (grid is None or live_plan is not None):
        plan = live_plan if live_plan is not None else LivePlan.for_model(spec.max_position, quick, seed)
    if dev.type != "cuda":
        num_blocks = max(p.kv_blocks(block_size) for p in points)
        if plan is not None:
            num_blocks = max(num_blocks, live_kv_blocks(plan, block_size))
    host_blocks = max(1, min(num_blocks, SWAP_PROBE_BYTES // block_bytes))
    runner = build_runner(dataclasses.replace(engine_config, kv_blocks=num_blocks, swap_blocks=host_blocks),
                          net=net)
    link = measure_host_link(runner)
    measured = measure_grid(runner, points, repeats=repeats, warmup=warmup, passes=passes, seed=seed,
                            progress=progress)
    if not measured.samples:
        raise CalibrationError("calibration interrupted before any step was measured; nothing to fit")
    samples = list(measured.samples)
    live_info = None
    if plan is not None and not measured.interrupted:
        try:
            live_samples, live_info = run_live_phase(runner, plan, fit_step_model(samples), progress=progress)
        except KeyboardInterrupt:
            live_samples, live_info = [], plan.to_dict() | {"runs": [], "interrupted": True}
        samples += live_samples
    result = fit(samples, folds=folds, seed=seed)
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
        errors={"folds": result.folds, "held_out": result.held_out, "in_sample": result.in_sample},
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
    )


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
