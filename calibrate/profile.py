"""The calibration profile (a versioned JSON file) and the cost model it defines.

A profile holds where it was measured, the fitted :class:`~calibrate.fit.StepModel`, its error,
and the raw samples it was fitted on (so it can be refitted or audited). Every top-level field
is required; those marked nullable may be ``null``. ``schema_version`` changes whenever a field
is added, removed or changes meaning (version 2 added the ``decode_batch_context`` feature to
``fit``; version 3 added ``tp``; version 2 files are still read, as tp 1). Schema version 3::

    schema_version        3
    created_utc           ISO 8601 date, UTC
    source                "measured" (servesim calibrate) | "csv:PATH" (servesim calibrate fit)
    tp                    tensor-parallel GPUs the steps ran on (their cost is the whole step on all of them)
    device                e.g. "NVIDIA H100 80GB HBM3", "cpu: AMD EPYC (2 logical cores)"
    driver_version        NVIDIA driver (nullable: CPU, CSV fits)
    cuda_version          torch's CUDA (nullable)
    torch_version, transformers_version    (nullable for CSV fits)
    torch_threads         CPU threads torch used (nullable: CUDA, CSV fits)
    model                 preset name (nullable for CSV fits without --model)
    weights               checkpoint path; null = random weights
    dtype                 float32 | bfloat16 | float16
    block_size            KV block, tokens
    kv_bytes_per_token    K and V of every layer (nullable: then swaps cannot be priced)
    kv_memory_bytes       memory of the KV pool (CUDA: what the engine gets; CPU: the pool
                          calibration allocated) (nullable for CSV fits without --kv-memory-gib)
    num_kv_blocks         kv_memory_bytes / (kv_bytes_per_token x block_size) (nullable)
    host_link_bytes_per_s swap copy rate; host_link_source says measured | given | default
    grid                  quick | full | custom (nullable for CSV fits)
    seed                  weights, token ids, measuring order, cross-validation split
    calibration_s         wall time of the calibration (nullable)
    interrupted           true when Ctrl-C cut the grid short
    out_of_memory_steps   grid points left out because the device ran out of memory
    fit                   {"features": [...], "coefficients_ms": {feature: ms per unit},
                           "knee_tokens": int|null, "knee_decode_context_tokens": int|null,
                           "knee_cache_tokens": int|null}; a feature of calibrate.fit.FEATURES
                          the file does not list (added since) reads with coefficient 0, and
                          the knee of a hinge feature it does not list as null, so it prices
                          as it did
    errors                {"folds": k, "held_out": TABLE|null, "in_sample": TABLE}, TABLE =
                          {prefill|decode|mixed|all: {"n", "median_ape_pct", "p90_ape_pct"}}
    live                  (optional, nullable) the live phase's synthetic workload and runs
                          (calibrate.live); samples with origin "live" came from it
    drift                 (optional, nullable) the control steps (calibrate.drift): threshold_pct,
                          control_steps, checkpoints [{name, control_ms, drift_pct}],
                          max_drift_pct, remeasured (segments timed twice), control_s, and
                          (optional) control_points [{prefill: [[chunk, context]], decode: [ctx]}]
                          (what a validation times again to see the device's speed)
    fit_check             (optional, nullable) held-out error against the limits
                          (calibrate.calibration.FIT_LIMITS_PCT): row, values_pct, limits_pct,
                          passed, accepted_poor_fit (true: written although it failed)
    phases_s              (optional, nullable) wall seconds of the phases: {"grid", "live"}
    max_model_len         (optional, nullable) longest sequence calibrated, when below the
                          model's positions (calibrate --max-model-len)
    request_overhead_s    (optional, default 0) seconds from a request's arrival to its reaching
                          the scheduler, the same for every request (a served engine's frontend,
                          measured by calibrate --url); the simulator delays each admission by it
    intake_gap_s          (optional, default 0) seconds the served frontend takes to let one request
                          in: a burst reaches the scheduler whole once its last request is in, its first
                          alone on an idle engine (sim.cost.intake_gap_s; measured by calibrate --url
                          with bursts). A profile from before it, with
                          "wakes_alone": true, reads as a gap of 1 microsecond (the first of a burst
                          steps alone, the others join the next step)
    engine                (optional, nullable) the external engine the steps were measured on
                          (calibrate --engine vllm): engine, vllm_version, mode (in-process |
                          http), settings {max_num_batched_tokens, max_num_seqs, block_size,
                          num_gpu_blocks, enable_prefix_caching, ...}, model_config, api relied on
    samples               {"columns": [calibrate.samples.CSV_COLUMNS, in any order],
                           "rows": [[one value per column], ...]}: one row per measured
                          step (tens of thousands with a live phase, hence rows, not objects),
                          each with its origin: grid | live | csv
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from calibrate.fit import FEATURES, KNEES, StepModel
from calibrate.samples import CSV_COLUMNS, Sample, SamplesError
from sim.batch import StepShape

SCHEMA_VERSION = 3
OLDER_SCHEMA_VERSIONS = (2,)
"""Versions still read: version 2 lacks only ``tp`` (its steps ran on one GPU)."""
DEFAULT_HOST_LINK_BYTES_PER_S = 25e9
LEGACY_WAKE_GAP_S = 1e-6
"""The intake gap of a profile from before the gap was measured that says ``"wakes_alone": true``:
small enough that a burst reaches the scheduler within one step, as the rule it replaces had it."""
"""Used when the host link was not measured: pinned copies over PCIe Gen4 x16 sustain ~25 GB/s."""


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the field."""


