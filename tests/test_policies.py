"""Invariant, property-based and behavioural tests of every scheduling policy."""

from __future__ import annotations

import heapq

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cluster import make_router
from sim.cost import ConstantCost
from sim.engine import simulate
from sim.hardware import get_hardware
from sim.kv import BlockManager
from sim.metrics import summarize
from sim.models import get_model
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request, Status
from sim.roofline import RooflineCost
from tests.checks import CheckedPolicy, policy_matrix

COMBOS = policy_matrix()


def run(requests, config, num_blocks, block_size=4, host_blocks=0, cost=None, replicas=1, router="round_robin"):
    checked: list[CheckedPolicy] = []

    def factory():
        budget = config.token_budget if config.policy != "chunked" else (config.token_budget or 512)
        p = CheckedPolicy(make_policy(config, BlockManager(num_blocks, block_size, host_blocks)),
                          budget if config.policy == "chunked" else None)
        checked.append(p)
        return p

    # Step by step, so that the checking wrapper sees every step.
    result = simulate(requests, factory, cost or ConstantCost(0.01), make_router(router), replicas, exact_steps=True)
    return result, checked


request_lists = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=5, allow_nan=False),
        st.integers(min_value=1, max_value=120),
        st.integers(min_value=1, max_value=40),
        st.integers(min_value=0, max_value=2),
    ),
    min_size=1,
    max_size=30,
)


def make_requests(rows):
    rows = sorted(rows, key=lambda r: r[0])
    return [Request(i, a, p, o, pr) for i, (a, p, o, pr) in enumerate(rows)]


@pytest.mark.parametrize("policy,order,preempt", COMBOS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=request_lists, num_blocks=st.integers(min_value=4, max_value=60),
       budget=st.integers(min_value=8, max_value=64))
def test_every_request_finishes_or_is_rejected(policy, order, preempt, rows, num_blocks, budget):
    """Every request ends with exactly its output tokens or a reject reason; KV stays in bounds and drains."""
    requests = make_requests(rows)
    config = SchedulerConfig(policy=policy, order=order, preempt=preempt, max_num_seqs=8, batch_size=4,
                             max_wait_s=0.05, token_budget=budget if policy == "chunked" else None)
    result, checked = run(requests, config, num_blocks, host_blocks=num_blocks)
    for r in requests:
        if r.status is Status.FINISHED:
            assert r.num_generated == r.output_tokens
            assert r.arrival_s <= r.first_scheduled_s <= r.first_token_s <= r.finish_s
        else:
            assert r.status is Status.REJECTED and r.reject_reason
            # It cannot fit the pool (a policy may keep one block for itself: vLLM's null block).
            assert r.max_tokens > (num_blocks - 1) * 4
    for p in checked:
        assert p.kv.num_used == 0
        assert p.kv.num_host_used == 0
        assert p.max_kv_used <= num_blocks
        assert p.swapped_in_blocks == p.swapped_out_blocks
    if preempt != "swap":
        assert all(p.swapped_out_blocks == 0 for p in checked)
    assert result.num_preemptions == sum(r.preemptions for r in requests)


def lists_step_counts(outputs, batch_size):
    """Exact step counts for all-at-once arrivals, constant step cost, unlimited KV.

    static: batches in FCFS order, each runs as many steps as its longest output.
    continuous: a request holds its slot for exactly ``output`` steps (one prefill step that
    samples the first token, then one decode step per further token); a freed slot is refilled
    at the next step, so total steps is list scheduling of the outputs on ``batch_size`` slots.
    """
    static = sum(max(outputs[i:i + batch_size]) for i in range(0, len(outputs), batch_size))
    slots = [0] * batch_size
    for o in outputs:
        free_at = heapq.heappop(slots)
        heapq.heappush(slots, free_at + o)
    return static, max(slots)


def test_continuous_needs_far_fewer_steps_than_static():
    """100 requests at once, outputs uniform on 1..100: exact step counts for static and continuous."""
    rng = np.random.default_rng(7)
    outputs = [int(x) for x in rng.integers(1, 101, size=100)]
    batch = 8
    want_static, want_continuous = lists_step_counts(outputs, batch)
    counts = {}
    for policy in ("static", "continuous"):
        requests = [Request(i, 0.0, 20, o) for i, o in enumerate(outputs)]
        config = SchedulerConfig(policy=policy, batch_size=batch, max_num_seqs=batch, preempt="off")
        result, _ = run(requests, config, num_blocks=100_000, block_size=16)
        counts[policy] = result.replicas[0].steps
    assert counts["static"] == want_static
    assert counts["continuous"] == want_continuous
    assert counts["continuous"] < 0.75 * counts["static"]


