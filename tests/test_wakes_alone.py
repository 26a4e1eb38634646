"""Requests that reach an idle served engine together start it one at a time (``wakes_alone``):
measured by a black-box calibration's bursts, kept in the profile, mirrored by the simulator."""

from __future__ import annotations

import json

import pytest

from calibrate.profile import CalibratedCost, ProfileError, load_profile, save_profile
from calibrate.vllm_calibration import profile_from_engine
from sim.cluster import make_router
from sim.cost import ConstantCost, ScaledCost, wakes_alone
from sim.engine import simulate
from sim.kv import BlockManager
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request
from tests.test_request_overhead import SAMPLES


class Served(ConstantCost):
    """Every step 0.25 s, on an engine whose idle core steps on the first request it gets."""

    wakes_alone = True


def run(cost, policy: str, exact_steps: bool) -> list[Request]:
    """Three requests at once to an idle engine; then, at 2.1 s (inside a step of request 3's
    decode), three more at once."""
    requests = [Request(i, 0.0, 8, 2) for i in range(3)] + [Request(3, 1.0, 8, 12)]
    requests += [Request(4 + i, 2.1, 8, 2) for i in range(3)]
    config = SchedulerConfig(policy, token_budget=2048) if policy == "vllm" else SchedulerConfig(policy)
    simulate(requests, lambda: make_policy(config, BlockManager(256, 16)), cost, make_router("round_robin"),
             exact_steps=exact_steps)
    return requests


@pytest.mark.parametrize("policy", ["vllm", "continuous", "chunked"])
@pytest.mark.parametrize("exact_steps", [True, False])
def test_the_first_of_a_burst_to_an_idle_engine_steps_alone(policy, exact_steps):
    plain, served = run(ConstantCost(0.25), policy, exact_steps), run(Served(0.25), policy, exact_steps)
    assert [r.first_token_s for r in plain[:3]] == [0.25, 0.25, 0.25]
    assert [r.first_token_s for r in served[:3]] == [0.25, 0.5, 0.5]
    # A burst that finds the engine busy joins the next step together, as without the rule.
    assert {r.first_scheduled_s for r in served[4:]} == {r.first_scheduled_s for r in plain[4:]} == {2.25}
    assert [r.first_token_s for r in served[4:]] == [r.first_token_s for r in plain[4:]]


def test_a_scaled_profile_wakes_as_its_engine_does():
    """Pricing at the device's speed scales the steps, not how the engine takes its arrivals."""
    assert wakes_alone(ScaledCost(Served(0.25), 1.1)) and not wakes_alone(ScaledCost(ConstantCost(0.25), 1.1))


def test_fast_path_and_exact_steps_agree_when_waking_alone():
    for policy in ("continuous", "chunked"):
        fast, exact = run(Served(0.25), policy, False), run(Served(0.25), policy, True)
        assert [(r.first_token_s, r.finish_s) for r in fast] == [(r.first_token_s, r.finish_s) for r in exact]


def test_the_profile_keeps_it_from_the_calibrations_bursts(tmp_path):
    info = {"engine": "vllm", "device": "cpu", "settings": {"block_size": 128, "num_gpu_blocks": 100},
            "measured": {"overhead_ms": 4.0, "burst": {"size": 8, "first_alone": [True, True, False],
                                                       "wakes_alone": True}}}
    profile = profile_from_engine(SAMPLES, info, source="vllm:test", grid="vllm-http-quick", calibration_s=1.0,
                                  folds=2)
    assert profile.wakes_alone and wakes_alone(CalibratedCost(profile))
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").wakes_alone is True
    data = json.loads((tmp_path / "p.json").read_text())
    del data["wakes_alone"]  # a profile from before it was kept: False
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "old.json").wakes_alone is False
    data["wakes_alone"] = "yes"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="wakes_alone"):
        load_profile(tmp_path / "bad.json")
    info["measured"].pop("burst")
    assert not profile_from_engine(SAMPLES, info, source="vllm:test", grid="g", calibration_s=1.0, folds=2).wakes_alone