@dataclass
class Profile:
    """A fitted cost model with its provenance. Field units are in the names."""

    model_fit: StepModel
    samples: list[Sample]
    device: str
    dtype: str
    block_size: int
    host_link_bytes_per_s: float
    host_link_source: str
    """``measured`` (swap copies timed during calibration), ``given`` (by the user) or ``default``
    (:data:`DEFAULT_HOST_LINK_BYTES_PER_S`)."""
    created_utc: str
    source: str
    """``measured`` by ``calibrate``, or ``csv:PATH`` for a profile fitted from step timings."""
    errors: dict = field(default_factory=dict)
    """``{"folds": k, "held_out": table | None, "in_sample": table}``; a table maps prefill,
    decode, mixed and all to ``{"n", "median_ape_pct", "p90_ape_pct"}``."""
    driver_version: str | None = None
    cuda_version: str | None = None
    torch_version: str | None = None
    transformers_version: str | None = None
    torch_threads: int | None = None
    """torch's CPU threads during calibration (None on CUDA or when unknown)."""
    model: str | None = None
    weights: str | None = None
    kv_bytes_per_token: int | None = None
    kv_memory_bytes: int | None = None
    """Device memory the KV pool had (on CPU: the pool the runner allocated for calibration)."""
    num_kv_blocks: int | None = None
    grid: str | None = None
    seed: int | None = None
    calibration_s: float | None = None
    interrupted: bool = False
    """True when calibration was stopped early (Ctrl-C) and the fit used the samples so far."""
    out_of_memory_steps: int = 0
    """Grid points left out because running them ran the device out of memory."""
    live: dict | None = None
    """The live phase (:mod:`calibrate.live`): its workload and runs; None when skipped."""
    tp: int = 1
    """Tensor-parallel GPUs the measured engine ran each step on."""
    drift: dict | None = None
    """The control steps' checkpoints (:meth:`calibrate.drift.DriftMonitor.to_dict`); None: not taken."""
    fit_check: dict | None = None
    """Held-out error against the limits (:class:`calibrate.calibration.FitCheck`); None: not checked."""
    phases_s: dict | None = None
    """Wall seconds of the grid and the live phase."""
    max_model_len: int | None = None
    """The longest sequence calibrated when below the model's positions; None: all of them."""
    engine: dict | None = None
    """The external engine measured (:mod:`calibrate.vllm_calibration`); None: servesim's runtime."""
    request_overhead_s: float = 0.0
    """A served engine's per-request cost before its scheduler (:func:`sim.cost.request_overhead_s`);
    0 for an engine stepped in process."""
    intake_gap_s: float = 0.0
    """A served engine's frontend time to let one request in (:func:`sim.cost.intake_gap_s`)."""

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "created_utc": self.created_utc,
            "source": self.source,
            "device": self.device,
            "tp": self.tp,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
            "torch_version": self.torch_version,
            "transformers_version": self.transformers_version,
            "torch_threads": self.torch_threads,
            "model": self.model,
            "weights": self.weights,
            "dtype": self.dtype,
            "block_size": self.block_size,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "kv_memory_bytes": self.kv_memory_bytes,
            "num_kv_blocks": self.num_kv_blocks,
            "host_link_bytes_per_s": self.host_link_bytes_per_s,
            "host_link_source": self.host_link_source,
            "grid": self.grid,
            "seed": self.seed,
            "calibration_s": self.calibration_s,
            "interrupted": self.interrupted,
            "out_of_memory_steps": self.out_of_memory_steps,
            "fit": self.model_fit.to_dict(),
            "errors": self.errors,
            "live": self.live,
            "drift": self.drift,
            "fit_check": self.fit_check,
            "phases_s": self.phases_s,
            "max_model_len": self.max_model_len,
            "engine": self.engine,
            "request_overhead_s": self.request_overhead_s,
            "intake_gap_s": self.intake_gap_s,
            "samples": {"columns": list(CSV_COLUMNS), "rows": [s.row() for s in self.samples]},
        }


