"""A served engine's per-request cost before its scheduler (``request_overhead_s``): measured by a
black-box calibration, kept in the profile, and priced by the simulator as a delay from each
request's arrival to its admission."""

from __future__ import annotations

import json

import pytest

from calibrate.calibration import profile_from_samples
from calibrate.profile import CalibratedCost, ProfileError, load_profile, save_profile
from calibrate.samples import Sample
from calibrate.vllm_calibration import profile_from_engine
from sim.batch import StepShape
from sim.cluster import make_router
from sim.cost import ConstantCost, request_overhead_s
from sim.engine import simulate
from sim.kv import BlockManager
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request

SAMPLES = [
    Sample(StepShape(64, 1, 0, 0, 0), 3.0), Sample(StepShape(512, 1, 0, 0, 0), 9.0),
    Sample(StepShape(256, 2, 512, 0, 0), 8.0), Sample(StepShape(0, 0, 0, 8, 800), 2.5),
    Sample(StepShape(0, 0, 0, 64, 64_000), 12.0), Sample(StepShape(128, 1, 0, 16, 4000), 6.0),
]


class FrontendCost(ConstantCost):
    """Every step 0.25 s; every request reaches the scheduler 0.125 s after it arrives."""

    request_overhead_s = 0.125


def run(cost, exact_steps: bool) -> list[Request]:
    requests = [Request(0, 0.0, 8, 3), Request(1, 0.5, 8, 2), Request(2, 4.0, 8, 1)]
    simulate(requests, lambda: make_policy(SchedulerConfig("continuous"), BlockManager(64, 16)), cost,
             make_router("round_robin"), exact_steps=exact_steps)
    return requests


@pytest.mark.parametrize("exact_steps", [True, False])
def test_admission_waits_for_the_overhead(exact_steps):
    """A request is scheduled overhead seconds after it arrives; TTFT and E2EL include it."""
    plain, delayed = run(ConstantCost(0.25), exact_steps), run(FrontendCost(0.25), exact_steps)
    # Request 0 alone: prefill (its first token) at 0.125 + 0.25, two decodes after it.
    assert delayed[0].first_scheduled_s == 0.125
    assert delayed[0].first_token_s == 0.375
    assert delayed[0].finish_s == 0.875
    assert plain[0].first_token_s == 0.25
    # Request 2 arrives to an idle engine: its times shift by exactly the overhead.
    assert delayed[2].first_token_s - delayed[2].arrival_s == plain[2].first_token_s - plain[2].arrival_s + 0.125
    assert [r.arrival_s for r in delayed] == [0.0, 0.5, 4.0]


def test_fast_path_and_exact_steps_agree_with_an_overhead():
    """The fast path watches admissions, not arrivals: both modes give the same timestamps."""
    fast, exact = run(FrontendCost(0.25), False), run(FrontendCost(0.25), True)
    assert [(r.first_token_s, r.finish_s) for r in fast] == [(r.first_token_s, r.finish_s) for r in exact]


def test_a_bad_overhead_is_refused():
    """A negative or non-finite overhead on a cost model is a ValueError naming it."""
    cost = ConstantCost(0.25)
    cost.request_overhead_s = -1.0  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="request_overhead_s"):
        request_overhead_s(cost)


def test_profile_keeps_the_overhead(tmp_path):
    """Saved and loaded, the overhead reaches CalibratedCost; a file without it reads as 0."""
    profile = profile_from_samples(SAMPLES, "test.csv", model="tiny", dtype="float32", kv_memory_bytes=2**26)
    assert CalibratedCost(profile).request_overhead_s == 0.0
    profile.request_overhead_s = 0.0115
    path = tmp_path / "p.json"
    save_profile(profile, path)
    assert request_overhead_s(CalibratedCost(load_profile(path))) == 0.0115
    data = json.loads(path.read_text())
    del data["request_overhead_s"]
    path.write_text(json.dumps(data))
    assert load_profile(path).request_overhead_s == 0.0
    data["request_overhead_s"] = -0.5
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="request_overhead_s"):
        load_profile(path)


def test_black_box_profile_takes_the_measured_overhead():
    """A --url calibration's measured per-request cost becomes the profile's; in process it is 0."""
    info = {"engine": "vllm", "mode": "http", "device": "cpu", "model": "small",
            "settings": {"block_size": 128, "num_gpu_blocks": 100}, "measured": {"overhead_ms": 11.5}}
    served = profile_from_engine(SAMPLES, info, source="vllm:test", grid="vllm-http", calibration_s=1.0)
    assert served.request_overhead_s == 0.0115
    inproc = profile_from_engine(SAMPLES, info | {"mode": "in-process", "measured": None}, source="vllm:test",
                                 grid="vllm-quick", calibration_s=1.0)
    assert inproc.request_overhead_s == 0.0
