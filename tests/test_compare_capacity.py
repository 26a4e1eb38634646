"""`servesim compare`, `servesim capacity` and the sweep runner behind them, on tiny workloads."""

from __future__ import annotations

import csv
import json
import math

import pytest
from click.testing import CliRunner

from experiments.capacity import RateSearch, parse_slo, slo_percentiles, violations
from experiments.cli import main
from experiments.sweep import RateScaler, RunSpec, mean_rate, requests_of, run_sweep
from sim.config import SimConfig
from sim.policies.base import SchedulerConfig
from sim.workload import SyntheticWorkload, TraceReplay

TRACE = ["-n", "200", "--model", "qwen2.5-0.5b", "--jobs", "1"]
SYNTHETIC = ["--arrival", "poisson", "-n", "150", "--prompt-tokens", "uniform:64:512",
             "--output-tokens", "uniform:16:128", "--jobs", "1"]
FOUR = "static,continuous,chunked,chunked+swap"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_compare_prints_one_table_with_every_policy(tmp_path):
    """Without --rates, one table has a column per policy, a ratio-to-static row, and every run in json/csv."""
    result = invoke("compare", "--policies", FOUR, *TRACE, "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if line.strip().startswith("static"))
    assert header.split() == FOUR.split(",")
    for row in ("p99 TTFT (ms)", "mean TPOT (ms)", "p99 ITL (ms)", "mean E2EL (ms)", "preemptions",
                "output throughput vs static"):
        assert row in result.output
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [r["policy"] for r in data["runs"]] == FOUR.split(",")
    assert all(r["completed"] == 200 for r in data["runs"])
    rows = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert [r["policy"] for r in rows] == FOUR.split(",")


def test_compare_rates_continuous_beats_static_at_saturation(tmp_path):
    """With rates up to saturation, continuous batching out-produces static, and the plots are written."""
    result = invoke("compare", "--policies", "static,continuous", "--rates", "2,1000", "--goodput", "ttft:500",
                    *TRACE, "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "== rate 2 req/s ==" in result.output and "== rate 1000 req/s ==" in result.output
    data = json.loads((tmp_path / "compare.json").read_text())
    assert [(r["policy"], r["rate"]) for r in data["runs"]] == [
        ("static", 2.0), ("continuous", 2.0), ("static", 1000.0), ("continuous", 1000.0)]
    assert data["top_rate_saturated"] and data["saturation_rps"] < 1000
    assert data["throughput_ratio_at_top_rate"]["continuous"] > 2.0
    assert "saturation throughput ratio" in result.output
    for r in data["runs"]:
        assert r["offered_rate"] == pytest.approx(r["rate"])
    for png in ("latency-vs-throughput.png", "throughput-vs-rate.png", "goodput-vs-rate.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_compare_auto_rates_span_saturation(tmp_path):
    """--rates auto runs each policy at fractions of the probed saturation rate, the highest above it."""
    result = invoke("compare", "--policies", "static,continuous", "--rates", "auto", *TRACE, "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "compare.json").read_text())
    rates = data["rates"]
    assert len(rates) == 7 and rates == sorted(rates)
    top = [r for r in data["runs"] if r["rate"] == rates[-1]]
    assert max(r["request_throughput"] for r in top) < rates[-1]


def test_compare_rates_need_a_rate_to_set(tmp_path):
    """All-at-once arrivals have no rate, so --rates on them is an error, not a silent no-op."""
    result = invoke("compare", "--rates", "2,4", "--arrival", "all-at-once", "-n", "20", "--jobs", "1",
                    "-o", str(tmp_path))
    assert result.exit_code == 1 and "all-at-once" in result.output


@pytest.mark.parametrize("policies, message", [
    ("static,bogus", "unknown policy 'bogus'; known: chunked, continuous, static"),
    ("chunked+bogus", "preemption after '+' must be one of recompute, swap, off"),
    ("static+swap", "never preempts"),
    ("continuous,continuous", "names a policy twice"),
])
def test_compare_rejects_bad_policies(tmp_path, policies, message):
    """A bad --policies spec is a usage error that says what is accepted."""
    result = invoke("compare", "--policies", policies, *TRACE, "-o", str(tmp_path))
    assert result.exit_code == 2
    assert "--policies" in result.output and message in result.output


def test_compare_rejects_bad_rates(tmp_path):
    """--rates must be 'auto' or positive numbers."""
    for rates in ("2,x", "0,4"):
        result = invoke("compare", "--rates", rates, *TRACE, "-o", str(tmp_path))
        assert result.exit_code == 2 and "--rates" in result.output


def test_capacity_rate_meets_slo_and_a_higher_rate_fails(tmp_path):
    """The rate found meets every SLO, and the rate (1 + 2 x precision) above it does not."""
    slos = ["ttft_p99:200", "tpot_p99:20"]
    result = invoke("capacity", "--policies", "continuous,chunked", *(a for s in slos for a in ("--slo", s)),
                    "--precision", "0.05", *SYNTHETIC, "-o", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "relative precision of 0.05" in result.output
    found = json.loads((tmp_path / "capacity.json").read_text())["policies"]
    parsed = [parse_slo(s) for s in slos]
    for label, policy in (("continuous", "continuous"), ("chunked", "chunked")):
        rate = found[label]["max_rate"]
        assert rate is not None and found[label]["fail_rate"] <= rate * 1.05
        scaler = RateScaler(SyntheticWorkload(num_requests=150, prompt_dist="uniform:64:512",
                                              output_dist="uniform:16:128"))
        config = SimConfig(scheduler=SchedulerConfig(policy=policy))
        at, above = run_sweep([RunSpec(label, config, scaler.at(r), r) for r in (rate, rate * 1.1)],
                              percentiles=slo_percentiles(parsed), jobs=1)
        assert violations(at, parsed) == []
        assert violations(above, parsed) != []
        assert at == found[label]["summary_at_max_rate"]


def test_capacity_target_rate_sizes_and_verifies_replicas():
    """--target-rate reports ceil(target / max rate) replicas and checks them in a cluster simulation."""
    result = invoke("capacity", "--policies", "continuous", "--slo", "ttft_p99:200", "--slo", "tpot_p99:20",
                    "--target-rate", "100", *SYNTHETIC)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if x.startswith("continuous") and "SLOs hold" in x)
    first_guess, replicas = int(line.split()[1]), int(line.split()[2])
    table_row = next(x for x in result.output.splitlines() if x.startswith("continuous"))
    assert first_guess == math.ceil(100 / float(table_row.split()[1]))
    assert replicas >= first_guess


def test_capacity_reports_unattainable_slo():
    """An SLO below the unloaded latency gives no rate, found in two simulations, not a long halving."""
    result = invoke("capacity", "--policies", "static", "--slo", "ttft_p99:1", *SYNTHETIC)
    assert result.exit_code == 0, result.output
    row = next(x for x in result.output.splitlines() if x.startswith("static "))
    assert row.split()[1] == "none" and row.split()[-1] == "2"
    assert "misses the SLOs even at" in result.output


@pytest.mark.parametrize("slo", ["ttft:500", "ttft_p99", "latency_p99:5", "ttft_p100:5", "ttft_p99:abc",
                                 "ttft_p99:-1", "tpot_max:5"])
def test_capacity_rejects_bad_slo(slo):
    """A malformed --slo is a usage error that lists the accepted forms."""
    result = invoke("capacity", "--slo", slo, *SYNTHETIC)
    assert result.exit_code == 2
    assert "--slo" in result.output and "ttft_p99:500" in result.output


def test_capacity_goodput_fraction_needs_goodput():
    """--goodput-fraction without --goodput SLOs is a usage error."""
    result = invoke("capacity", "--slo", "ttft_p99:500", "--goodput-fraction", "0.9", *SYNTHETIC)
    assert result.exit_code == 2 and "--goodput-fraction and --goodput go together" in result.output


def test_parse_slo_accepts_both_orders_and_any_percentile():
    """ttft_p99 and p99_ttft are the same SLO; mean, median and fractional percentiles map to summary keys."""
    assert parse_slo("ttft_p99:500") == parse_slo("p99_ttft:500")
    assert parse_slo("tpot_mean:40").key == "mean_tpot_ms"
    assert parse_slo("E2EL_median:9").key == "median_e2el_ms"
    slo = parse_slo("itl_p99.9:30")
    assert slo.key == "p99.9_itl_ms" and slo_percentiles([slo]) == [90.0, 99.0, 99.9]


def test_rate_search_brackets_a_threshold():
    """Against a step function the search ends with lo <= threshold < hi and hi / lo - 1 <= precision."""
    for threshold, start in ((7.3, 1.0), (0.02, 5.0), (5.0, 5.0)):
        search = RateSearch(start, 0.01)
        while (rate := search.next_rate()) is not None:
            search.record(rate, {}, [] if rate <= threshold else ["too fast"])
        assert search.lo is not None and search.hi is not None
        assert search.lo <= threshold < search.hi and (search.hi - search.lo) / search.lo <= 0.01
        assert search.steps < 25


def test_rate_scaler_sets_the_mean_rate_of_a_trace_and_a_synthetic_workload():
    """A trace is time-scaled and a synthetic workload regenerated so that the mean rate is the one asked."""
    trace = RateScaler(TraceReplay("azure-conv", num_requests=300))
    assert trace.native_rate == pytest.approx(mean_rate(TraceReplay("azure-conv", num_requests=300).requests()))
    assert mean_rate(requests_of(trace.at(42.0))) == pytest.approx(42.0)
    synthetic = RateScaler(SyntheticWorkload(arrival="constant", num_requests=50))
    assert mean_rate(requests_of(synthetic.at(8.0))) == pytest.approx(8.0)


def test_sweep_results_do_not_depend_on_jobs():
    """The same specs give the same summaries, in input order, run in-process or in two processes."""
    scaler = RateScaler(SyntheticWorkload(num_requests=60, prompt_dist="uniform:64:256", output_dist="uniform:8:64"))
    specs = [RunSpec(p, SimConfig(scheduler=SchedulerConfig(policy=p),
                                  model="qwen2.5-0.5b"), scaler.at(rate), rate)
             for rate in (4.0, 400.0) for p in ("static", "continuous")]
    serial = run_sweep(specs, jobs=1)
    parallel = run_sweep(specs, jobs=2)
    assert serial == parallel
    assert [(r["policy"], r["rate"]) for r in serial] == [(s.label, s.rate) for s in specs]
