"""Pricing at the device's speed now: :class:`sim.cost.ScaledCost`, the speed check's grid
points rebuilt from a profile's samples, and the validation's second comparison."""

from __future__ import annotations

import numpy as np
import pytest

from calibrate.grid import GridPoint, spread_contexts
from calibrate.profile import CalibratedCost
from calibrate.samples import Sample
from experiments.validation.runs import _decode_contexts, _grid_point
from sim.batch import StepShape
from sim.cluster import make_router
from sim.cost import ConstantCost, ScaledCost, decode_run_times, request_overhead_s
from sim.engine import simulate
from sim.kv import BlockManager
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request
from tests.test_request_overhead import SAMPLES, FrontendCost


def _run(cost, exact_steps: bool = False) -> list[tuple[float | None, float | None]]:
    requests = [Request(i, 0.3 * i, 40 + 7 * i, 5 + i % 4) for i in range(10)]
    simulate(requests, lambda: make_policy(SchedulerConfig("continuous"), BlockManager(64, 16)), cost,
             make_router("round_robin"), exact_steps=exact_steps)
    return [(r.first_token_s, r.finish_s) for r in requests]


@pytest.mark.parametrize("exact_steps", [True, False])
def test_a_scaled_constant_cost_simulates_as_the_constant_it_scales_to(exact_steps):
    """Every step twice as long as 0.01 s is a step of 0.02 s: the same timestamps, on both the
    fast path (decode_run_times) and step by step."""
    assert _run(ScaledCost(ConstantCost(0.01), 2.0), exact_steps) == _run(ConstantCost(0.02), exact_steps)


def test_scaled_cost_scales_steps_and_runs_but_not_the_frontend():
    """step_time and decode_run_times are the wrapped model's times the factor; a served engine's
    per-request frontend time is kept; a factor that is not finite and > 0 is refused."""
    profile_cost = CalibratedCost(_profile())
    scaled = ScaledCost(profile_cost, 1.08)
    shape = StepShape(0, 0, 0, 8, 800)
    assert scaled.step_time(shape) == pytest.approx(profile_cost.step_time(shape) * 1.08)
    np.testing.assert_allclose(decode_run_times(scaled, shape, 5),
                               np.asarray(decode_run_times(profile_cost, shape, 5)) * 1.08)
    assert request_overhead_s(ScaledCost(FrontendCost(0.25), 3.0)) == 0.125
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor"):
            ScaledCost(ConstantCost(0.01), bad)


def _profile():
    from calibrate.calibration import profile_from_samples

    return profile_from_samples(SAMPLES, "test.csv", model="tiny", dtype="float32")


@pytest.mark.parametrize("batch, context", [(1, 32), (4, 256), (12, 1000), (32, 2047)])
def test_decode_grid_points_are_rebuilt_from_their_sums(batch, context):
    """A decode batch of the calibration grid (contexts spread by spread_contexts) is rebuilt
    exactly from its sample's sums; any other sum gives a step of the same shape."""
    spread = Sample(_decode_shape(spread_contexts(context, batch)), 10.0, origin="grid")
    assert _grid_point(spread) == GridPoint(decode=spread_contexts(context, batch))
    for total in (batch * 100, batch * 100 + 1):  # a spread of that sum or an even split: that shape
        contexts = _decode_contexts(batch, total)
        assert len(contexts) == batch and sum(contexts) == total and min(contexts) >= 1


def _decode_shape(contexts: tuple[int, ...]) -> StepShape:
    return StepShape(0, 0, 0, len(contexts), sum(contexts))


def test_only_lone_kinds_of_grid_steps_are_rebuilt():
    """Prefills with equal chunks and decode batches are rebuilt; mixed steps, uneven prefill
    chunks and live steps are not (their shapes do not give the step back)."""
    prefill = Sample(StepShape(96, 2, 64, 0, 0), 10.0, origin="grid")
    assert _grid_point(prefill) == GridPoint(prefill=((48, 32), (48, 32)))
    assert _grid_point(Sample(StepShape(97, 2, 64, 0, 0), 10.0, origin="grid")) is None
    assert _grid_point(Sample(StepShape(32, 1, 0, 4, 256), 10.0, origin="grid")) is None
    assert _grid_point(Sample(StepShape(0, 0, 0, 4, 256), 10.0, origin="live")) is None
    assert _grid_point(Sample(StepShape(0, 0, 0, 4, 64), 10.0, origin="grid")) == GridPoint(decode=(16,) * 4)


