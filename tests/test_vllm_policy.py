"""The ``vllm`` policy against vLLM's own scheduler, and its invariants.

``tests/data/vllm_scheduler_cases.json`` holds vLLM v1's decisions on scripted cases, recorded by
``experiments/vllm_scheduler_cases.py`` from ``vllm.v1.core.sched.scheduler.Scheduler`` itself
(the vLLM version is in the file). The replay here needs no vLLM: each case's requests go
through servesim's ``vllm`` policy one step at a time and every step must schedule the same
tokens per request in the same order, preempt and finish the same requests and leave the same
number of KV blocks free. The live regeneration at the end runs only with a vLLM python
(``SERVESIM_VLLM_PYTHON``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sim.cluster import make_router
from sim.cost import ConstantCost
from sim.engine import simulate
from sim.kv import BlockManager
from sim.policies import SchedulerConfig, make_policy
from sim.policies.vllm import NULL_BLOCKS, VLLM_VERSION
from sim.request import Request, Status
from tests.checks import CheckedPolicy

ROOT = Path(__file__).resolve().parents[1]
CASES_FILE = ROOT / "tests" / "data" / "vllm_scheduler_cases.json"
CASES = json.loads(CASES_FILE.read_text())


def config_for(s: dict) -> SchedulerConfig:
    """servesim's scheduler config for a case's vLLM settings."""
    return SchedulerConfig(policy="vllm", order=s["policy"], max_num_seqs=s["max_num_seqs"],
                           token_budget=s["max_num_batched_tokens"], max_model_len=s["max_model_len"],
                           long_prefill_token_threshold=s["long_prefill_token_threshold"],
                           kv_watermark=s["watermark"])


def vllm_steps(case: dict) -> list[dict]:
    """vLLM's steps as our ``schedule`` calls see them. An empty vLLM step that only preempted
    (vLLM's next step then schedules the rest; our policy runs that next step in the same call)
    folds into the step after it: its preemptions join that step's, and ``last_step`` says up to
    which vLLM step's arrivals the call sees."""
    steps: list[dict] = []
    carried: list[int] = []
    for s in case["steps"]:
        if not s["scheduled"] and s["preempted"]:
            carried += s["preempted"]
            continue
        steps.append({**s, "preempted": sorted(carried + s["preempted"]), "last_step": s["step"]})
        carried = []
    return steps


def replay(case: dict, want: list[dict]) -> list[dict]:
    """The case's requests through the ``vllm`` policy, one ``schedule`` call per step of
    ``want``, recorded as the script records vLLM's."""
    s = case["settings"]
    kv = BlockManager(s["num_gpu_blocks"], s["block_size"])
    policy = make_policy(config_for(s), kv)
    pending = sorted(case["requests"], key=lambda r: (r["arrival_step"], r["id"]))
    requests = []
    steps = []
    for w in want:
        k = w["last_step"]
        while pending and pending[0]["arrival_step"] <= k:
            r = pending.pop(0)
            req = Request(r["id"], float(r["arrival_step"]), r["prompt_tokens"], r["output_tokens"], r["priority"])
            requests.append(req)
            policy.add(req, float(k))
            assert req.status is Status.WAITING, req.reject_reason
        batch = policy.schedule(float(k))
        record = {"step": w["step"], "last_step": k, "scheduled": [], "preempted": [],
                  "free_blocks": kv.num_free - NULL_BLOCKS, "finished": []}
        if batch is not None:
            record["scheduled"] = [[seq.request.id, seq.num_new_tokens] for seq in batch.seqs]
            record["preempted"] = sorted(r.id for r in batch.preempted)
            record["finished"] = sorted(r.id for r in policy.on_step_done(batch, k + 0.5))
        steps.append(record)
    assert all(r.status is Status.FINISHED for r in requests) and not pending
    assert kv.num_used == 0, "blocks leaked"
    return steps


def test_cases_come_from_the_mirrored_vllm():
    """The recorded decisions are from the vLLM version the policy says it mirrors, with no prefix
    caching and one null block, and the cases exercise what they are named for."""
    assert CASES["vllm_version"] == VLLM_VERSION
    assert CASES["null_blocks"] == NULL_BLOCKS
    by_name = {c["name"]: c for c in CASES["cases"]}
    preempting = {n for n, c in by_name.items() if any(s["preempted"] for s in c["steps"])}
    assert {"preempt_last_running_fcfs", "priority_preemption"} <= preempting
    chunk = by_name["chunked_prefill_small_budget"]["steps"][0]["scheduled"]
    assert chunk == [[0, 16]]  # a 30-token prompt cut to the 16-token budget


@pytest.mark.parametrize("case", CASES["cases"], ids=[c["name"] for c in CASES["cases"]])
def test_decisions_match_vllm_step_by_step(case):
    """Every step schedules the same tokens per request in vLLM's order, preempts and finishes the
    same requests, and leaves the same KV blocks free as vLLM's own scheduler did."""
    want = vllm_steps(case)
    got = replay(case, want)
    for w, g in zip(want, got, strict=True):
        assert g == w, f"{case['name']}: vLLM step {w['step']} differs"


def test_only_vllm_orders_and_recompute():
    """vLLM has FCFS and priority queues and preempts only by recompute: other settings are
    refused, naming the field."""
    with pytest.raises(ValueError, match="order must be one of fcfs, priority"):
        SchedulerConfig(policy="vllm", order="sjf")
    with pytest.raises(ValueError, match="preempt must be"):
        SchedulerConfig(policy="vllm", preempt="swap")
    with pytest.raises(ValueError, match="kv_watermark"):
        SchedulerConfig(policy="vllm", kv_watermark=1.0)
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        SchedulerConfig(policy="vllm", long_prefill_token_threshold=-1)
    config = SchedulerConfig(policy="vllm")
    assert config.preempt == "recompute" and config.token_budget == 2048


def test_a_request_that_cannot_fit_beside_the_null_block_is_rejected():
    """A sequence needing every block is rejected: one of vLLM's blocks is its null block."""
    policy = make_policy(SchedulerConfig(policy="vllm"), BlockManager(4, 4))
    fits, too_big = Request(0, 0.0, 10, 3), Request(1, 0.0, 12, 2)  # 12 and 13 cached tokens
    policy.add(fits, 0.0)
    policy.add(too_big, 0.0)
    assert fits.status is Status.WAITING
    assert too_big.status is Status.REJECTED and "null block" in (too_big.reject_reason or "")


def test_priority_preemption_of_the_first_running_request_runs_the_next_step():
    """When the lowest-priority request is the first running one and must preempt itself, vLLM's
    step is empty and its next one schedules the rest: one schedule call here returns that step."""
    kv = BlockManager(5, 4)  # 4 usable blocks
    policy = make_policy(SchedulerConfig(policy="vllm", order="priority", token_budget=64), kv)
    low, high = Request(0, 0.0, 7, 4, priority=1), Request(1, 1.0, 7, 4, priority=0)
    policy.add(low, 0.0)
    batch = policy.schedule(0.0)  # low admitted alone: 2 blocks
    policy.on_step_done(batch, 0.5)
    policy.add(high, 1.0)
    batch = policy.schedule(1.0)  # low decodes into its 2 blocks; high admitted: 2 blocks
    policy.on_step_done(batch, 1.5)
    assert [s.request.id for s in batch.seqs] == [0, 1]
    # low (first in running) needs a third block for its 9th token; none is free and it is the
    # lowest priority, so it preempts itself; high then decodes in the same call.
    batch = policy.schedule(2.0)
    assert batch is not None
    assert [r.id for r in batch.preempted] == [0]
    assert [(s.request.id, s.num_new_tokens) for s in batch.seqs] == [(1, 1)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.lists(st.tuples(st.floats(0, 5, allow_nan=False), st.integers(1, 120), st.integers(1, 40),
                               st.integers(0, 2)), min_size=1, max_size=30),
       num_blocks=st.integers(4, 60), budget=st.integers(8, 64), order=st.sampled_from(["fcfs", "priority"]),
       threshold=st.sampled_from([0, 8]), watermark=st.sampled_from([0.0, 0.1]))
def test_every_request_finishes_or_is_rejected(rows, num_blocks, budget, order, threshold, watermark):
    """Every request ends with exactly its output tokens or a reject reason; KV stays in bounds,
    every scheduled token has a block and the pool drains."""
    rows = sorted(rows, key=lambda r: r[0])
    requests = [Request(i, a, p, o, pr) for i, (a, p, o, pr) in enumerate(rows)]
    config = SchedulerConfig(policy="vllm", order=order, max_num_seqs=8, token_budget=budget,
                             long_prefill_token_threshold=threshold, kv_watermark=watermark)
    checked: list[CheckedPolicy] = []

    def factory():
        checked.append(CheckedPolicy(make_policy(config, BlockManager(num_blocks, 4)), budget))
        return checked[-1]

    simulate(requests, factory, ConstantCost(0.01), make_router("round_robin"), 1, exact_steps=True)
    for r in requests:
        if r.status is Status.FINISHED:
            assert r.num_generated == r.output_tokens
            assert r.arrival_s <= r.first_scheduled_s <= r.first_token_s <= r.finish_s
        else:
            assert r.status is Status.REJECTED and r.reject_reason
    kv = checked[0].inner.kv
    assert kv.num_used == 0
    assert checked[0].max_kv_used <= num_blocks - NULL_BLOCKS


VLLM_PYTHON = os.environ.get("SERVESIM_VLLM_PYTHON")


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON, reason="SERVESIM_VLLM_PYTHON with vllm not given")
def test_checked_in_cases_are_what_vllm_decides_now(tmp_path):
    """Regenerating the cases with the installed vLLM gives the checked-in decisions."""
    out = tmp_path / "cases.json"
    assert VLLM_PYTHON is not None
    proc = subprocess.run([VLLM_PYTHON, str(ROOT / "experiments" / "vllm_scheduler_cases.py"), "-o", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(out.read_text())
    if fresh["vllm_version"] != CASES["vllm_version"]:
        pytest.skip(f"vLLM {fresh['vllm_version']} installed; the cases are from {CASES['vllm_version']}")
    assert fresh["cases"] == CASES["cases"], "vLLM's decisions moved: rerun the script and check the policy"