# field -> (accepted types, nullable)
_STR, _INT, _NUM, _BOOL = (str,), (int,), (int, float), (bool,)
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "schema_version": (_INT, False),
    "created_utc": (_STR, False),
    "source": (_STR, False),
    "device": (_STR, False),
    "driver_version": (_STR, True),
    "cuda_version": (_STR, True),
    "torch_version": (_STR, True),
    "transformers_version": (_STR, True),
    "torch_threads": (_INT, True),
    "model": (_STR, True),
    "weights": (_STR, True),
    "dtype": (_STR, False),
    "block_size": (_INT, False),
    "kv_bytes_per_token": (_INT, True),
    "kv_memory_bytes": (_INT, True),
    "num_kv_blocks": (_INT, True),
    "host_link_bytes_per_s": (_NUM, False),
    "host_link_source": (_STR, False),
    "grid": (_STR, True),
    "seed": (_INT, True),
    "calibration_s": (_NUM, True),
    "interrupted": (_BOOL, False),
    "out_of_memory_steps": (_INT, False),
    "fit": ((dict,), False),
    "errors": ((dict,), False),
    "samples": ((dict,), False),
}


OPTIONAL_OBJECTS = ("live", "drift", "fit_check", "phases_s", "engine")
"""Fields that may be absent (files written before them) or null."""


def _check_control_points(path: Path, drift: dict) -> None:
    """``drift.control_points``, when there, is one grid point per control step of every checkpoint."""
    from calibrate.grid import GridPoint

    points = drift.get("control_points")
    if points is None:
        return
    if not isinstance(points, list):
        raise ProfileError(f"{path}: field 'drift.control_points' must be a list, got {type(points).__name__}")
    for k, point in enumerate(points):
        try:
            GridPoint.from_dict(point)
        except ValueError as e:
            raise ProfileError(f"{path}: field 'drift.control_points[{k}]': {e}") from None
    for checkpoint in drift.get("checkpoints") or []:
        ms = checkpoint.get("control_ms") if isinstance(checkpoint, dict) else None
        if not isinstance(ms, list) or len(ms) != len(points) or not all(
                isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in ms):
            raise ProfileError(f"{path}: field 'drift.checkpoints': each needs control_ms, {len(points)} times > 0 "
                               f"(one per control point), got {ms!r}")


def _check(path: Path, name: str, value: object, types: tuple[type, ...], nullable: bool) -> None:
    if value is None:
        if not nullable:
            raise ProfileError(f"{path}: field {name!r} must not be null")
        return
    if isinstance(value, bool) and bool not in types:
        ok = False
    else:
        ok = isinstance(value, types)
    if not ok:
        want = " or ".join(t.__name__ for t in types)
        raise ProfileError(f"{path}: field {name!r} must be {want}, got {type(value).__name__} {value!r:.60}")


