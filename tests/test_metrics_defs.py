"""Metric definitions against values computed by hand (vLLM ``bench serve``'s definitions).

TTFT = first token - arrival; TPOT = (E2EL - TTFT) / (output tokens - 1), only for outputs of
more than one token; ITL = every gap between consecutive tokens, pooled over requests (not a
mean of per-request means); E2EL = finish - arrival; duration = first arrival to last finish;
goodput = requests meeting every SLO (a limit reached exactly is met) per second; percentiles
interpolate linearly, as ``numpy.percentile`` does; std is the population std (ddof 0).
Every time below is a binary fraction, so the hand values are exact.
"""

from __future__ import annotations

import csv
import itertools
import math

import pytest

from experiments.output import write_requests
from sim.cluster import make_router
from sim.cost import ConstantCost
from sim.engine import simulate
from sim.kv import BlockManager
from sim.metrics import GapRecorder, request_latencies, summarize
from sim.policies import SchedulerConfig, make_policy
from sim.request import Request, Status


def finished(rid: int, arrival_s: float, prompt: int, token_times_s: list[float]) -> Request:
    """A finished request whose tokens came at ``token_times_s``."""
    r = Request(rid, arrival_s, prompt, len(token_times_s))
    r.token_times_s = []
    r.first_scheduled_s = arrival_s
    r.record_tokens(token_times_s)
    r.finish_s = token_times_s[-1]
    r.status = Status.FINISHED
    return r


def hand_run() -> tuple[list[Request], GapRecorder]:
    """Three finished requests (one with a single output token) and one rejected."""
    a = finished(0, 0.0, 10, [1.0, 1.5, 2.5])  # TTFT 1.0, E2EL 2.5, TPOT 0.75, gaps 0.5 and 1.0
    b = finished(1, 1.0, 20, [1.5])  # TTFT 0.5, E2EL 0.5, no TPOT, no gap
    c = finished(2, 2.0, 30, [3.0, 4.0])  # TTFT 1.0, E2EL 2.0, TPOT 1.0, gap 1.0
    d = Request(3, 3.0, 5000, 7)
    d.status, d.reject_reason = Status.REJECTED, "too long"
    itl = GapRecorder()
    for r in (a, b, c):
        times = r.token_times_s or []
        for prev, t in itertools.pairwise(times):
            itl.add(t - prev)
    return [a, b, c, d], itl


def test_per_request_latencies():
    """TTFT, TPOT and E2EL of one request; TPOT is None for a 1-token output."""
    reqs, _ = hand_run()
    assert request_latencies(reqs[0]) == (1.0, 0.75, 2.5)
    assert request_latencies(reqs[1]) == (0.5, None, 0.5)
    assert request_latencies(reqs[2]) == (1.0, 1.0, 2.0)


def test_summary_matches_hand_computed_values():
    """Counts, duration, throughputs and every statistic of TTFT, TPOT, pooled ITL and E2EL."""
    reqs, itl = hand_run()
    s = summarize(reqs, itl, percentiles=[25, 90])
    assert (s["completed"], s["rejected"], s["reject_reasons"]) == (3, 1, {"too long": 1})
    assert s["duration"] == 4.0  # first arrival 0.0 to last finish 4.0
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (60, 6)  # the rejected request counts in neither
    assert s["request_throughput"] == 3 / 4
    assert s["output_throughput"] == 6 / 4
    assert s["total_token_throughput"] == 66 / 4
    assert s["request_goodput"] is None  # no SLO given
    want = {
        # TTFT over [1.0, 0.5, 1.0]
        "mean_ttft_ms": 2500 / 3, "median_ttft_ms": 1000.0, "std_ttft_ms": 1000 * math.sqrt(1 / 18),
        "p25_ttft_ms": 750.0, "p90_ttft_ms": 1000.0,
        # TPOT over [0.75, 1.0]: the 1-token request has none
        "mean_tpot_ms": 875.0, "median_tpot_ms": 875.0, "std_tpot_ms": 125.0,
        "p25_tpot_ms": 812.5, "p90_tpot_ms": 975.0,
        # ITL pooled over [0.5, 1.0, 1.0]: 833.3, not the mean of per-request means (875)
        "mean_itl_ms": 2500 / 3, "median_itl_ms": 1000.0, "std_itl_ms": 1000 * math.sqrt(1 / 18),
        "p25_itl_ms": 750.0, "p90_itl_ms": 1000.0,
        # E2EL over [2.5, 0.5, 2.0]
        "mean_e2el_ms": 5000 / 3, "median_e2el_ms": 2000.0, "std_e2el_ms": 1000 * math.sqrt(13 / 18),
        "p25_e2el_ms": 1250.0, "p90_e2el_ms": 2400.0,
    }
    for key, value in want.items():
        assert s[key] == pytest.approx(value, rel=1e-12), key


