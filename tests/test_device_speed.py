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