def profile_from_dict(data: object, path: Path) -> Profile:
    """Validate a parsed profile; ``path`` only names the file in errors."""
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: not a profile (the top level must be a JSON object)")
    if "schema_version" not in data:
        raise ProfileError(f"{path}: field 'schema_version' is missing (not a servesim profile?)")
    version = data["schema_version"]
    if version != SCHEMA_VERSION and version not in OLDER_SCHEMA_VERSIONS:
        raise ProfileError(f"{path}: field 'schema_version' is {version!r}; this servesim reads "
                           f"version {SCHEMA_VERSION} (and {', '.join(map(str, OLDER_SCHEMA_VERSIONS))}; "
                           "recalibrate, or refit with `servesim calibrate fit`)")
    tp = 1
    if version >= 3:
        if "tp" not in data:
            raise ProfileError(f"{path}: field 'tp' is missing")
        _check(path, "tp", data["tp"], _INT, False)
        if data["tp"] < 1:
            raise ProfileError(f"{path}: field 'tp' must be >= 1, got {data['tp']}")
        tp = data["tp"]
    for name, (types, nullable) in _FIELDS.items():
        if name not in data:
            raise ProfileError(f"{path}: field {name!r} is missing")
        _check(path, name, data[name], types, nullable)
    if data["block_size"] < 1:
        raise ProfileError(f"{path}: field 'block_size' must be >= 1, got {data['block_size']}")
    if not (math.isfinite(data["host_link_bytes_per_s"]) and data["host_link_bytes_per_s"] > 0):
        raise ProfileError(f"{path}: field 'host_link_bytes_per_s' must be > 0")
    samples = _samples_from_dict(data["samples"], path)
    values = {k: data[k] for k in _FIELDS if k not in ("schema_version", "fit", "samples")}
    optional: dict[str, Any] = {name: data.get(name) for name in OPTIONAL_OBJECTS}
    for name, value in optional.items():
        if value is not None and not isinstance(value, dict):
            raise ProfileError(f"{path}: field {name!r} must be an object or null, got {type(value).__name__}")
    if optional["drift"] is not None:
        _check_control_points(path, optional["drift"])
    max_model_len = data.get("max_model_len")
    _check(path, "max_model_len", max_model_len, _INT, True)
    overhead_s = data.get("request_overhead_s", 0.0)
    _check(path, "request_overhead_s", overhead_s, _NUM, False)
    if not (math.isfinite(overhead_s) and overhead_s >= 0):
        raise ProfileError(f"{path}: field 'request_overhead_s' must be >= 0, got {overhead_s}")
    wakes_alone = data.get("wakes_alone", False)
    _check(path, "wakes_alone", wakes_alone, (bool,), False)
    gap_s = data.get("intake_gap_s", LEGACY_WAKE_GAP_S if wakes_alone else 0.0)
    _check(path, "intake_gap_s", gap_s, _NUM, False)
    if not (math.isfinite(gap_s) and gap_s >= 0):
        raise ProfileError(f"{path}: field 'intake_gap_s' must be >= 0, got {gap_s}")
    return Profile(model_fit=_model_from_dict(data["fit"], path), samples=samples, tp=tp,
                   max_model_len=max_model_len, request_overhead_s=float(overhead_s), intake_gap_s=float(gap_s),
                   **optional, **values)


def _samples_from_dict(table: dict, path: Path) -> list[Sample]:
    for name in ("columns", "rows"):
        if name not in table:
            raise ProfileError(f"{path}: field 'samples.{name}' is missing")
        _check(path, f"samples.{name}", table[name], (list,), False)
    columns = table["columns"]
    samples = []
    for i, row in enumerate(table["rows"]):
        if not isinstance(row, list) or len(row) != len(columns):
            raise ProfileError(f"{path}: field 'samples.rows[{i}]' must be a list of {len(columns)} values "
                               f"(one per column)")
        try:
            samples.append(Sample.from_dict(dict(zip(columns, row, strict=True)), f"{path}: samples.rows[{i}]"))
        except SamplesError as e:
            raise ProfileError(str(e)) from None
    return samples


