"""Many simulations at once: one process per run, results in input order.

A run is a :class:`RunSpec`: a policy label, a resolved :class:`SimConfig`, and a workload
*description* (a frozen ``SyntheticWorkload`` or ``TraceReplay``), never a list of requests.
Each run builds its own fresh requests from that description, so a run's summary depends only
on its spec: the same specs give the same results whatever the number of jobs.

A request rate means, for a trace, replaying it time-scaled so that its mean rate,
(n - 1) / (last arrival - first arrival), equals the rate; for a synthetic workload (or a
length-only trace, whose arrivals are synthetic) it is the arrival process's ``rate``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar

from tqdm import tqdm

from sim.config import SimConfig
from sim.metrics import DEFAULT_PERCENTILES
from sim.request import Request
from sim.saturation import config_saturation_rps
from sim.simulation import run_simulation
from sim.workload import SyntheticWorkload, TraceReplay

Workload = SyntheticWorkload | TraceReplay
T = TypeVar("T")


@dataclass(frozen=True)
class RunSpec:
    """One simulation to run; ``rate`` is the request rate it was set to (None: as given)."""

    label: str
    config: SimConfig
    workload: Workload
    rate: float | None = None


def mean_rate(requests: Sequence[Request]) -> float:
    """Mean request rate of an arrival-sorted stream, (n - 1) / (last - first arrival), in req/s."""
    if len(requests) < 2:
        raise ValueError(f"a request rate needs at least 2 requests, got {len(requests)}")
    span_s = requests[-1].arrival_s - requests[0].arrival_s
    if span_s <= 0:
        raise ValueError("every request arrives at the same time: the workload has no rate to scale")
    return (len(requests) - 1) / span_s


class RateScaler:
    """Sets a workload description to a request rate (see the module docstring).

    For a trace with timestamps it reads the trace once to find the native mean rate."""

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.native_rate: float | None = None
        if isinstance(workload, TraceReplay):
            replay = dataclasses.replace(workload, time_scale=1.0).replay()
            if not replay.synthetic_arrivals:
                self.native_rate = mean_rate(replay.requests)

    def at(self, rate: float) -> Workload:
        if not rate > 0:
            raise ValueError(f"request rate must be > 0, got {rate}")
        if self.native_rate is None and self.workload.arrival == "all-at-once":
            raise ValueError("arrival 'all-at-once' has no request rate to set; pick poisson, gamma or constant")
        if self.native_rate is not None:
            assert isinstance(self.workload, TraceReplay)
            return dataclasses.replace(self.workload, time_scale=rate / self.native_rate)
        return dataclasses.replace(self.workload, rate=rate)

    @property
    def base_rate(self) -> float:
        """The mean rate of the workload as given (trace: native rate x time_scale)."""
        if self.native_rate is not None:
            assert isinstance(self.workload, TraceReplay)
            return self.native_rate * self.workload.time_scale
        return self.workload.rate


def describe_workload(workload: Workload, scaler: RateScaler) -> dict[str, Any]:
    """A workload description for a results file: its fields, its kind and its rates."""
    kind = "trace" if isinstance(workload, TraceReplay) else "synthetic"
    return dataclasses.asdict(workload) | {"kind": kind, "native_rate": scaler.native_rate,
                                           "base_rate": scaler.base_rate}


def requests_of(workload: Workload) -> list[Request]:
    """Fresh requests from a workload description."""
    if isinstance(workload, TraceReplay):
        return workload.requests()
    return workload.generate()


def _profile(spec: RunSpec) -> Any | None:
    if spec.config.profile is None:
        return None
    from calibrate.profile import load_profile

    return load_profile(spec.config.profile)


def run_one(spec: RunSpec, goodput: dict[str, float] | None = None,
            percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, Any]:
    """Simulate one spec; the vLLM-style summary plus ``policy``, ``rate`` and ``offered_rate``
    (the measured mean rate of the requests, req/s)."""
    requests = requests_of(spec.workload)
    try:
        offered = mean_rate(requests)
    except ValueError:
        offered = None
    summary = run_simulation(spec.config, requests, _profile(spec)).summary(goodput or None, percentiles)
    return {"policy": spec.label, "rate": spec.rate, "offered_rate": offered, **summary}


def saturation_one(spec: RunSpec) -> float:
    """The spec's saturation throughput (:mod:`sim.saturation`: its requests all at t = 0), req/s."""
    return config_saturation_rps(spec.config, requests_of(spec.workload), _profile(spec))


def default_jobs() -> int:
    return os.cpu_count() or 1


class Sweep:
    """A pool of worker processes and a progress bar, kept across several batches of runs
    (a capacity search runs one batch per search step). Use as a context manager."""

    def __init__(self, goodput: dict[str, float] | None = None,
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES, jobs: int | None = None,
                 progress: bool | None = None, desc: str = "simulating") -> None:
        self.goodput = goodput or None
        self.percentiles = tuple(percentiles)
        self.jobs = default_jobs() if jobs is None else jobs
        if self.jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {self.jobs}")
        # progress None: tqdm shows the bar on a terminal only.
        self._bar = tqdm(total=0, unit="run", desc=desc, disable=None if progress is None else not progress)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self._bar.close()

    def run(self, specs: Sequence[RunSpec]) -> list[dict[str, Any]]:
        """The summary of every spec, in the order of ``specs``."""
        return self._map(functools.partial(run_one, goodput=self.goodput, percentiles=self.percentiles), specs)

    def saturation(self, specs: Sequence[RunSpec]) -> list[float]:
        """The saturation throughput of every spec (req/s), in the order of ``specs``."""
        return self._map(saturation_one, specs)

    def _map(self, fn: Callable[[RunSpec], T], specs: Sequence[RunSpec]) -> list[T]:
        self._bar.total += len(specs)
        self._bar.refresh()
        if self.jobs == 1 or len(specs) <= 1:
            results = []
            for spec in specs:
                results.append(fn(spec))
                self._bar.update()
            return results
        if self._pool is None:
            self._pool = ProcessPoolExecutor(max_workers=self.jobs)
        futures = {self._pool.submit(fn, spec): i for i, spec in enumerate(specs)}
        done: dict[int, T] = {}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            self._bar.update()
        return [done[i] for i in range(len(specs))]


def run_sweep(specs: Sequence[RunSpec], goodput: dict[str, float] | None = None,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES, jobs: int | None = None,
              progress: bool | None = None, desc: str = "simulating") -> list[dict[str, Any]]:
    """Run every spec, ``jobs`` processes at a time (default: one per core; 1 runs in this
    process), and return the summaries in the order of ``specs``.

    ``progress``: True shows a tqdm bar, False hides it, None shows it on a terminal only."""
    jobs = min(default_jobs() if jobs is None else jobs, max(len(specs), 1))
    with Sweep(goodput, percentiles, jobs, progress, desc) as sweep:
        return sweep.run(specs)
