"""Steps read back from token streams (calibrate/stream_steps.py), checked against the
simulator: its token times are exact step ends, and a cost model that is a known function of
every field of the shape prices each step, so a clean step read with the wrong shape (a hidden
prompt chunk, a missed decode) shows as a price that differs from its time."""

from __future__ import annotations

import bisect
import dataclasses
import random

import pytest

from calibrate.stream_steps import admission_steps, read_steps
from sim.batch import StepShape
from sim.cluster import make_router
from sim.engine import simulate
from sim.kv import BlockManager
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request


@dataclasses.dataclass
class ShapeCost:
    """Seconds from every field a stream can tell, each with its own weight."""

    request_overhead_s: float = 0.0

    def step_time(self, shape: StepShape) -> float:
        return (0.010 + 3e-5 * shape.prefill_tokens + 7e-4 * shape.prefill_seqs + 4e-4 * shape.decode_seqs
                + 2e-7 * shape.decode_context_tokens + 1e-9 * shape.prefill_attention_tokens)


def served(n: int = 120, rate: float = 12.0, max_prompt: int = 600, budget: int = 2048, seed: int = 1,
           overhead_s: float = 0.004, num_blocks: int = 4000) -> tuple[list[Request], ShapeCost]:
    rng = random.Random(seed)
    t, requests = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        requests.append(Request(i, t, rng.randint(4, max_prompt), rng.randint(1, 60)))
    cost = ShapeCost(overhead_s)
    config = SchedulerConfig(policy="vllm", token_budget=budget, max_num_seqs=64)
    simulate(requests, lambda: make_policy(config, BlockManager(num_blocks, 16)), cost, make_router("round_robin"),
             token_times=True, exact_steps=True)
    return requests, cost


def priced_errors(requests: list[Request], cost: ShapeCost, **kw: object) -> tuple[list[float], int, dict]:
    read = read_steps(requests, cost.request_overhead_s, **kw)  # type: ignore[arg-type]
    clean = read.clean()
    return [s / cost.step_time(shape) - 1 for shape, s in clean], len(read.steps), read.excluded()


def test_clean_steps_have_the_shape_the_simulator_ran():
    requests, cost = served()
    errors, bursts, excluded = priced_errors(requests, cost, token_budget=2048)
    assert len(errors) > bursts / 2  # most steps of a moderate load are seen whole
    assert max(abs(e) for e in errors) < 1e-9
    assert excluded["first step of the run"] == 1
    assert sum(excluded.values()) + len(errors) == bursts


def test_a_burst_per_token_step():
    requests, cost = served()
    ends = {t for r in requests for t in r.token_times_s or ()}
    assert len(read_steps(requests, cost.request_overhead_s).steps) == len(ends)


def test_chunked_prompts_are_never_clean_with_the_wrong_shape():
    # prompts up to 3x the budget: many prefills run over several steps and send no token
    # until the last; every step read as clean must still price exactly.
    requests, cost = served(n=80, rate=6.0, max_prompt=1500, budget=512)
    errors, _, excluded = priced_errors(requests, cost, token_budget=512)
    assert errors and max(abs(e) for e in errors) < 1e-9
    assert excluded.get("beside a request it sent no token", 0) > 0


def test_preempted_requests_leave_their_steps_out():
    # a KV pool this small preempts (recompute): the request's next prefill sends no token
    requests, cost = served(n=80, rate=30.0, num_blocks=120)
    assert sum(r.preemptions for r in requests) > 0
    errors, _, _ = priced_errors(requests, cost, token_budget=2048)
    assert errors and max(abs(e) for e in errors) < 1e-9


def test_coalesced_chunks_and_delivery_jitter():
    requests, cost = served()
    rng = random.Random(7)
    coalesced = 0
    for r in requests:
        times = [t + rng.uniform(0, 3e-4) for t in r.token_times_s or ()]  # each stream written a little apart
        for i in range(1, len(times) - 1):
            if rng.random() < 0.05:  # token i late: it comes with token i + 1
                times[i] = times[i + 1]
                coalesced += 1
        r.token_times_s = sorted(times)
    assert coalesced > 20
    errors, bursts, _ = priced_errors(requests, cost, token_budget=2048)
    assert len(errors) > bursts / 3
    assert max(abs(e) for e in errors) < 0.1  # jitter of 0.3 ms on steps of 10 ms and more


def test_a_failed_request_leaves_the_steps_beside_it_out():
    requests, cost = served()
    victim = requests[40]
    victim.token_times_s = None
    read = read_steps(requests, cost.request_overhead_s)
    assert read.excluded()["beside a request without token times"] > 0
    assert max(abs(s / cost.step_time(shape) - 1) for shape, s in read.clean()) < 1e-9


@pytest.mark.parametrize("overhead_s", [0.0, 0.02])
def test_the_overhead_decides_who_was_waiting(overhead_s):
    requests, cost = served(overhead_s=overhead_s)
    errors, _, _ = priced_errors(requests, cost, token_budget=2048)
    assert errors and max(abs(e) for e in errors) < 1e-9


def test_admission_steps_tell_who_the_next_step_took():
    """The simulator schedules a request at the first step boundary after it reached the
    scheduler (arrival plus the overhead), so one that arrived during a step and reached it before
    that step's end was taken by the next step (1), and one that reached it later waited (2)."""
    requests, cost = served(overhead_s=0.004)
    read = read_steps(requests, cost.request_overhead_s)
    after = admission_steps(requests, read)
    ends = [s.end_s for s in read.steps]
    assert len(after) > len(requests) / 2 and set(after.values()) <= {1, 2} and 2 in after.values()
    by_id = {r.id: r for r in requests}
    for rid, n in after.items():
        r = by_id[rid]
        k = bisect.bisect_left(ends, r.arrival_s)  # the step it arrived in ended at ends[k]
        assert (n == 1) == (r.arrival_s + cost.request_overhead_s <= ends[k]), (rid, n)
