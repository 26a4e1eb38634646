"""The seam: the live engine's loop and the simulator give the same bytes when a step costs the same.

``LiveEngine`` runs here with a stub runner that executes nothing and advances a virtual clock
by a cost model's price of each batch. The simulator (``simulate(exact_steps=True)``) waits the
same price per step, so both executors see the same times, make the same decisions and must
write byte-identical ``requests.csv``, ``tokens.csv`` and ``summary.json`` through the project's
own writers, and the same ``timeseries.csv`` up to the simulator's final idle row. The fast
path must give the same answers too. The matrix is every registered policy x every queue order
x every preemption mode the policy accepts, over several seeds, with a KV pool small enough
that the preempting modes really preempt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.output import write_json, write_requests, write_timeseries, write_token_times
from sim.batch import Batch
from sim.cluster import make_router
from sim.cost import ConstantCost, CostModel
from sim.engine import SimResult, simulate
from sim.fastpath import fast_variant
from sim.hardware import get_hardware
from sim.kv import BlockManager
from sim.metrics import summarize
from sim.models import get_model
from sim.policies import POLICIES, SchedulerConfig, make_policy
from sim.queues import ORDERS
from sim.request import Request
from sim.roofline import RooflineCost
from tests.checks import policy_matrix

pytest.importorskip("torch", reason="the live engine (runtime/) needs the runtime extra")
from runtime.engine import LiveEngine

SEEDS = (0, 1, 2)
BLOCK_SIZE = 8
NUM_BLOCKS = 48  # the longest request needs 48 blocks: it fits alone, but a few at once preempt
HOST_BLOCKS = 24  # swap space for about two requests: swap mode also falls back to recompute
GOODPUT_MS = {"ttft": 400.0, "tpot": 30.0}
PERCENTILES = (50.0, 90.0, 99.0)


COMBOS = policy_matrix()
COSTS = {
    # A 7B model on an H100: step times differ with every batch, as in a real run.
    "roofline": lambda: RooflineCost(get_model("qwen2.5-7b"), get_hardware("h100-sxm"), "bfloat16"),
    # Quarter seconds are exact in binary: arrivals on the same grid tie with step ends.
    "constant": lambda: ConstantCost(0.25),
}


def make_requests(seed: int, cost: str) -> list[Request]:
    """A bursty mix of 40 requests: 1-token outputs among them, three priority classes."""
    rng = np.random.default_rng(seed)
    n = 40
    if cost == "constant":
        # From 0, as every replayed trace starts.
        arrivals = np.concatenate([[0], np.cumsum(rng.integers(0, 3, n - 1))]) * 0.25
    else:
        arrivals = np.cumsum(rng.gamma(0.5, 0.02 / 0.5, n))
    prompts = rng.integers(1, 320, n)
    outputs = np.where(rng.random(n) < 0.15, 1, rng.integers(1, 64, n))
    priorities = rng.integers(0, 3, n)
    return [Request(i, float(a), int(p), int(o), int(q))
            for i, (a, p, o, q) in enumerate(zip(arrivals, prompts, outputs, priorities, strict=True))]


def scheduler(policy: str, order: str, preempt: str) -> SchedulerConfig:
    return SchedulerConfig(policy=policy, order=order, preempt=preempt, max_num_seqs=8, batch_size=4,
                           max_wait_s=0.05, token_budget=64 if policy == "chunked" else None)


class VirtualClock:
    """A clock that moves only when told: by a step's price, or by a sleep."""

    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s

    def sleep(self, duration_s: float) -> None:
        assert duration_s >= 0
        self.now_s += duration_s


class PricedRunner:
    """A model runner that runs no model: executing a batch moves the clock by its price."""

    def __init__(self, blocks: BlockManager, cost: CostModel, clock: VirtualClock) -> None:
        self.blocks = blocks
        self.cost = cost
        self.clock = clock
        self.outputs: dict[int, list[int]] = {}
        self.steps = 0

    def warmup(self) -> None:
        raise AssertionError("the seam test runs without warm-up")

    def execute(self, batch: Batch) -> dict[int, int]:
        step_s = self.cost.step_time(batch.shape())
        assert step_s >= 0
        self.clock.now_s += step_s
        self.steps += 1
        return {}


def run_live(config: SchedulerConfig, requests: list[Request], cost: CostModel) -> tuple[SimResult, int]:
    clock = VirtualClock()
    runner = PricedRunner(BlockManager(NUM_BLOCKS, BLOCK_SIZE, HOST_BLOCKS), cost, clock)
    engine = LiveEngine(runner, make_policy(config, runner.blocks), clock=clock, sleep=clock.sleep)  # type: ignore[arg-type]
    result = engine.run(requests, token_times=True, warmup=False)
    return result, runner.steps


def run_sim(config: SchedulerConfig, requests: list[Request], cost: CostModel, exact_steps: bool) -> SimResult:
    def factory():
        return make_policy(config, BlockManager(NUM_BLOCKS, BLOCK_SIZE, HOST_BLOCKS))

    return simulate(requests, factory, cost, make_router("round_robin"), 1, token_times=True,
                    exact_steps=exact_steps)


