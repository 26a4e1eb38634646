"""Validation's pure parts on hand-made numbers: the verdict (tolerances, pass/fail per check, noisy
live runs) and the speed check's choice of steps."""

from __future__ import annotations

import pytest

from experiments.validation.errors import metric_names
from experiments.validation.verdict import CHECKED_METRICS, Tolerances, judge


def metrics(errors: dict[str, float | None] | None = None, runs: dict[str, list[float]] | None = None) -> dict:
    """Compared metrics with every error 0 (live 100) except those given; ``runs`` adds live_runs."""
    out = {}
    for key, _ in metric_names():
        error = (errors or {}).get(key, 0.0)
        entry = {"live": 100.0, "sim": None if error is None else 100.0 * (1 + error), "rel_error": error}
        if runs and key in runs:
            entry["live_runs"] = runs[key]
        out[key] = entry
    return out


def test_all_within_tolerance_passes():
    """Errors just inside the defaults (10% mean, 20% p99, 5% step) give PASS."""
    v = judge(metrics({"mean_ttft_ms": 0.099, "output_throughput": -0.1, "p99_e2el_ms": -0.19}), 0.049)
    assert v.passed and v.label == "PASS" and v.failed == ()
    assert v.tolerances.to_dict() == {"mean": 10.0, "p99": 20.0, "step": 5.0}
    assert {c.metric for c in v.checks} == {k for k, _ in CHECKED_METRICS} | {"median_step_rel_error"}


@pytest.mark.parametrize("key, error", [("mean_tpot_ms", 0.12), ("request_throughput", -0.11),
                                        ("p99_ttft_ms", 0.25), ("mean_e2el_ms", -0.3)])
def test_one_metric_beyond_tolerance_fails(key, error):
    """One checked metric beyond its tolerance fails the verdict, and only that check."""
    v = judge(metrics({key: error}), 0.01)
    assert not v.passed and v.label == "FAIL"
    assert [c.metric for c in v.failed] == [key]
    assert key.split("_")[0] in v.summary() and "FAIL" in v.summary()


def test_unchecked_metrics_do_not_count():
    """Metrics outside the verdict (median, p90, ITL, preemptions) never fail it."""
    v = judge(metrics({"median_ttft_ms": 0.9, "p90_e2el_ms": -0.8, "p99_itl_ms": 2.0, "mean_itl_ms": 0.5,
                       "num_preemptions": None}), 0.0)
    assert v.passed


def test_step_median_beyond_tolerance_fails():
    """A median per-step |error| above the step tolerance fails, shown unsigned."""
    v = judge(metrics(), 0.061)
    assert [c.metric for c in v.failed] == ["median_step_rel_error"]
    assert "per-step median |error| 6.1% > 5%" in v.summary()


def test_black_box_has_no_step_check():
    """Without a step median (a black box's streams show no steps) the verdict leaves the step check out."""
    v = judge(metrics(), None)
    assert v.passed and "median_step_rel_error" not in {c.metric for c in v.checks}


def test_undefined_error_fails():
    """An error that cannot be computed (live 0, simulated not) is no pass."""
    v = judge(metrics({"p99_tpot_ms": None}), 0.0)
    assert [c.metric for c in v.failed] == ["p99_tpot_ms"]
    assert "undefined" in v.failed[0].describe()


def test_custom_tolerances():
    """Tolerances given by name replace the defaults; unnamed ones keep them."""
    tol = Tolerances.parse(["mean:15", "step:8%"])
    assert tol.to_dict() == {"mean": 15.0, "p99": 20.0, "step": 8.0}
    m = metrics({"mean_tpot_ms": 0.12})
    assert judge(m, 0.07, tol).passed
    assert not judge(m, 0.07).passed
    assert "within 15%" in judge(m, 0.07, tol).tolerance_text()


@pytest.mark.parametrize("spec, message", [("mean", "NAME:PCT"), ("p50:10", "one of mean, p99, step"),
                                           ("mean:ten", "not a percentage"), ("step:0", "> 0"),
                                           ("p99:-5", "> 0"), ("mean:inf", "> 0")])
def test_bad_tolerance_spec(spec, message):
    """A bad --tolerance spec is refused with a message naming it."""
    with pytest.raises(ValueError, match=message):
        Tolerances.parse([spec])


def test_tolerances_validated():
    """The dataclass itself refuses a tolerance that is not a positive finite percentage."""
    with pytest.raises(ValueError, match="step_pct"):
        Tolerances(step_pct=0.0)


def test_noisy_live_runs_are_flagged():
    """A check whose live runs differ by more than its tolerance is flagged noisy, pass or fail,
    with its spread; the verdict stays binary."""
    runs = {"mean_ttft_ms": [80.0, 100.0, 120.0], "mean_tpot_ms": [99.0, 100.0, 101.0]}
    v = judge(metrics({"mean_ttft_ms": 0.2}, runs), 0.0)
    ttft, tpot = v.check("mean_ttft_ms"), v.check("mean_tpot_ms")
    assert ttft.live_spread == pytest.approx(0.4) and ttft.noisy and not ttft.passed
    assert tpot.live_spread == pytest.approx(0.02) and not tpot.noisy
    assert v.noisy == (ttft,) and v.label == "FAIL"
    assert "did not reproduce itself" in v.summary() and "mean TTFT 40%" in v.summary()


def test_to_json_lists_every_check():
    """The JSON form has the verdict, the tolerances in percent and every check with pass/fail."""
    data = judge(metrics({"mean_e2el_ms": 0.5}), 0.02).to_json()
    assert data["verdict"] == "FAIL" and data["tolerances_pct"]["p99"] == 20.0
    e2el = data["checks"]["mean_e2el_ms"]
    assert e2el["passed"] is False and e2el["error"] == 0.5 and e2el["tolerance"] == pytest.approx(0.1)
    assert data["checks"]["median_step_rel_error"]["passed"] is True


def test_speed_check_points_short_steps_or_the_cheapest_within_budget():
    """Steps under the limit are spread over their range; when every step is longer (a model
    whose steps cost compute) the cheapest are taken up to the budget, at least two."""
    from experiments.validation.runs import cheapest_points

    short = [(f"p{i}", float(i)) for i in range(1, 31)]
    picked = cheapest_points(short, 4, 20.0, 500.0)
    assert [ms for _, ms in picked] == [1.0, 7.0, 14.0, 20.0]
    long = [("a", 150.0), ("b", 200.0), ("c", 260.0), ("d", 900.0)]
    assert [p for p, _ in cheapest_points(long, 8, 20.0, 500.0)] == ["a", "b"]
    assert [p for p, _ in cheapest_points(long, 8, 20.0, 700.0)] == ["a", "b", "c"]
    assert [p for p, _ in cheapest_points([("x", 5000.0), ("y", 6000.0)], 8, 20.0, 500.0)] == ["x", "y"]