def _model_from_dict(fit: dict, path: Path) -> StepModel:
    for name in ("features", "coefficients_ms"):
        if name not in fit:
            raise ProfileError(f"{path}: field 'fit.{name}' is missing")
    _check(path, "fit.features", fit["features"], (list,), False)
    # A knee is required where the file lists its hinge feature; one added since reads as None.
    knees = [k for k, (feature, _) in KNEES.items() if feature in fit["features"]]
    for name in knees:
        if name not in fit:
            raise ProfileError(f"{path}: field 'fit.{name}' is missing")
    unknown = [name for name in fit["features"] if not isinstance(name, str) or name not in FEATURES]
    if unknown:
        raise ProfileError(f"{path}: field 'fit.features' has unknown feature(s) {unknown}; "
                           f"known: {', '.join(FEATURES)}")
    coefficients = fit["coefficients_ms"]
    _check(path, "fit.coefficients_ms", coefficients, (dict,), False)
    for name in fit["features"]:
        if name not in coefficients:
            raise ProfileError(f"{path}: field 'fit.coefficients_ms.{name}' is missing")
        value = coefficients[name]
        _check(path, f"fit.coefficients_ms.{name}", value, _NUM, False)
        if not (math.isfinite(value) and value >= 0):
            raise ProfileError(f"{path}: field 'fit.coefficients_ms.{name}' must be finite and >= 0, got {value}")
    for name in knees:
        _check(path, f"fit.{name}", fit[name], _INT, True)
    pad_rows = fit.get("pad_rows", [])  # absent in files written before it: no padding
    _check(path, "fit.pad_rows", pad_rows, (list,), False)
    if not all(isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in pad_rows):
        raise ProfileError(f"{path}: field 'fit.pad_rows' must be a list of [rows, padded rows] integer pairs")
    try:
        # A feature added after the profile was fitted has coefficient 0: it prices as it did.
        return StepModel({k: float(coefficients[k]) if k in fit["features"] else 0.0 for k in FEATURES},
                         **{k: fit[k] for k in knees}, pad_rows=tuple((p[0], p[1]) for p in pad_rows))
    except ValueError as e:
        raise ProfileError(f"{path}: field 'fit': {e}") from None


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile; raises :class:`ProfileError` naming the file and the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ProfileError(f"{path}: cannot read: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ProfileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return profile_from_dict(data, path)


def save_profile(profile: Profile, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = profile.to_dict()
    samples = data.pop("samples")
    head = json.dumps(data, indent=1).removesuffix("\n}")
    # One sample per line: indented, tens of thousands of rows would take a line per value.
    rows = ",\n".join("   " + json.dumps(row) for row in samples["rows"])
    path.write_text(f'{head},\n "samples": {{\n  "columns": {json.dumps(samples["columns"])},\n'
                    f'  "rows": [\n{rows}\n  ]\n }}\n}}\n')


class CalibratedCost:
    """:class:`sim.cost.CostModel` from a profile: the fitted step time plus swap copies
    (swap tokens x ``kv_bytes_per_token`` / ``host_link_bytes_per_s``)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.model = profile.model_fit
        self.kv_bytes_per_token = profile.kv_bytes_per_token
        self.host_link_bytes_per_s = profile.host_link_bytes_per_s
        self.request_overhead_s = profile.request_overhead_s
        self.intake_gap_s = profile.intake_gap_s

    @classmethod
    def from_file(cls, path: str | Path) -> CalibratedCost:
        return cls(load_profile(path))

    def step_time(self, shape: StepShape) -> float:
        return self.model.predict_ms(shape) / 1000 + self._swap_s(shape)

    def decode_run_times(self, shape: StepShape, n: int) -> np.ndarray:
        """``step_time`` of ``shape`` repeated ``n`` times, each decode one token further, with
        identical values (the simulator's fast path, see :func:`sim.cost.decode_run_times`)."""
        return self.model.predict_decode_run_ms(shape, n) / 1000 + self._swap_s(shape)

    def _swap_s(self, shape: StepShape) -> float:
        swap_tokens = shape.swap_in_tokens + shape.swap_out_tokens
        if not swap_tokens:
            return 0.0
        if self.kv_bytes_per_token is None:
            raise ValueError("the profile has no kv_bytes_per_token (fitted without --model), so it cannot "
                             "price swap copies; refit it with --model and --dtype")
        return swap_tokens * self.kv_bytes_per_token / self.host_link_bytes_per_s