def _drift_record(points: list[GridPoint], checkpoints: list[list[float]]) -> dict:
    return {"threshold_pct": 30.0, "control_steps": ["a"] * len(points),
            "checkpoints": [{"name": f"c{k}", "control_ms": ms, "drift_pct": 0.0} for k, ms in enumerate(checkpoints)],
            "max_drift_pct": 0.0, "remeasured": [], "control_points": [p.to_dict() for p in points]}


def test_the_speed_reference_is_the_calibration_control_steps_when_recorded():
    """A profile whose drift record keeps its control points is checked against them, each one's
    reference the mean over the checkpoints; one without them falls back to its grid samples."""
    from types import SimpleNamespace

    from experiments.validation.runs import speed_reference

    points = [GridPoint(prefill=((64, 256),)), GridPoint(decode=spread_contexts(512, 4))]
    drift = _drift_record(points, [[70.0, 40.0], [68.0, 41.0], [72.0, 42.0]])
    ref = speed_reference(SimpleNamespace(drift=drift, samples=[]))
    assert ref is not None and ref.points == tuple(points) and ref.then_ms == pytest.approx((70.0, 41.0))
    assert "control steps" in ref.source
    samples = [Sample(StepShape(16, 1, 0, 0, 0), 30.0, origin="grid")]
    old = speed_reference(SimpleNamespace(drift={k: v for k, v in drift.items() if k != "control_points"},
                                          samples=samples))
    assert old is not None and not old.points and old.samples == tuple(samples) and "grid steps" in old.source
    assert speed_reference(SimpleNamespace(drift=None, samples=[])) is None


def test_a_speed_check_times_the_control_steps_against_their_reference(net, one_torch_thread):
    """On a real runner: the control steps timed now against references set to half and to
    twice what they take read as about 2x slower and 2x faster; a step that does not fit the
    pool is left out, and none fitting gives None."""
    from calibrate.measure import time_controls
    from experiments.validation.runs import SpeedReference, speed_check
    from runtime.runner import ModelRunner
    from sim.kv import BlockManager

    runner = ModelRunner(net, BlockManager(64, 16))
    points = (GridPoint(prefill=((32, 0),)), GridPoint(decode=(40,) * 4))
    now = time_controls(runner, points)
    slower = speed_check(runner, SpeedReference(points, tuple(x / 2 for x in now)), 2048)
    faster = speed_check(runner, SpeedReference(points, tuple(x * 2 for x in now)), 2048)
    assert slower is not None and faster is not None
    assert 1.3 < slower < 3.0 and 0.33 < faster < 0.75  # loose: a shared machine's steps wander
    too_big = GridPoint(prefill=((2000, 0),))
    assert speed_check(runner, SpeedReference((too_big,), (10.0,)), 2048) is None
    assert speed_check(runner, None, 2048) is None


def test_validate_checks_the_speed_on_the_calibration_control_steps(tmp_path):
    """End to end: a calibration with its drift checkpoints records its control points, and
    validate times those again around the live run, prices the second simulation at their speed
    and says which steps it timed."""
    pytest.importorskip("torch")
    import json

    from click.testing import CliRunner

    from calibrate.calibration import run_calibration
    from calibrate.profile import save_profile
    from experiments.cli import main

    grid = [GridPoint(prefill=((c, ctx),)) for c in (8, 32, 96) for ctx in (0, 64)]
    grid += [GridPoint(decode=(ctx,) * b) for b in (1, 4, 12) for ctx in (16, 120)]
    grid += [GridPoint(prefill=((32, 0),), decode=(64,) * 4)]
    profile = run_calibration("tiny", device="cpu", threads=1, repeats=2, warmup=1, folds=2, grid=grid,
                              progress=False, drift_threshold=0.9)  # only a machine twice as slow fails it
    assert len(profile.drift["control_points"]) == 3  # one per kind
    path = tmp_path / "tiny.json"
    save_profile(profile, path)
    out = tmp_path / "val"
    res = CliRunner().invoke(main, ["validate", "--profile", str(path), "--model", "tiny", "-n", "8",
                                    "--max-prompt-tokens", "64", "--max-output-tokens", "8", "--repeats", "1",
                                    "--no-progress", "--load", "0.5", "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "validation.json").read_text())
    assert data["device_speed_source"] == "the calibration's control steps"
    speeds = data["device_speed_vs_profile"]
    assert data["at_device_speed"]["speed_checks"] == [speeds["before"], speeds["after"]]
    assert 0.2 < speeds["before"] < 5 and 0.2 < speeds["after"] < 5  # timed, and of the calibration's order
    assert "device speed (the calibration's control steps timed again)" in res.output
