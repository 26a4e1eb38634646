"""Calibration that knows when it failed: control-step drift (scripted timings, then a real CPU
hog) and the held-out error check that keeps a poor profile from being written silently."""

from __future__ import annotations

import json
import multiprocessing
import os
import time

import pytest
from click.testing import CliRunner

from calibrate.calibration import FIT_LIMITS_PCT, check_fit, poor_fit_problems
from calibrate.drift import DriftMonitor, control_points, describe
from calibrate.errors import DriftError
from calibrate.grid import GridPoint, make_grid


def scripted(*levels: float, controls: int = 3):
    """A control timer whose n-th call returns ``levels[n]`` ms for every control step."""
    calls = iter(levels)
    return lambda: [next(calls)] * controls


def test_steady_machine_runs_each_segment_once():
    """Checkpoints within the threshold: every segment runs once, drift recorded per checkpoint."""
    monitor = DriftMonitor(scripted(10.0, 10.5, 9.6), ["a", "b", "c"], threshold=0.10)
    monitor.check("start")
    runs = []
    assert monitor.segment("first", "middle", lambda: runs.append(1) or "first") == "first"
    assert monitor.segment("second", "end", lambda: runs.append(2) or "second") == "second"
    assert runs == [1, 2] and monitor.remeasured == []
    assert [p.name for p in monitor.checkpoints] == ["start", "middle", "end"]
    assert [round(p.drift, 3) for p in monitor.checkpoints] == [0.0, 0.05, -0.04]
    record = monitor.to_dict()
    assert record["max_drift_pct"] == pytest.approx(5.0) and record["threshold_pct"] == pytest.approx(10.0)
    assert json.loads(json.dumps(record)) == record


def test_transient_drift_remeasures_the_segment_once_and_keeps_the_second():
    """A spike at a segment's end: the segment runs again between fresh checkpoints, its second result kept."""
    monitor = DriftMonitor(scripted(10.0, 14.0, 10.2, 9.9), threshold=0.10)
    monitor.check("start")
    results = iter(["noisy", "clean"])
    assert monitor.segment("the grid's first half", "grid middle", lambda: next(results)) == "clean"
    assert monitor.remeasured == ["the grid's first half"]
    assert [round(100 * p.drift) for p in monitor.checkpoints] == [0, 40, 2, -1]


def test_persistent_drift_stops_with_the_numbers():
    """Drift that stays after re-measuring: DriftError naming the segment, the threshold and each checkpoint."""
    monitor = DriftMonitor(scripted(10.0, 13.0, 13.5, 13.2, controls=2), ["prefill 64+0", "decode 4x(8..64)"],
                           threshold=0.10)
    monitor.check("grid start")
    runs = []
    with pytest.raises(DriftError) as err:
        monitor.segment("the grid's second half", "grid end", lambda: runs.append(1))
    assert runs == [1, 1], "the segment is measured again exactly once before giving up"
    text = str(err.value)
    assert "(the grid's second half)" in text and "10% threshold" in text and "no profile written" in text
    assert "+30.0%" in text and "+35.0%" in text and "prefill 64+0; decode 4x(8..64)" in text
    assert len(err.value.checkpoints) == 4


def test_warm_up_times_the_controls_and_is_not_the_reference():
    """A warm-up's slow first timing is forgotten: the reference is the next checkpoint."""
    monitor = DriftMonitor(scripted(15.0, 10.0, 10.5))
    monitor.warm_up()
    assert monitor.checkpoints == []
    monitor.check("grid start")
    assert monitor.check("grid middle").drift == pytest.approx(0.05)


def test_drift_is_the_mean_ratio_over_control_steps():
    """A checkpoint's drift averages each control step's ratio to its reference, so no step dominates."""
    times = iter([[1.0, 100.0], [1.3, 100.0]])
    monitor = DriftMonitor(lambda: next(times))
    monitor.check("start")
    assert monitor.check("later").drift == pytest.approx(0.15)


