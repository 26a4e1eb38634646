"""Measuring steps on the real engine (tiny, CPU): the grid, a smoke calibration, Ctrl-C, --quick."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("torch")

from calibrate.calibration import run_calibration
from calibrate.grid import GridPoint, make_grid
from calibrate.measure import measure_grid, measure_host_link
from calibrate.profile import CalibratedCost, load_profile, save_profile
from runtime.runner import ModelRunner
from runtime.weights import load_model
from sim.batch import StepShape
from sim.kv import BlockManager
from sim.models import get_model

SMALL_GRID = [
    GridPoint(prefill=((32, 0),)),
    GridPoint(prefill=((64, 48),)),
    GridPoint(prefill=((16, 0), (16, 32))),
    GridPoint(decode=(40,) * 3),
    GridPoint(decode=(200,)),
    GridPoint(prefill=((32, 0),), decode=(40, 80)),
]


@pytest.mark.parametrize("quick", [True, False])
def test_grid_respects_bounds(quick):
    """Every grid point fits the model's length and the KV pool, and all three kinds are there."""
    grid = make_grid(max_len=1024, num_blocks=600, block_size=16, quick=quick)
    assert {p.kind for p in grid} == {"prefill", "decode", "mixed"}
    assert len(set(grid)) == len(grid)
    for p in grid:
        assert max(p.seq_lengths()) <= 1024 and p.kv_blocks(16) <= 600
    assert len(make_grid(1024, 600, 16, quick=True)) < len(make_grid(1024, 600, 16))


def test_smoke_calibration_writes_loadable_profile(tmp_path):
    """A few grid points through the real runner give a profile that loads and prices steps."""
    prof = run_calibration("tiny", device="cpu", grid=SMALL_GRID, repeats=2, threads=1, folds=3, progress=False,
                           drift_threshold=None)  # control steps: tests/test_calibrate_drift.py
    path = tmp_path / "tiny.json"
    save_profile(prof, path)
    loaded = load_profile(path)
    assert len(loaded.samples) == len(SMALL_GRID) and not loaded.interrupted
    by_shape = {(s.shape.prefill_tokens, s.shape.prefill_seqs, s.shape.prefill_context_tokens, s.shape.decode_seqs,
                 s.shape.decode_context_tokens) for s in loaded.samples}
    assert (32, 2, 32, 0, 0) in by_shape and (32, 1, 0, 2, 120) in by_shape and (0, 0, 0, 3, 120) in by_shape
    for s in loaded.samples:
        assert s.repeats >= 4 and 0 < s.step_ms_min <= s.step_ms <= s.step_ms_max
    assert loaded.model == "tiny" and loaded.dtype == "float32" and loaded.cuda_version is None
    assert loaded.kv_bytes_per_token == get_model("tiny").kv_bytes_per_token("float32")
    assert loaded.num_kv_blocks is not None and loaded.kv_memory_bytes == loaded.num_kv_blocks * 16 * 2048
    assert loaded.host_link_source == "measured" and loaded.torch_threads == 1
    assert CalibratedCost(loaded).step_time(StepShape(decode_seqs=4, decode_context_tokens=100)) > 0


def test_ctrl_c_keeps_samples_so_far():
    """KeyboardInterrupt during the grid stops it and returns every point timed at least once."""
    runner = ModelRunner(load_model(get_model("tiny")), BlockManager(64, 16))
    calls = 0
    execute = runner.execute

    def interrupting(batch):
        nonlocal calls
        calls += 1
        if calls == 4 * len(SMALL_GRID) + 7:  # first pass done (1 warm-up + 3 repeats per point),
            raise KeyboardInterrupt              # then one point again, and the next timed once
        return execute(batch)

    runner.execute = interrupting  # type: ignore[method-assign]
    measured = measure_grid(runner, SMALL_GRID, repeats=3, warmup=1, passes=2, min_visit_ms=0, progress=False)
    assert measured.interrupted
    assert sorted(s.repeats for s in measured.samples) == [3, 3, 3, 3, 4, 6]
    assert runner.blocks.num_free == 64, "an interrupted step leaked KV blocks"


