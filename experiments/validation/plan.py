"""A validation resolved before anything runs: the profile checked against the model, the trace
slice, the one live configuration (scheduler and KV pool) both executors get, and the time
scale that puts the slice at a fraction of the simulated saturation throughput."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sim.config import Capacity
from sim.models import get_model
from sim.policies import make_policy
from sim.policies.base import SchedulerConfig
from sim.saturation import saturation_rps
from sim.workload import TraceReplay

if TYPE_CHECKING:
    from calibrate.profile import Profile
    from runtime.config import LiveConfig

DEFAULT_LOAD = 0.7
TINY_MAX_PROMPT_TOKENS = 1024
TINY_MAX_OUTPUT_TOKENS = 512
"""Azure conversation lengths scaled so the longest request of a slice fits the tiny model's
2048 positions: prompts x ~0.25, outputs x ~0.86 on the default slice. 200 requests then take
about 15 s live on a 2-core CPU at 70% load. (Prompts up to 1536 fit too, but prefills of
1000+ tokens are where the quick calibration grid is weakest: TTFT errors triple.)"""
SMALL_MAX_PROMPT_TOKENS = 256
SMALL_MAX_OUTPUT_TOKENS = 64
"""The small model's steps cost compute (on one thread of a 2-core EPYC: a prefill of 256 tokens
~0.6 s, a decode step 70 ms alone and 0.2 s at 16 sequences), so its slices are scaled much
further than its 4096 positions require: its saturation on azure-conv is then ~3.7 req/s (1.7
at 512 / 128), and 200 requests at 70% load are served in about 80 s."""
DEFAULT_MAX_LENGTHS = {"tiny": (TINY_MAX_PROMPT_TOKENS, TINY_MAX_OUTPUT_TOKENS),
                       "small": (SMALL_MAX_PROMPT_TOKENS, SMALL_MAX_OUTPUT_TOKENS)}
SHIPPED_PROFILES = {"tiny": "tiny-cpu.json"}


def shipped_profile(model: str) -> Path | None:
    """The profile shipped for ``model`` on CPU, if any: in the source tree's ``profiles/``,
    the ``calibrate`` package data, or ``./profiles``."""
    name = SHIPPED_PROFILES.get(model)
    if name is None:
        return None
    import calibrate

    root = Path(__file__).resolve().parents[2]
    for candidate in (root / "profiles" / name, Path(calibrate.__file__).parent / "data" / name,
                      Path("profiles") / name):
        if candidate.is_file():
            return candidate
    return None


def default_lengths(model: str, max_prompt_tokens: int | None,
                    max_output_tokens: int | None) -> tuple[int | None, int | None]:
    """servesim's own CPU models (:data:`DEFAULT_MAX_LENGTHS`) get lengths scaled down unless
    told otherwise; other models keep the trace's."""
    mp, mo = DEFAULT_MAX_LENGTHS.get(model, (None, None))
    return max_prompt_tokens or mp, max_output_tokens or mo


def native_rate(workload: TraceReplay) -> float:
    """Mean request rate of the slice as recorded, (n - 1) / span, in req/s."""
    requests = dataclasses.replace(workload, time_scale=1.0).requests()
    span_s = requests[-1].arrival_s - requests[0].arrival_s
    if len(requests) < 2 or span_s <= 0:
        raise ValueError("the trace slice needs at least 2 requests at different times to scale it to a load")
    return (len(requests) - 1) / span_s


def time_scale_for_load(workload: TraceReplay, load: float, capacity_rps: float) -> float:
    """The time scale that makes the slice's mean arrival rate ``load`` x ``capacity_rps``."""
    if not load > 0:
        raise ValueError(f"load must be > 0 (a fraction of capacity), got {load}")
    return load * capacity_rps / native_rate(workload)


def at_load(workload: TraceReplay, load: float, capacity_rps: float, synthetic_arrivals: bool) -> TraceReplay:
    """The slice with its mean arrival rate at ``load`` x ``capacity_rps``: a timed trace is
    time-scaled; a length-only one (arrivals from ``arrival`` / ``rate``) gets its ``rate``
    scaled, which stretches the same seeded gaps exactly (every gap is proportional to 1 / rate)."""
    factor = time_scale_for_load(workload, load, capacity_rps)
    if synthetic_arrivals:
        return dataclasses.replace(workload, rate=workload.rate * factor)
    return dataclasses.replace(workload, time_scale=factor)


