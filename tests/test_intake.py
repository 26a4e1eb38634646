"""A served engine's frontend hands requests to its scheduler one at a time (``intake_gap_s``):
measured by a black-box calibration's bursts, kept in the profile, mirrored by the simulator."""

from __future__ import annotations

import json

import pytest

from calibrate.profile import LEGACY_WAKE_GAP_S, CalibratedCost, ProfileError, load_profile, save_profile
from calibrate.stream_steps import read_steps
from calibrate.vllm_blackbox import intake_bounds
from calibrate.vllm_calibration import profile_from_engine
from sim.cluster import make_router
from sim.cost import ConstantCost, ScaledCost, intake_gap_s
from sim.engine import simulate
from sim.kv import BlockManager
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request
from tests.test_request_overhead import SAMPLES


class Served(ConstantCost):
    """Every step 0.25 s, behind a frontend that takes a request in every ``intake_gap_s``."""

    def __init__(self, step_s: float, gap_s: float) -> None:
        super().__init__(step_s)
        self.intake_gap_s = gap_s


def run(cost, policy: str, exact_steps: bool, burst: int = 3, token_times: bool = False) -> list[Request]:
    """``burst`` requests at once to an idle engine; then, at 2.1 s (inside a step of request
    ``burst``'s decode), three more at once."""
    requests = [Request(i, 0.0, 8, 2) for i in range(burst)] + [Request(burst, 1.0, 8, 12)]
    requests += [Request(burst + 1 + i, 2.1, 8, 2) for i in range(3)]
    config = SchedulerConfig(policy, token_budget=2048) if policy == "vllm" else SchedulerConfig(policy)
    simulate(requests, lambda: make_policy(config, BlockManager(256, 16)), cost, make_router("round_robin"),
             exact_steps=exact_steps, token_times=token_times)
    return requests


@pytest.mark.parametrize("policy", ["vllm", "continuous", "chunked"])
@pytest.mark.parametrize("exact_steps", [True, False])
def test_the_first_of_a_burst_to_an_idle_engine_steps_alone(policy, exact_steps):
    plain, served = run(ConstantCost(0.25), policy, exact_steps), run(Served(0.25, 0.01), policy, exact_steps)
    assert [r.first_token_s for r in plain[:3]] == [0.25, 0.25, 0.25]
    assert [r.first_token_s for r in served[:3]] == [0.25, 0.5, 0.5]
    # A burst that finds the engine busy and comes in within the step joins the next step together.
    assert {r.first_scheduled_s for r in served[4:]} == {r.first_scheduled_s for r in plain[4:]} == {2.25}
    assert [r.first_token_s for r in served[4:]] == [r.first_token_s for r in plain[4:]]


@pytest.mark.parametrize("exact_steps", [True, False])
def test_a_burst_is_taken_in_whole_once_its_last_request_is_in(exact_steps):
    """Behind a 0.11 s gap the last of 12 requests sent at once is in at 1.21 s: the idle engine
    steps on the first alone, and the other 11 start together in the step after 1.21 s. Three sent
    at once at 2.6 s, while those decode, are in by 2.82 s and wait whole for the step at 3.0 s.
    (Without a gap all 12 start at once and are done by 2.0 s; the three start when they come.)"""
    def served(cost) -> list[Request]:
        requests = [Request(i, 0.0, 8, 8) for i in range(12)] + [Request(12 + i, 2.6, 8, 2) for i in range(3)]
        simulate(requests, lambda: make_policy(SchedulerConfig("vllm", token_budget=2048), BlockManager(256, 16)),
                 cost, make_router("round_robin"), exact_steps=exact_steps)
        return requests

    gap, plain = served(Served(0.25, 0.11)), served(ConstantCost(0.25))
    assert [r.first_scheduled_s for r in gap[:12]] == pytest.approx([0.0] + [1.25] * 11)
    assert [r.first_scheduled_s for r in gap[12:]] == pytest.approx([3.0] * 3)
    assert [r.first_scheduled_s for r in plain[:12]] == pytest.approx([0.0] * 12)
    assert [r.first_scheduled_s for r in plain[12:]] == pytest.approx([2.6] * 3)


def test_fast_path_and_exact_steps_agree_with_an_intake_gap():
    for policy in ("continuous", "chunked", "vllm"):
        fast, exact = run(Served(0.25, 0.07), policy, False, burst=9), run(Served(0.25, 0.07), policy, True, burst=9)
        assert [(r.first_token_s, r.finish_s) for r in fast] == [(r.first_token_s, r.finish_s) for r in exact]


def test_a_scaled_profile_keeps_its_engines_intake():
    """Pricing at the device's speed scales the steps, not how the frontend takes requests in."""
    assert intake_gap_s(ScaledCost(Served(0.25, 0.004), 1.1)) == 0.004
    assert intake_gap_s(ScaledCost(ConstantCost(0.25), 1.1)) == 0.0
    with pytest.raises(ValueError, match="intake_gap_s"):
        intake_gap_s(Served(0.25, -1.0))


def test_the_probe_bounds_the_gap_from_a_simulated_burst():
    """The simulator's own streams of a burst to an idle engine, read back as the probe reads a
    server's: the bounds hold the gap it was simulated with, and a burst taken in together gives 0."""
    def burst(cost) -> list[Request]:
        requests = [Request(i, 0.0, 8, 8) for i in range(12)]
        simulate(requests, lambda: make_policy(SchedulerConfig("vllm", token_budget=2048), BlockManager(256, 16)),
                 cost, make_router("round_robin"), token_times=True)
        return requests

    for gap_s in (0.03, 0.11):
        requests = burst(Served(0.25, gap_s))
        lo, hi = intake_bounds(requests, read_steps(requests).steps, 0.0)
        assert lo < gap_s <= hi
    together = burst(ConstantCost(0.25))
    assert intake_bounds(together, read_steps(together).steps, 0.0) == (0.0, 0.0)
    assert intake_bounds(together[:1], read_steps(together[:1]).steps, 0.0) is None  # one request tells nothing


def test_the_profile_keeps_it_from_the_calibrations_bursts(tmp_path):
    info = {"engine": "vllm", "device": "cpu", "settings": {"block_size": 128, "num_gpu_blocks": 100},
            "measured": {"overhead_ms": 4.0, "burst": {"bursts": [[32, 2]], "first_alone": [True, True, False],
                                                       "intake_bounds_ms": [[1.0, 3.0]], "intake_gap_ms": 2.0}}}
    profile = profile_from_engine(SAMPLES, info, source="vllm:test", grid="vllm-http-quick", calibration_s=1.0,
                                  folds=2)
    assert profile.intake_gap_s == 0.002 and intake_gap_s(CalibratedCost(profile)) == 0.002
    save_profile(profile, tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").intake_gap_s == 0.002
    data = json.loads((tmp_path / "p.json").read_text())
    del data["intake_gap_s"]  # a profile from before it was measured: none, unless it said it woke alone
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "old.json").intake_gap_s == 0.0
    data["wakes_alone"] = True
    (tmp_path / "woke.json").write_text(json.dumps(data))
    assert load_profile(tmp_path / "woke.json").intake_gap_s == LEGACY_WAKE_GAP_S
    for bad in ("fast", -0.5):
        data["intake_gap_s"] = bad
        (tmp_path / "bad.json").write_text(json.dumps(data))
        with pytest.raises(ProfileError, match="intake_gap_s"):
            load_profile(tmp_path / "bad.json")
    info["measured"].pop("burst")
    plain = profile_from_engine(SAMPLES, info, source="vllm:test", grid="g", calibration_s=1.0, folds=2)
    assert plain.intake_gap_s == 0