def write(result: SimResult, out: Path) -> dict[str, bytes]:
    """The run's files as the project's writers write them."""
    out.mkdir(parents=True)
    summary = summarize(result.requests, result.itl(), PERCENTILES, GOODPUT_MS, result.num_preemptions)
    write_requests(out / "requests.csv", result.requests)
    write_token_times(out / "tokens.csv", result.requests)
    write_json(out / "summary.json", summary)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_matrix_comes_from_the_registries():
    """The seam matrix holds every registered policy and order, and every mode a policy accepts."""
    assert {c[0] for c in COMBOS} == set(POLICIES)
    assert {c[1] for c in COMBOS} == set(ORDERS)
    for policy in POLICIES:
        assert any(c[0] == policy for c in COMBOS), f"{policy} accepts no preemption mode"
    assert ("static", "fcfs", "recompute") not in COMBOS  # static batching never preempts


@pytest.mark.parametrize("cost_name", sorted(COSTS))
@pytest.mark.parametrize("policy,order,preempt", COMBOS)
def test_live_engine_matches_exact_steps(policy, order, preempt, cost_name, tmp_path):
    """Live loop on a virtual clock and simulate(exact_steps=True) write byte-identical run files."""
    config = scheduler(policy, order, preempt)
    preemptions = 0
    for seed in SEEDS:
        cost = COSTS[cost_name]()
        live, live_steps = run_live(config, make_requests(seed, cost_name), cost)
        sim = run_sim(config, make_requests(seed, cost_name), cost, exact_steps=True)
        assert live_steps == sum(r.steps for r in sim.replicas), f"seed {seed}: step counts differ"
        want = write(sim, tmp_path / f"sim{seed}")
        got = write(live, tmp_path / f"live{seed}")
        for name in want:
            assert got[name] == want[name], f"seed {seed}: live {name} differs from the simulator's"
        # One row per scheduling decision; the simulator's loop also records its last, idle
        # decision after the final finish, where the live loop has already stopped.
        write_timeseries(tmp_path / f"sim{seed}.csv", [r.timeseries for r in sim.replicas])
        write_timeseries(tmp_path / f"live{seed}.csv", [r.timeseries for r in live.replicas])
        sim_rows = (tmp_path / f"sim{seed}.csv").read_text().splitlines(keepends=True)
        assert sim_rows[-1].split(",")[2:] == ["0", "0", "0", "0\n"]
        assert (tmp_path / f"live{seed}.csv").read_text() == "".join(sim_rows[:-1]), f"seed {seed}: timeseries"
        summary = json.loads(want["summary.json"])
        assert summary["completed"] + summary["rejected"] == 40
        preemptions += summary["num_preemptions"]
    if preempt != "off":
        assert preemptions > 0, "the KV pool was meant to be small enough to preempt"
    else:
        assert preemptions == 0


@pytest.mark.parametrize("cost_name", sorted(COSTS))
@pytest.mark.parametrize("policy,order,preempt", COMBOS)
def test_fast_path_matches_the_same_bytes(policy, order, preempt, cost_name, tmp_path):
    """simulate() on its fast path writes byte-identical requests.csv, tokens.csv and summary.json."""
    config = scheduler(policy, order, preempt)
    has_fast_path = fast_variant(make_policy(config, BlockManager(NUM_BLOCKS, BLOCK_SIZE, HOST_BLOCKS))) is not None
    for seed in SEEDS:
        cost = COSTS[cost_name]()
        exact = write(run_sim(config, make_requests(seed, cost_name), cost, exact_steps=True), tmp_path / f"e{seed}")
        fast_run = run_sim(config, make_requests(seed, cost_name), cost, exact_steps=False)
        if has_fast_path:
            assert fast_run.replicas[0].run_steps > 0, f"seed {seed}: the fast path priced no run of steps"
        fast = write(fast_run, tmp_path / f"f{seed}")
        for name in exact:
            assert fast[name] == exact[name], f"seed {seed}: the fast path's {name} differs from exact steps"


def test_live_engine_sleeps_until_arrivals_and_batching_timeouts():
    """An idle live engine wakes for the next arrival and for static batching's max_wait, as the simulator does."""
    config = SchedulerConfig(policy="static", preempt="off", batch_size=4, max_wait_s=0.5)
    requests = [Request(0, 1.0, 10, 3), Request(1, 3.0, 10, 2)]
    cost = ConstantCost(0.25)
    live, _ = run_live(config, requests, cost)
    sim = run_sim(config, [Request(0, 1.0, 10, 3), Request(1, 3.0, 10, 2)], cost, exact_steps=True)
    # Each request waits max_wait for a batch that never fills, then runs alone.
    assert [r.first_scheduled_s for r in live.requests] == [1.5, 3.5]
    assert [r.finish_s for r in live.requests] == [1.5 + 3 * 0.25, 3.5 + 2 * 0.25]
    assert [r.finish_s for r in sim.requests] == [r.finish_s for r in live.requests]