def arrivals_text(workload: TraceReplay, synthetic_arrivals: bool) -> str:
    """How the slice's arrivals were set: ``time scale 3.2`` or ``poisson arrivals at 1.5 req/s``."""
    if synthetic_arrivals:
        shape = f" (burstiness {workload.burstiness:g})" if workload.arrival == "gamma" else ""
        return f"{workload.arrival}{shape} arrivals at {workload.rate:.3g} req/s"
    return f"time scale {workload.time_scale:.3g}"


@dataclass(frozen=True)
class Plan:
    """A resolved validation: what runs where, before anything runs."""

    profile_path: Path
    profile: Profile
    workload: TraceReplay
    live: LiveConfig
    """The live engine's configuration; its scheduler and pool are the simulator's too."""
    capacity: Capacity
    """The pool of ``live`` with the profile's KV bytes per token."""
    load: float | None
    capacity_rps: float | None
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    synthetic_arrivals: bool = False
    """A length-only trace: arrivals drawn from the workload's arrival process and rate."""

    @property
    def scheduler(self) -> SchedulerConfig:
        return self.live.scheduler

    def describe(self) -> dict[str, Any]:
        return {
            "profile": str(self.profile_path), "profile_device": self.profile.device,
            "profile_created_utc": self.profile.created_utc,
            "workload": dataclasses.asdict(self.workload) | {"prompt_scale": self.prompt_scale,
                                                               "output_scale": self.output_scale},
            "scheduler": dataclasses.asdict(self.scheduler), "kv": dataclasses.asdict(self.capacity),
            "live": self.live.to_dict(), "load": self.load,
            "saturation_request_throughput": self.capacity_rps,
        }


def make_plan(profile_path: Path, model: str, device: str | None, dtype: str | None, threads: int | None,
              workload: TraceReplay, scheduler: SchedulerConfig, kv_blocks: int | None, load: float | None,
              seed: int) -> Plan:
    """Check the profile against the model, size the KV pool, and time-scale the slice to
    ``load`` x the simulated saturation throughput (when ``load`` is given).

    Raises ValueError (ProfileError included) with a message for people."""
    from calibrate.profile import CalibratedCost, load_profile
    from experiments.validation.runs import sim_pool
    from runtime.config import CPU_MAX_KV_BLOCKS, LiveConfig, default_kv_blocks

    profile = load_profile(profile_path)
    spec = get_model(model)
    if profile.model is not None and profile.model != model:
        raise ValueError(f"{profile_path} was calibrated for model {profile.model!r}, not {model!r}")
    if dtype is not None and dtype != profile.dtype:
        raise ValueError(f"{profile_path} was calibrated in {profile.dtype}, not {dtype} (omit --dtype to use it)")
    on_cpu = profile.device.startswith("cpu")
    device = device or ("cpu" if on_cpu else "cuda")
    if threads is None and device == "cpu":
        threads = profile.torch_threads
    replay = workload.replay()
    requests = replay.requests
    # A validation compares served requests: one the model cannot take is a setup error here,
    # not a rejection counted by both executors.
    longest = max(r.prompt_tokens + r.output_tokens for r in requests)
    if longest > spec.max_position:
        raise ValueError(f"a request of the slice needs {longest} positions; {spec.name} has {spec.max_position} "
                         "(lower --max-prompt-tokens / --max-output-tokens)")
    block_size = profile.block_size
    kv_bytes = profile.kv_bytes_per_token or spec.kv_bytes_per_token(profile.dtype)
    if kv_blocks is None:
        kv_blocks = default_kv_blocks(requests, block_size)
        if not on_cpu and profile.num_kv_blocks:
            kv_blocks = min(max(kv_blocks, CPU_MAX_KV_BLOCKS), profile.num_kv_blocks)
    live = LiveConfig(model=model, scheduler=scheduler, device=device, dtype=profile.dtype, threads=threads,
                      seed=seed, kv_blocks=kv_blocks, block_size=block_size, collect_garbage=False)
    capacity = Capacity(kv_blocks, live.host_blocks(kv_blocks), block_size, kv_bytes)
    capacity_rps = None
    if load is not None:
        capacity_rps = saturation_rps(requests, lambda: make_policy(live.scheduler, sim_pool(live)),
                                      CalibratedCost(profile))
        if capacity_rps <= 0:
            raise ValueError("no request completed in the saturation run (do they fit the KV pool?)")
        workload = at_load(workload, load, capacity_rps, replay.synthetic_arrivals)
    return Plan(profile_path, profile, workload, live, capacity, load, capacity_rps, replay.prompt_scale,
                replay.output_scale, replay.synthetic_arrivals)