def test_a_faster_machine_is_drift_too():
    """A reference taken while something else ran (later steps 30% faster) is caught as well."""
    monitor = DriftMonitor(scripted(10.0, 7.0, 7.0, 7.0))
    monitor.check("start")
    with pytest.raises(DriftError, match=r"-30\.0%"):
        monitor.segment("s", "end", lambda: None)


def test_monitor_rejects_bad_input():
    """A threshold outside (0, 1), non-positive control times and a segment before the reference are errors."""
    with pytest.raises(ValueError, match="threshold"):
        DriftMonitor(scripted(1.0), threshold=0.0)
    with pytest.raises(ValueError, match="> 0 ms"):
        DriftMonitor(lambda: [0.0]).check("start")
    with pytest.raises(RuntimeError, match="reference"):
        DriftMonitor(scripted(1.0)).segment("s", "end", lambda: None)


def test_control_points_one_per_kind_from_the_grid():
    """Control steps are grid points, one per kind, fixed for a grid and small within their kind."""
    grid = make_grid(max_len=2048, num_blocks=4096, block_size=16, quick=True)
    points = control_points(grid)
    assert [p.kind for p in points] == ["prefill", "decode", "mixed"]
    assert all(p in grid for p in points) and control_points(grid) == points
    for p in points:
        same = sorted(sum(c for c, _ in q.prefill) + len(q.decode) for q in grid if q.kind == p.kind)
        assert sum(c for c, _ in p.prefill) + len(p.decode) <= same[len(same) // 2]
    assert describe(GridPoint(prefill=((64, 0),), decode=(8, 64))) == "prefill 64+0 + decode 2x(8..64)"
    assert control_points([GridPoint(decode=(5,))]) == [GridPoint(decode=(5,))]


def test_fit_check_limits_on_live_steps():
    """check_fit reads the live row when present, else all; beyond a limit it fails and says which."""
    good = {"held_out": {"all": {"median_ape_pct": 50.0, "p90_ape_pct": 90.0},
                         "live": {"median_ape_pct": 4.4, "p90_ape_pct": 14.0}}}
    assert check_fit(good).passed and check_fit(good).row == "live"
    bad = check_fit({"held_out": {"all": {"median_ape_pct": 27.0, "p90_ape_pct": 113.0}}})
    assert bad.row == "all" and not bad.passed
    assert poor_fit_problems(bad.to_dict()) == [
        f"held-out all median_ape_pct 27.0% > {FIT_LIMITS_PCT['median_ape_pct']:g}%",
        f"held-out all p90_ape_pct 113.0% > {FIT_LIMITS_PCT['p90_ape_pct']:g}%"]
    unknown = check_fit({"held_out": None})
    assert unknown.row is None and unknown.passed


# -- on the real engine ---------------------------------------------------------------------

torch = pytest.importorskip("torch")

from calibrate.calibration import run_calibration  # noqa: E402
from calibrate.profile import load_profile, save_profile  # noqa: E402

GRID = [
    GridPoint(prefill=((32, 0),)),
    GridPoint(prefill=((64, 48),)),
    GridPoint(decode=(40,) * 3),
    GridPoint(decode=(200,)),
    GridPoint(prefill=((32, 0),), decode=(40, 80)),
]


def test_calibration_stops_on_injected_drift():
    """run_calibration with a control timer that slows after the reference raises DriftError, no profile."""
    levels = iter([1.0, 1.0] + [1.5] * 10)  # the warm-up and the reference, then slower

    def slowing(runner, points):
        return [next(levels)] * len(points)

    with pytest.raises(DriftError, match="the grid's first half"):
        run_calibration("tiny", device="cpu", grid=GRID, repeats=1, passes=1, threads=1, folds=2, progress=False,
                        controls=slowing)


def test_calibration_records_drift_fit_check_and_phase_times(tmp_path):
    """A steady calibration records its checkpoints, fit check and phase times, and they load back."""
    prof = run_calibration("tiny", device="cpu", grid=GRID, repeats=1, passes=1, threads=1, folds=2, progress=False,
                           controls=lambda runner, points: [1.0] * len(points))
    path = tmp_path / "p.json"
    save_profile(prof, path)
    loaded = load_profile(path)
    assert [c["name"] for c in loaded.drift["checkpoints"]] == ["grid start", "grid middle", "grid end"]
    assert loaded.drift["control_steps"] == [describe(p) for p in control_points(GRID)]
    # the control steps themselves, which a validation times again to see the device's speed
    assert [GridPoint.from_dict(p) for p in loaded.drift["control_points"]] == control_points(GRID)
    assert loaded.fit_check["row"] == "all" and loaded.fit_check["accepted_poor_fit"] is False
    assert loaded.phases_s["grid"] > 0 and loaded.calibration_s >= loaded.phases_s["grid"]


HOG_S = 120.0
"""The hog's own bound: it ends by itself even if the test process dies before killing it."""


def test_max_model_len_bounds_the_grid_and_is_recorded():
    """--max-model-len keeps every grid sequence within it, the profile says so; beyond the model's is refused."""
    prof = run_calibration("tiny", device="cpu", quick=True, repeats=1, passes=1, threads=1, folds=2, live=False,
                           progress=False, max_model_len=256, drift_threshold=None)
    assert prof.max_model_len == 256
    assert all(s.shape.prefill_tokens + s.shape.prefill_context_tokens <= 256 * s.shape.prefill_seqs
               for s in prof.samples)
    assert max(s.shape.prefill_tokens for s in prof.samples) == 256
    assert all(s.shape.decode_context_tokens <= 256 * s.shape.decode_seqs for s in prof.samples)
    with pytest.raises(ValueError, match=r"max_model_len must be in 2\.\.2048"):
        run_calibration("tiny", device="cpu", max_model_len=4096, progress=False)


def _hog(seconds: float, started=None) -> None:
    """Spin for ``seconds`` (a process, so that it takes a core whatever the GIL does); count
    itself in ``started`` once it spins."""
    if started is not None:
        with started.get_lock():
            started.value += 1
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@pytest.mark.slow
@pytest.mark.device_timing  # passed alone, missed inside the whole suite on the same VM: run it by itself
def test_cpu_hog_half_way_through_calibration_is_caught():
    """A busy loop on every core, started after the reference checkpoint, stops the calibration.

    The real control timer and the real engine; the hog is bounded in time and killed in any
    case. What is asserted is the outcome (DriftError naming the drift), not a duration.
    """
    from calibrate.measure import time_controls

    hogs: list[multiprocessing.Process] = []
    calls = 0

    def controls_then_hog(runner, points):
        nonlocal calls
        ms = time_controls(runner, points)
        calls += 1
        if calls == 2:  # the warm-up and the reference on a quiet machine; the hog starts after them
            ctx = multiprocessing.get_context("spawn")
            started = ctx.Value("i", 0)
            cores = os.cpu_count() or 2
            hogs.extend(ctx.Process(target=_hog, args=(HOG_S, started), daemon=True) for _ in range(cores))
            for h in hogs:
                h.start()
            # A spawned hog first imports this module (torch included): wait until every one
            # spins, so that the rest of the calibration runs on a busy machine.
            deadline = time.monotonic() + 60
            while started.value < cores and time.monotonic() < deadline:
                time.sleep(0.05)
            assert started.value == cores, "the hogs did not start within 60 s"
        return ms

    try:
        with pytest.raises(DriftError) as err:
            run_calibration("tiny", device="cpu", grid=GRID, repeats=3, passes=2, threads=1, folds=2,
                            progress=False, controls=controls_then_hog)
    finally:
        for h in hogs:
            h.kill()
            h.join(10)
    assert "drifted during calibration" in str(err.value)
    assert max(abs(c.drift) for c in err.value.checkpoints) > 0.10


@pytest.fixture(scope="module")
def steady_profile():
    """A small real calibration whose control timer is steady (the CLI tests swap its fit check)."""
    return run_calibration("tiny", device="cpu", grid=GRID, repeats=1, passes=1, threads=1, folds=2, progress=False,
                           controls=lambda runner, points: [1.0] * len(points))


def poor(profile):
    """``profile`` with the held-out error of a noisy calibration (issue 15's: median 27%, p90 113%)."""
    import dataclasses

    errors = {"folds": 5, "held_out": {"live": {"n": 900, "median_ape_pct": 27.0, "p90_ape_pct": 113.0,
                                                "bias_pct": 20.0}}, "in_sample": profile.errors["in_sample"]}
    return dataclasses.replace(profile, errors=errors, fit_check=check_fit(errors).to_dict())


def good(profile):
    """``profile`` with the held-out error of the shipped tiny profile (live median 4.4%, p90 14%)."""
    import dataclasses

    errors = {"folds": 5, "held_out": {"live": {"n": 900, "median_ape_pct": 4.4, "p90_ape_pct": 14.0,
                                                "bias_pct": -1.0}}, "in_sample": profile.errors["in_sample"]}
    return dataclasses.replace(profile, errors=errors, fit_check=check_fit(errors).to_dict())


def test_cli_refuses_a_poor_fit_unless_accepted(tmp_path, monkeypatch, steady_profile):
    """A poor held-out error: numbers printed, exit 1, nothing written; --accept-poor-fit writes and records it."""
    from experiments.commands.calibrate import calibrate
    from experiments.commands.profile import profile

    monkeypatch.setattr("calibrate.calibration.run_calibration", lambda *a, **k: poor(steady_profile))
    out = tmp_path / "p.json"
    refused = CliRunner().invoke(calibrate, ["--model", "tiny", "--quick", "-o", str(out)])
    assert refused.exit_code == 1 and not out.exists()
    assert "poor fit: held-out live median_ape_pct 27.0% > 20%; held-out live p90_ape_pct 113.0% > 60%" in (
        refused.output)
    assert "--accept-poor-fit" in refused.output and "Traceback" not in refused.output
    accepted = CliRunner().invoke(calibrate, ["--model", "tiny", "--quick", "--accept-poor-fit", "-o", str(out)])
    assert accepted.exit_code == 0, accepted.output
    assert load_profile(out).fit_check["accepted_poor_fit"] is True
    shown = CliRunner().invoke(profile, ["show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "fit_check" in shown.output and "FAILED" in shown.output and "accepted with --accept-poor-fit" in (
        shown.output)
    assert "grid middle" in shown.output and "largest drift 0.0% (threshold 30%)" in shown.output


def test_cli_reports_drift_and_time_of_a_good_calibration(tmp_path, monkeypatch, steady_profile):
    """A good calibration prints its wall time per phase and each checkpoint's drift, and is written."""
    from experiments.commands.calibrate import calibrate

    monkeypatch.setattr("calibrate.calibration.run_calibration", lambda *a, **k: good(steady_profile))
    out = tmp_path / "p.json"
    result = CliRunner().invoke(calibrate, ["--model", "tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"in {steady_profile.calibration_s:.1f} s (grid " in result.output and "control steps" in result.output
    assert "grid end" in result.output and "poor fit" not in result.output and out.exists()
    assert load_profile(out).fit_check["passed"] is True


def test_cli_drift_error_is_a_message_not_a_traceback(tmp_path, monkeypatch):
    """DriftError from the calibration: its message, exit 1, no profile, no traceback."""
    from experiments.commands.calibrate import calibrate

    monitor = DriftMonitor(scripted(10.0, 13.0, 13.0, 13.0), ["decode 4x(8..64)"] * 3)
    monitor.check("grid start")

    def drifting(*args, **kwargs):
        monitor.segment("the grid's first half", "grid middle", lambda: None)

    monkeypatch.setattr("calibrate.calibration.run_calibration", drifting)
    out = tmp_path / "p.json"
    result = CliRunner().invoke(calibrate, ["--model", "tiny", "-o", str(out)])
    assert result.exit_code == 1 and not out.exists() and "Traceback" not in result.output
    assert "drifted during calibration (the grid's first half)" in result.output and "+30.0%" in result.output