def test_long_steps_are_warmed_up_on_their_first_visit_only(monkeypatch):
    """A point whose runs averaged WARM_STEP_MS or more skips the warm-up on its second visit; a
    short one is warmed up every visit (times scripted: no timing here)."""
    import calibrate.measure as measure
    from sim.batch import Batch, ScheduledSeq

    grid = [GridPoint(decode=(40,)), GridPoint(decode=(200,))]
    step_ms = {40: 10.0, 200: measure.WARM_STEP_MS * 1.5}
    calls = {40: 0, 200: 0}

    def scripted(runner, seqs):
        context = seqs[0][1]
        calls[context] += 1
        return step_ms[context], Batch([ScheduledSeq(r, start, n) for r, start, n in seqs], block_size=16)

    monkeypatch.setattr(measure, "time_step", scripted)
    runner = ModelRunner(load_model(get_model("tiny")), BlockManager(64, 16))
    measured = measure_grid(runner, grid, repeats=3, warmup=1, passes=2, min_visit_ms=20, progress=False)
    # the short step: 1 warm-up + 3 timed (30 ms >= min_visit_ms) per visit; the long one:
    # 1 warm-up + 3 timed, then 3 timed
    assert calls == {40: 8, 200: 7}
    assert sorted(s.repeats for s in measured.samples) == [6, 6]


def test_host_link_measured():
    """Swap copies through the runner's KV cache give a positive bandwidth."""
    runner = ModelRunner(load_model(get_model("tiny")), BlockManager(64, 16, num_host_blocks=32))
    assert measure_host_link(runner) > 1e6
    assert measure_host_link(ModelRunner(load_model(get_model("tiny")), BlockManager(8, 16))) is None


@pytest.mark.slow
@pytest.mark.device_timing
def test_quick_calibration_on_cpu_is_fast_and_accurate():
    """`--quick` on tiny finishes well under two minutes with held-out median error under 10%.

    Left out of the default run: on this project's 2-core VM with nothing else running it failed
    both attempts (held-out median 12-16%) at this commit and at the commit before this check
    was last passing in CI, so it measures the machine as much as the code.

    Wall-clock timing on a shared machine is at the mercy of other processes, so one noisy
    attempt is retried once; a real regression fails both.
    """
    from calibrate.errors import DriftError

    tables = []
    for _ in range(2):
        t0 = time.perf_counter()
        try:
            prof = run_calibration("tiny", device="cpu", quick=True, threads=1, progress=False)
        except DriftError as e:  # the machine changed speed under the calibration: a noisy attempt
            tables.append(str(e))
            continue
        assert time.perf_counter() - t0 < 120
        held = prof.errors["held_out"]
        assert all(held[kind]["n"] >= 10 for kind in ("prefill", "decode", "mixed"))
        tables.append(held)
        if held["all"]["median_ape_pct"] < 10:
            return
    pytest.fail(f"held-out median error >= 10% twice: {tables}")


def test_out_of_memory_step_left_out():
    """A step that runs the device out of memory is left out of the samples, not fatal."""
    import torch

    runner = ModelRunner(load_model(get_model("tiny")), BlockManager(64, 16))
    execute = runner.execute

    def failing(batch):
        if batch.shape().decode_seqs == 3:  # the three-decode point
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return execute(batch)

    runner.execute = failing  # type: ignore[method-assign]
    measured = measure_grid(runner, SMALL_GRID, repeats=2, warmup=1, passes=2, progress=False)
    assert measured.out_of_memory == [SMALL_GRID[3]]
    assert len(measured.samples) == len(SMALL_GRID) - 1 and not measured.interrupted
    assert runner.blocks.num_free == 64


def test_live_phase_adds_live_samples():
    """A tiny live phase: the engine's steps join the grid's as samples of origin 'live'."""
    from calibrate.live import LivePlan

    plan = LivePlan(num_requests=3, prompt_dist="uniform:8:32", output_dist="uniform:2:6", loads=(0.8,),
                    policies=("continuous", "chunked"), time_budget_s=30)
    prof = run_calibration("tiny", device="cpu", grid=SMALL_GRID, repeats=2, threads=1, folds=3, progress=False,
                           live_plan=plan, drift_threshold=None)
    origins = {s.origin for s in prof.samples}
    assert origins == {"grid", "live"}
    assert sum(s.origin == "grid" for s in prof.samples) == len(SMALL_GRID)
    assert [r["policy"] for r in prof.live["runs"]] == ["continuous", "chunked"]
    assert prof.errors["held_out"]["live"]["n"] == sum(s.origin == "live" for s in prof.samples)
