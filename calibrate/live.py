"""The live phase of calibration: the real :class:`~runtime.engine.LiveEngine` serves a
synthetic workload, and every step it logs becomes a sample (``origin`` ``live``).

Grid steps are timed in isolation, back to back; a serving engine's steps also carry the
scheduler's work, wake-ups after idle waits, prefills that join a decoding batch, decode groups
of mixed lengths. The live steps are timed exactly as validation times them (the whole engine
step, from the end of the previous one or the wake-up), so the fit sees them too.

The workload is synthetic (never a validation trace): Poisson arrivals at a few fractions of
the saturation throughput the grid-only model predicts, prompt and output lengths uniform
within the model's positions, under each of :data:`POLICIES`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from calibrate.drift import DriftMonitor
from calibrate.fit import StepModel
from calibrate.samples import Sample

POLICIES = ("continuous", "chunked")
LOADS = (0.5, 0.9, 1.5)
"""Fractions of the predicted saturation throughput: light and heavy load (many steps after
an idle wait, small batches), and an overload whose queue grows the decode batches to the
sizes a loaded engine runs."""
CHUNKED_TOKEN_BUDGET = 512
"""What ``servesim`` gives chunked prefill by default."""
MIN_RUN_REQUESTS = 4
"""Fewest requests a live run serves when :attr:`LivePlan.max_arrival_s` or the time budget
cuts it short (a run that cannot serve this many within the budget is not started, unless it
would be the first)."""
LIVE_SLOWDOWN = 1.2
"""How much slower than the grid-only fit's prediction a run is planned to take: live steps
carry the scheduler's work and wake-ups the grid does not time (the small model's first quick
run took 45.6 s where the fit said at most 40)."""
CPU_LIVE_KV_BLOCKS = 2048
"""The pool the live phase needs on CPU at most (as ``servesim validate``'s default)."""


@dataclass(frozen=True)
class LivePlan:
    """The synthetic workload of the live phase (recorded in the profile's ``live`` field)."""

    num_requests: int = 48
    prompt_dist: str = ""
    output_dist: str = ""
    loads: tuple[float, ...] = LOADS
    policies: tuple[str, ...] = POLICIES
    token_budget: int = CHUNKED_TOKEN_BUDGET
    seed: int = 0
    time_budget_s: float = 40.0
    """Wall time of the whole live phase: each run serves the requests that the grid-only fit
    predicts are done in the time left (:func:`fit_to_budget`, with :data:`LIVE_SLOWDOWN`), and a run of which not even
    :data:`MIN_RUN_REQUESTS` fit is not started. (Runs used to be started while time was left,
    and the small model's first quick run, 8 requests, took 55 s of a 40 s budget.)"""
    max_arrival_s: float | None = None
    """A run keeps only the requests that arrive within this many seconds at its rate (at
    least :data:`MIN_RUN_REQUESTS`); None: all ``num_requests``. The small model on a CPU
    serves a fifth of a request per second at half load: its 48 requests took 311 s."""

    @classmethod
    def for_model(cls, max_len: int, quick: bool, seed: int = 0) -> LivePlan:
        """Prompts up to half the positions, outputs up to a quarter (so every request fits);
        a run's arrivals span at most half the time budget."""
        budget_s = 40.0 if quick else 600.0
        return cls(num_requests=48 if quick else 128, prompt_dist=f"uniform:16:{max_len // 2}",
                   output_dist=f"uniform:8:{max_len // 4}", seed=seed, time_budget_s=budget_s,
                   max_arrival_s=budget_s / 2)

    def run_requests(self, rate_rps: float) -> int:
        """Requests of a run at ``rate_rps``: :attr:`max_arrival_s` of arrivals, within
        [:data:`MIN_RUN_REQUESTS`, ``num_requests``]."""
        if self.max_arrival_s is None:
            return self.num_requests
        return max(min(MIN_RUN_REQUESTS, self.num_requests), min(self.num_requests, int(self.max_arrival_s * rate_rps)))

    def to_dict(self) -> dict:
        return asdict(self) | {"arrival": "poisson", "loads": list(self.loads), "policies": list(self.policies)}


def live_kv_blocks(plan: LivePlan, block_size: int) -> int:
    """Blocks for every request of one run at once (so nothing is preempted), capped."""
    from sim.kv import blocks_for
    from sim.workload import SyntheticWorkload

    reqs = SyntheticWorkload(num_requests=plan.num_requests, prompt_dist=plan.prompt_dist,
                             output_dist=plan.output_dist, seed=plan.seed).generate()
    return min(CPU_LIVE_KV_BLOCKS, sum(blocks_for(r.max_tokens, block_size) for r in reqs))


class _GridCost:
    """The grid-only fit as a simulator cost model."""

    def __init__(self, model: StepModel) -> None:
        self.model = model

    def step_time(self, shape) -> float:
        return self.model.predict_ms(shape) / 1000


def _policy_factory(scheduler, num_blocks: int, block_size: int):
    from sim.kv import BlockManager
    from sim.policies import make_policy

    return lambda: make_policy(scheduler, BlockManager(num_blocks, block_size))


def _saturation_rps(requests, scheduler, num_blocks: int, block_size: int, model: StepModel) -> float:
    """:mod:`sim.saturation`'s throughput of ``requests`` priced by ``model`` (the grid-only fit)."""
    from sim.saturation import saturation_rps

    return saturation_rps(requests, _policy_factory(scheduler, num_blocks, block_size), _GridCost(model))


def predicted_run_s(requests, scheduler, num_blocks: int, block_size: int, model: StepModel) -> float:
    """How long serving ``requests`` (as they arrive) takes by the simulator priced with
    ``model``: the last completion. Copies are simulated; ``requests`` are left untouched."""
    from sim.cluster import make_router
    from sim.engine import simulate
    from sim.request import Request

    copies = [Request(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens, r.priority) for r in requests]
    result = simulate(copies, _policy_factory(scheduler, num_blocks, block_size), _GridCost(model),
                      make_router("round_robin"), 1)
    return max((r.finish_s for r in result.requests if r.finish_s is not None), default=0.0)


def fit_to_budget(requests: list, remaining_s: float, predict: Callable[[list], float]) -> list:
    """The longest prefix of ``requests`` (arrival order) that ``predict`` says is served within
    ``remaining_s``, at least :data:`MIN_RUN_REQUESTS` (or all when fewer); [] when even that
    does not fit. A bisection: the prediction grows with the prefix."""
    floor = min(MIN_RUN_REQUESTS, len(requests))
    if predict(requests) <= remaining_s:
        return requests
    if predict(requests[:floor]) > remaining_s:
        return []
    lo, hi = floor, len(requests)  # requests[:lo] fits, requests[:hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predict(requests[:mid]) <= remaining_s else (lo, mid)
    return requests[:lo]


def step_sample(shape, step_s: float) -> Sample:
    return Sample(shape, step_ms=step_s * 1000, step_ms_min=step_s * 1000, step_ms_max=step_s * 1000,
                  repeats=1, origin="live")


def run_live_phase(runner, plan: LivePlan, grid_model: StepModel, progress: bool = False,
                   drift: DriftMonitor | None = None) -> tuple[list[Sample], dict]:
    """Serve the plan's workloads on ``runner`` (its pool must be empty and hold
    :func:`live_kv_blocks`); returns the samples and a description of the runs.

    With ``drift`` (checkpoints taken up to the end of the grid), the runs are two segments,
    the first and second half, each checked against the control steps; a segment that drifted
    is served again once (the same runs), and :class:`~calibrate.drift.DriftError` propagates
    when that does not help."""
    from runtime.build import build_live_engine, paused_gc
    from runtime.config import LiveConfig
    from sim.policies.base import SchedulerConfig
    from sim.workload import SyntheticWorkload

    blocks = runner.blocks
    started = time.perf_counter()

    def workload(k: int, policy: str, load: float) -> tuple[SchedulerConfig, float, list]:
        """The run's scheduler, rate and requests (fresh objects each call)."""
        scheduler = SchedulerConfig(policy=policy, token_budget=plan.token_budget if policy == "chunked" else None)
        base = SyntheticWorkload(num_requests=plan.num_requests, prompt_dist=plan.prompt_dist,
                                 output_dist=plan.output_dist, seed=plan.seed + k)
        sat = _saturation_rps(base.generate(), scheduler, blocks.num_blocks, blocks.block_size, grid_model)
        requests = SyntheticWorkload(rate=load * sat, num_requests=plan.run_requests(load * sat),
                                     prompt_dist=plan.prompt_dist, output_dist=plan.output_dist,
                                     seed=plan.seed + k).generate()
        return scheduler, load * sat, requests

    def serve(run: tuple[int, str, float], n: int) -> tuple[list[Sample], dict]:
        k, policy, load = run
        scheduler, rate, requests = workload(*run)
        requests = requests[:n]
        t0 = time.perf_counter()
        live = LiveConfig(model=runner.model.spec.name, scheduler=scheduler, seed=runner.seed)
        result = build_live_engine(live, runner=runner, progress=progress).run(requests)
        for r in requests:
            runner.release(r.id)
        kept = [step_sample(shape, s) for shape, s in result.step_log
                if s > 0 and not shape.swap_in_tokens and not shape.swap_out_tokens]
        return kept, {"policy": policy, "load": load, "rate": rate, "seed": plan.seed + k,
                      "requests": len(requests), "steps": len(kept), "wall_s": time.perf_counter() - t0}

    def run_size(run: tuple[int, str, float]) -> int:
        """Requests of ``run`` that the grid model says are served in the time left (0: none;
        the first run serves its minimum whatever the prediction)."""
        scheduler, _, requests = workload(*run)
        left_s = (plan.time_budget_s - (time.perf_counter() - started)) / LIVE_SLOWDOWN
        predict = functools.partial(predicted_run_s, scheduler=scheduler, num_blocks=blocks.num_blocks,
                                    block_size=blocks.block_size, model=grid_model)
        n = len(fit_to_budget(requests, left_s, predict))
        return n if n or sizes else min(MIN_RUN_REQUESTS, len(requests))

    served: dict[tuple, list[tuple[int, str, float]]] = {}
    """The runs each segment served the first time (a re-measurement serves the same ones)."""
    sizes: dict[tuple[int, str, float], int] = {}
    """Requests each run served the first time."""

    def run_segment(part: list[tuple[int, str, float]]) -> tuple[list[Sample], list[dict]]:
        again = tuple(part) in served
        samples: list[Sample] = []
        runs: list[dict] = []
        done = []
        for run in served[tuple(part)] if again else part:
            if not again:
                n = run_size(run)
                if not n:
                    break
                sizes[run] = n
            kept, info = serve(run, sizes[run])
            samples += kept
            runs.append(info)
            done.append(run)
        served[tuple(part)] = done
        return samples, runs

    todo = [(k, p, x) for k, (p, x) in enumerate((p, x) for x in plan.loads for p in plan.policies)]
    samples: list[Sample] = []
    runs: list[dict] = []
    with paused_gc():
        if drift is None:
            samples, runs = run_segment(todo)
        else:
            half = (len(todo) + 1) // 2
            for name, end, part in (("the live phase's first half", "live middle", todo[:half]),
                                    ("the live phase's second half", "live end", todo[half:])):
                got, info = drift.segment(name, end, functools.partial(run_segment, part))
                samples += got
                runs += info
    return samples, plan.to_dict() | {"runs": runs, "wall_s": time.perf_counter() - started}


def count_origins(samples: Sequence[Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        out[s.origin] = out.get(s.origin, 0) + 1
    return out
