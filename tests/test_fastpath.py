"""The fast path (runs of decode steps priced at once) gives the answers of stepping every iteration."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cluster import make_router
from sim.engine import simulate
from sim.fastpath import fast_variant
from sim.hardware import get_hardware
from sim.kv import BlockManager
from sim.metrics import summarize
from sim.models import get_model
from sim.policies import POLICIES, SchedulerConfig, make_policy
from sim.request import Request
from sim.roofline import RooflineCost
from tests.test_policies import COMBOS

COST = RooflineCost(get_model("qwen2.5-0.5b"), get_hardware("l4"))

rows_strategy = st.lists(
    st.tuples(
        st.floats(min_value=0, max_value=3, allow_nan=False),
        st.integers(min_value=1, max_value=200),
        st.integers(min_value=1, max_value=80),
        st.integers(min_value=0, max_value=2),
    ),
    min_size=1,
    max_size=40,
)


def run_both(rows, config, num_blocks, replicas=1, router="round_robin"):
    rows = sorted(rows, key=lambda r: r[0])
    out = []
    for exact in (True, False):
        requests = [Request(i, a, p, o, pr) for i, (a, p, o, pr) in enumerate(rows)]
        result = simulate(requests, lambda: make_policy(config, BlockManager(num_blocks, 8, num_blocks)), COST,
                          make_router(router), replicas, exact_steps=exact)
        out.append(result)
    return out


def took_fast_path(result) -> bool:
    return all(s.fast_path for s in result.replicas)


def close(a, b):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def assert_same(exact, fast, fast_path=True):
    """Same answers; ``fast`` really ran the fast variants (``fast_path``) and ``exact`` did not."""
    assert not any(s.fast_path or s.run_steps for s in exact.replicas)
    assert took_fast_path(fast) == fast_path
    assert sum(s.steps for s in exact.replicas) == sum(s.steps for s in fast.replicas)
    assert exact.num_preemptions == fast.num_preemptions
    for a, b in zip(exact.requests, fast.requests, strict=True):
        assert (a.status, a.num_generated, a.preemptions, a.replica) == (b.status, b.num_generated, b.preemptions,
                                                                          b.replica)
        for field in ("first_scheduled_s", "first_token_s", "last_token_s", "finish_s"):
            assert close(getattr(a, field), getattr(b, field)), (a.id, field, getattr(a, field), getattr(b, field))
    sa, sb = summarize(exact.requests, exact.itl()), summarize(fast.requests, fast.itl())
    for key, value in sa.items():
        if isinstance(value, float):
            assert close(value, sb[key]), key
        else:
            assert value == sb[key], key


@pytest.mark.parametrize("policy,order,preempt", COMBOS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, num_blocks=st.integers(min_value=30, max_value=200))
def test_fast_path_matches_exact_steps(policy, order, preempt, rows, num_blocks):
    """Every policy x order x preemption: same tokens, preemptions, timestamps and metrics in both modes
    (a policy without a fast variant is stepped in both)."""
    config = SchedulerConfig(policy=policy, order=order, preempt=preempt, max_num_seqs=6, batch_size=4,
                             max_wait_s=0.02, token_budget=48 if policy == "chunked" else None)
    exact, fast = run_both(rows, config, num_blocks)
    assert_same(exact, fast, fast_path=fast_variant(make_policy(config, BlockManager(num_blocks, 8))) is not None)


@pytest.mark.parametrize("router", ["round_robin", "least_loaded", "least_kv"])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy)
def test_fast_path_matches_with_replicas(router, rows):
    """Several replicas behind each router: the fast path routes and serves exactly as step mode does."""
    config = SchedulerConfig(policy="chunked", preempt="swap", max_num_seqs=5, token_budget=64)
    exact, fast = run_both(rows, config, num_blocks=40, replicas=3, router=router)
    assert_same(exact, fast)


def test_fast_path_takes_fewer_scheduling_decisions():
    """On a decode-heavy workload the fast path asks the scheduler far less often than it steps."""
    rows = [(i * 0.5, 64, 400, 0) for i in range(10)]
    config = SchedulerConfig(policy="continuous")
    exact, fast = run_both(rows, config, num_blocks=2000)
    assert_same(exact, fast)
    decisions = len(fast.replicas[0].timeseries.time_s)
    assert decisions * 10 < fast.replicas[0].steps


@pytest.mark.parametrize("policy", ["static", "continuous", "chunked"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 60), st.integers(1, 30)), min_size=1, max_size=30))
def test_fast_path_matches_when_arrivals_tie_with_step_ends(policy, slots):
    """Arrivals exactly at step ends (binary-exact times) are seen at the same decision in both modes."""
    from sim.cost import ConstantCost

    rows = sorted((k * 0.25, p, o, 0) for k, p, o in slots)
    config = SchedulerConfig(policy=policy, preempt="off" if policy == "static" else "recompute", max_num_seqs=4,
                             batch_size=3, max_wait_s=0.5, token_budget=32 if policy == "chunked" else None)
    out = []
    for exact in (True, False):
        requests = [Request(i, a, p, o) for i, (a, p, o, _) in enumerate(rows)]
        out.append(simulate(requests, lambda: make_policy(config, BlockManager(40, 8)), ConstantCost(0.25),
                            make_router("round_robin"), 1, exact_steps=exact))
    assert_same(*out)


@pytest.mark.parametrize("router", ["least_kv", "least_loaded"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 60), st.integers(1, 40)), min_size=1, max_size=30))
def test_fast_path_matches_when_arrivals_tie_with_runs_on_replicas(router, slots):
    """Arrivals exactly at step ends are routed on the same loads in both modes, KV blocks included."""
    from sim.cost import ConstantCost

    rows = sorted((k * 0.25, p, o, 0) for k, p, o in slots)
    config = SchedulerConfig(policy="chunked", max_num_seqs=4, token_budget=32)
    out = []
    for exact in (True, False):
        requests = [Request(i, a, p, o) for i, (a, p, o, _) in enumerate(rows)]
        out.append(simulate(requests, lambda: make_policy(config, BlockManager(60, 4)), ConstantCost(0.25),
                            make_router(router), 2, exact_steps=exact))
    assert_same(*out)


@pytest.mark.parametrize("policy", ["static", "continuous", "chunked"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, num_blocks=st.integers(min_value=30, max_value=200))
def test_fast_path_token_times_match(policy, rows, num_blocks):
    """With per-token times kept, both modes give every request the same token timestamps."""
    config = SchedulerConfig(policy=policy, preempt="off" if policy == "static" else "recompute", max_num_seqs=6,
                             batch_size=4, max_wait_s=0.02, token_budget=48 if policy == "chunked" else None)
    rows = sorted(rows, key=lambda r: r[0])
    out = []
    for exact in (True, False):
        requests = [Request(i, a, p, o, pr) for i, (a, p, o, pr) in enumerate(rows)]
        out.append(simulate(requests, lambda: make_policy(config, BlockManager(num_blocks, 8, num_blocks)), COST,
                            make_router("round_robin"), token_times=True, exact_steps=exact))
    assert_same(*out)
    for a, b in zip(out[0].requests, out[1].requests, strict=True):
        assert a.token_times_s is not None and b.token_times_s is not None
        assert len(a.token_times_s) == len(b.token_times_s) == b.num_generated
        assert all(close(x, y) for x, y in zip(a.token_times_s, b.token_times_s, strict=True))
        if b.token_times_s:
            assert b.token_times_s[-1] == b.last_token_s and b.token_times_s[0] == b.first_token_s


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=rows_strategy, budget=st.integers(min_value=1, max_value=5))
def test_fast_path_steps_with_a_budget_below_max_num_seqs(rows, budget):
    """A token budget smaller than max_num_seqs (some decodes wait a step) rules the fast path out:
    the simulator steps every iteration, with step mode's answers."""
    config = SchedulerConfig(policy="chunked", max_num_seqs=6, token_budget=budget)
    exact, fast = run_both(rows, config, num_blocks=100)
    assert_same(exact, fast, fast_path=False)
    assert not any(s.run_steps for s in fast.replicas)


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_fast_path_runs_steps_at_once(policy):
    """Every registered policy with a fast variant prices most decode steps in runs, with step mode's answers."""
    from sim.workload import SyntheticWorkload

    config = SchedulerConfig(policy=policy, max_num_seqs=64, batch_size=8, max_wait_s=0.2)
    workload = SyntheticWorkload(arrival="poisson", rate=4.0, num_requests=60, prompt_dist="uniform:16:256",
                                 output_dist="uniform:16:128", seed=3)
    out = []
    for exact in (True, False):
        out.append(simulate(workload.generate(), lambda: make_policy(config, BlockManager(2000, 16)), COST,
                            make_router("round_robin"), 1, exact_steps=exact))
    exact, fast = out
    assert_same(exact, fast, fast_path=fast_variant(make_policy(config, BlockManager(2000, 16))) is not None)
    if took_fast_path(fast):
        steps = fast.replicas[0].steps
        assert fast.replicas[0].run_steps > steps // 2, (fast.replicas[0].run_steps, steps)


