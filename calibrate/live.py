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
from collections.abc import Sequence
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
MIN_RUN_REQUESTS = 8
"""Fewest requests a live run serves when :attr:`LivePlan.max_arrival_s` cuts it short."""
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
    """Runs stop being started once this much wall time has gone."""
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


def _saturation_rps(requests, scheduler, num_blocks: int, block_size: int, model: StepModel) -> float:
    """:mod:`sim.saturation`'s throughput of ``requests`` priced by ``model`` (the grid-only fit)."""
    from sim.kv import BlockManager
    from sim.policies import make_policy
    from sim.saturation import saturation_rps

    class _Cost:
        def step_time(self, shape):
            return model.predict_ms(shape) / 1000

    return saturation_rps(requests, lambda: make_policy(scheduler, BlockManager(num_blocks, block_size)), _Cost())


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

    def serve(k: int, policy: str, load: float) -> tuple[list[Sample], dict]:
        scheduler = SchedulerConfig(policy=policy, token_budget=plan.token_budget if policy == "chunked" else None)
        base = SyntheticWorkload(num_requests=plan.num_requests, prompt_dist=plan.prompt_dist,
                                 output_dist=plan.output_dist, seed=plan.seed + k)
        sat = _saturation_rps(base.generate(), scheduler, blocks.num_blocks, blocks.block_size, grid_model)
        requests = SyntheticWorkload(rate=load * sat, num_requests=plan.run_requests(load * sat),
                                     prompt_dist=plan.prompt_dist, output_dist=plan.output_dist,
                                     seed=plan.seed + k).generate()
        t0 = time.perf_counter()
        live = LiveConfig(model=runner.model.spec.name, scheduler=scheduler, seed=runner.seed)
        result = build_live_engine(live, runner=runner, progress=progress).run(requests)
        for r in requests:
            runner.release(r.id)
        kept = [step_sample(shape, s) for shape, s in result.step_log
                if s > 0 and not shape.swap_in_tokens and not shape.swap_out_tokens]
        return kept, {"policy": policy, "load": load, "rate": load * sat, "seed": plan.seed + k,
                      "requests": len(requests), "steps": len(kept), "wall_s": time.perf_counter() - t0}

    served: dict[tuple, list[tuple[int, str, float]]] = {}
    """The runs each segment served the first time (a re-measurement serves the same ones)."""

    def run_segment(part: list[tuple[int, str, float]]) -> tuple[list[Sample], list[dict]]:
        again = tuple(part) in served
        samples: list[Sample] = []
        runs: list[dict] = []
        done = []
        for run in served[tuple(part)] if again else part:
            if not again and time.perf_counter() - started > plan.time_budget_s:
                break
            kept, info = serve(*run)
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