@pytest.mark.parametrize("preempt", ["recompute", "swap"])
@pytest.mark.parametrize("policy", ["continuous", "chunked"])
def test_preemption_finishes_everything_when_kv_is_short(policy, preempt):
    """With KV too small for all running requests, both preemption modes finish every request."""
    requests = [Request(i, 0.0, 30, 60) for i in range(12)]
    config = SchedulerConfig(policy=policy, preempt=preempt, max_num_seqs=12,
                             token_budget=64 if policy == "chunked" else None)
    result, checked = run(requests, config, num_blocks=60, block_size=4, host_blocks=400)
    assert all(r.status is Status.FINISHED and r.num_generated == 60 for r in requests)
    assert result.num_preemptions > 0
    summary = summarize(result.requests, result.itl(), num_preemptions=result.num_preemptions)
    assert summary["num_preemptions"] == result.num_preemptions == sum(r.preemptions for r in requests)
    if preempt == "swap":
        assert checked[0].swapped_out_blocks > 0


def test_huge_request_is_rejected_with_a_reason():
    """A request larger than the whole KV capacity is rejected and counted; the others finish."""
    requests = [Request(0, 0.0, 10, 5), Request(1, 0.1, 1000, 5), Request(2, 0.2, 10, 5)]
    result, _ = run(requests, SchedulerConfig(policy="continuous"), num_blocks=20, block_size=4)
    assert requests[1].status is Status.REJECTED
    assert "KV blocks" in requests[1].reject_reason
    summary = summarize(result.requests, result.itl())
    assert summary["rejected"] == 1 and summary["completed"] == 2


def test_hammering_long_and_short_requests_ends():
    """Long and short requests under tight KV and preemption all finish: nobody starves."""
    rng = np.random.default_rng(3)
    requests = []
    for i in range(300):
        long = i % 10 == 0
        requests.append(Request(i, i * 0.002, int(rng.integers(150, 250)) if long else int(rng.integers(5, 30)),
                                int(rng.integers(50, 120)) if long else int(rng.integers(1, 20))))
    for policy in ("continuous", "chunked"):
        for preempt in ("recompute", "swap"):
            fresh = [Request(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests]
            config = SchedulerConfig(policy=policy, preempt=preempt, max_num_seqs=32,
                                     token_budget=96 if policy == "chunked" else None)
            run(fresh, config, num_blocks=100, block_size=4, host_blocks=100)
            assert all(r.status is Status.FINISHED for r in fresh)


def roofline_7b():
    return RooflineCost(get_model("qwen2.5-7b"), get_hardware("h100-sxm"))


def test_chunked_prefill_lowers_p99_itl_with_a_few_long_prompts():
    """A few very long prompts among many short requests: chunked gives a lower p99 ITL than continuous."""
    rng = np.random.default_rng(11)
    rows = []
    t = 0.0
    for i in range(400):
        t += float(rng.exponential(1 / 20))
        long = i % 25 == 0
        rows.append((t, 8000 if long else int(rng.integers(50, 300)), int(rng.integers(50, 200))))
    p99 = {}
    for policy in ("continuous", "chunked"):
        requests = [Request(i, a, p, o) for i, (a, p, o) in enumerate(rows)]
        config = SchedulerConfig(policy=policy, token_budget=512 if policy == "chunked" else None)
        result, _ = run(requests, config, num_blocks=20_000, block_size=16, cost=roofline_7b())
        p99[policy] = summarize(result.requests, result.itl())["p99_itl_ms"]
    assert p99["chunked"] < p99["continuous"]


def test_priority_serves_high_priority_first_under_overload():
    """Under overload, high-priority requests' mean TTFT is below low-priority ones'."""
    rng = np.random.default_rng(5)
    requests = [Request(i, i * 0.01, int(rng.integers(100, 500)), int(rng.integers(50, 150)), priority=i % 2)
                for i in range(400)]
    config = SchedulerConfig(policy="continuous", order="priority", preempt="recompute", max_num_seqs=16)
    _result, _ = run(requests, config, num_blocks=400, block_size=16, cost=roofline_7b())
    ttft = {0: [], 1: []}
    for r in requests:
        ttft[r.priority].append(r.first_token_s - r.arrival_s)
    assert np.mean(ttft[0]) < 0.5 * np.mean(ttft[1])


@pytest.mark.parametrize("router", ["round_robin", "least_loaded", "least_kv"])
def test_replicas_share_the_load(router):
    """Several replicas: every request finishes and each replica serves some of them."""
    requests = [Request(i, i * 0.001, 50, 20) for i in range(60)]
    result, checked = run(requests, SchedulerConfig(policy="continuous"), num_blocks=200, replicas=3, router=router)
    served = {r.replica for r in requests}
    assert served == {0, 1, 2}
    assert all(r.status is Status.FINISHED for r in requests)
    assert sum(s.steps for s in result.replicas) == sum(p.steps for p in checked)