def test_itl_weights_count_each_gap_once_per_token():
    """A (gap, count) pair weighs as ``count`` separate gaps in the mean, std and percentiles."""
    grouped, single = GapRecorder(), GapRecorder()
    grouped.add(0.5, 1)
    grouped.add(1.0, 2)
    for gap in (1.0, 0.5, 1.0):
        single.add(gap)
    reqs, _ = hand_run()
    a = summarize(reqs, grouped, percentiles=[25, 90])
    b = summarize(reqs, single, percentiles=[25, 90])
    for key in ("mean_itl_ms", "median_itl_ms", "std_itl_ms", "p25_itl_ms", "p90_itl_ms"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key


@pytest.mark.parametrize("slos,good", [
    ({"ttft": 900.0}, 1),  # only the request with a 500 ms TTFT
    ({"ttft": 1000.0}, 3),  # a limit reached exactly is met
    ({"ttft": 1000.0, "tpot": 800.0}, 2),  # 1000 ms TPOT misses; the 1-token request has no TPOT and meets it
    ({"e2el": 2000.0}, 2),
    ({"ttft": 1000.0, "tpot": 1000.0, "e2el": 499.0}, 0),
])
def test_goodput_counts_requests_meeting_every_slo(slos, good):
    """Goodput is the requests meeting every SLO, per second of the run."""
    reqs, itl = hand_run()
    assert summarize(reqs, itl, goodput=slos)["request_goodput"] == good / 4


def test_percentiles_interpolate_linearly():
    """p0 and p100 are the extremes; between ranks the value is interpolated linearly."""
    reqs, itl = hand_run()
    s = summarize(reqs, itl, percentiles=[0, 100, 12.5, 75])
    assert (s["p0_e2el_ms"], s["p100_e2el_ms"]) == (500.0, 2500.0)
    assert s["p12.5_e2el_ms"] == pytest.approx(875.0)  # rank 0.25 between 500 and 2000
    assert s["p75_e2el_ms"] == pytest.approx(2250.0)  # rank 1.5 between 2000 and 2500


def test_simulated_run_gives_hand_computed_metrics(tmp_path):
    """Two requests on a 0.25 s step: the second arrives as the first step ends and joins the next step."""
    # Step 1 [0, 0.25]: prefill of request 0, its first token at 0.25. Request 1 arrives at
    # 0.25 and is seen by the decision at 0.25. Step 2 [0.25, 0.5]: request 0's decode and
    # request 1's prefill (its only token). Step 3 [0.5, 0.75]: request 0's last token.
    reqs = [Request(0, 0.0, 4, 3), Request(1, 0.25, 4, 1)]
    config = SchedulerConfig(policy="continuous", preempt="off")
    result = simulate(reqs, lambda: make_policy(config, BlockManager(16, 4)), ConstantCost(0.25),
                      make_router("round_robin"), 1, token_times=True, exact_steps=True)
    assert [r.token_times_s for r in result.requests] == [[0.25, 0.5, 0.75], [0.5]]
    s = summarize(result.requests, result.itl(), percentiles=[50])
    assert s["duration"] == 0.75
    assert s["request_throughput"] == 2 / 0.75
    assert (s["mean_ttft_ms"], s["median_ttft_ms"], s["std_ttft_ms"]) == (250.0, 250.0, 0.0)
    assert (s["mean_tpot_ms"], s["std_tpot_ms"]) == (250.0, 0.0)  # request 0 only
    assert (s["mean_itl_ms"], s["std_itl_ms"]) == (250.0, 0.0)  # request 0's two gaps
    assert result.itl().total == 2
    assert (s["mean_e2el_ms"], s["median_e2el_ms"]) == (500.0, 500.0)  # 750 and 250
    write_requests(tmp_path / "requests.csv", result.requests)
    rows = list(csv.DictReader((tmp_path / "requests.csv").open()))
    assert [(r["ttft_ms"], r["tpot_ms"], r["e2el_ms"]) for r in rows] == [("250.0", "250.0", "750.0"),
                                                                         ("250.0", "", "250.0")]
    assert [r["first_scheduled_s"] for r in rows] == ["0.0", "0.25"]