@settings(max_examples=200, deadline=None)
@given(decodes=st.integers(0, 300), context=st.integers(0, 10**6), prefill=st.integers(0, 4096),
       prefill_context=st.integers(0, 10**5), swap=st.integers(0, 4096), n=st.integers(1, 80))
def test_roofline_run_times_identical_to_step_time(decodes, context, prefill, prefill_context, swap, n):
    """The roofline's run pricing (loop or numpy) equals step_time of each step, to the bit."""
    from dataclasses import replace

    from sim.batch import StepShape
    from sim.cost import decode_run_times

    shape = StepShape(prefill_tokens=prefill, prefill_seqs=1 if prefill else 0,
                      prefill_context_tokens=prefill_context if prefill else 0, decode_seqs=decodes,
                      decode_context_tokens=context, swap_in_tokens=swap)
    run = decode_run_times(COST, shape, n)
    assert run == [COST.step_time(replace(shape, decode_context_tokens=context + j * decodes)) for j in range(n)]


@pytest.mark.parametrize("policy", ["continuous", "chunked"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.lists(st.tuples(st.integers(0, 8), st.integers(1, 40), st.integers(1, 30)), min_size=1, max_size=20),
       budget=st.integers(min_value=6, max_value=12))
def test_fast_path_matches_with_a_tight_token_budget(policy, slots, budget):
    """A budget that prefill chunks use up exactly (other prefills left for the next step) matches step mode."""
    rows = sorted((k * 0.01, p, o, 0) for k, p, o in slots)
    config = SchedulerConfig(policy=policy, max_num_seqs=6, token_budget=budget if policy == "chunked" else 64)
    exact, fast = run_both(rows, config, num_blocks=200)
    assert_same(exact, fast)
