"""Workloads: arrival processes, length specs, synthetic generation and trace replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim.traces import load_trace
from sim.workload import ARRIVALS, SyntheticWorkload, TraceReplay, arrival_times, parse_lengths

SHARED = Path("/work/shared/traces")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="needs /work/shared/traces")


def as_tuples(requests):
    return [(r.id, r.arrival_s, r.prompt_tokens, r.output_tokens, r.priority) for r in requests]


def gaps_of(process: str, rate: float, burstiness: float = 1.0, n: int = 40_000, seed: int = 1) -> np.ndarray:
    return np.diff(arrival_times(process, np.random.default_rng(seed), rate, burstiness, num_requests=n))


# -- arrival processes -----------------------------------------------------------------------------


def test_gamma_k1_matches_poisson_statistics():
    """Gamma arrivals with k = 1 have Poisson's mean gap and CV of 1."""
    rate = 4.0
    for gaps in (gaps_of("poisson", rate), gaps_of("gamma", rate, 1.0)):
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
        assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("k", [0.25, 4.0])
def test_gamma_burstiness_sets_cv(k):
    """Gamma gaps keep the mean 1/rate and have CV 1/sqrt(k)."""
    gaps = gaps_of("gamma", 2.0, k)
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(k), rel=0.05)


def test_constant_and_all_at_once():
    """Constant arrivals are evenly spaced from 0; all-at-once are all at 0."""
    rng = np.random.default_rng(0)
    assert arrival_times("constant", rng, 4.0, num_requests=4).tolist() == [0.0, 0.25, 0.5, 0.75]
    assert arrival_times("all-at-once", rng, 4.0, num_requests=3).tolist() == [0.0, 0.0, 0.0]


def test_duration_stops_before_the_end():
    """With duration_s every arrival falls before it, at about rate * duration requests."""
    times_s = arrival_times("poisson", np.random.default_rng(3), 50.0, duration_s=100.0)
    assert times_s[-1] < 100.0
    assert len(times_s) == pytest.approx(5000, rel=0.05)
    assert len(arrival_times("constant", np.random.default_rng(3), 2.0, duration_s=5.0)) == 10


def test_unknown_arrival_lists_known():
    """An unknown arrival process is an error that lists the known ones."""
    with pytest.raises(ValueError, match="poisson"):
        SyntheticWorkload(arrival="bursty")
    assert set(ARRIVALS) == {"poisson", "gamma", "constant", "all-at-once"}


# -- length specs --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(low=st.integers(1, 10_000), width=st.integers(0, 10_000), seed=st.integers(0, 2**32 - 1))
def test_uniform_spec_stays_in_range(low, width, seed):
    """uniform:A:B samples integers in [A, B], both ends included."""
    sample = parse_lengths(f"uniform:{low}:{low + width}").sample(np.random.default_rng(seed), 200)
    assert sample.dtype == np.int64
    assert sample.min() >= low and sample.max() <= low + width


@settings(max_examples=60, deadline=None)
@given(exponent=st.floats(0.1, 4.0), max_tokens=st.integers(2, 5000), seed=st.integers(0, 2**32 - 1))
def test_zipf_spec_stays_in_range(exponent, max_tokens, seed):
    """zipf:A:MAX samples integers in 1..MAX for any exponent > 0."""
    sample = parse_lengths(f"zipf:{exponent}:{max_tokens}").sample(np.random.default_rng(seed), 200)
    assert sample.min() >= 1 and sample.max() <= max_tokens


@settings(max_examples=100, deadline=None)
@given(spec=st.text(max_size=20))
def test_any_spec_parses_or_names_itself(spec):
    """Every string either parses to a distribution or raises a ValueError naming the spec and forms."""
    try:
        dist = parse_lengths(spec)
    except ValueError as e:
        assert repr(spec) in str(e) and "uniform:A:B" in str(e)
    else:
        assert dist.spec == spec


def test_fixed_and_bare_integer():
    """fixed:N and a bare N give N every time."""
    rng = np.random.default_rng(0)
    assert parse_lengths("fixed:7").sample(rng, 3).tolist() == [7, 7, 7]
    assert parse_lengths("12").sample(rng, 2).tolist() == [12, 12]


def test_zipf_is_truncated_not_clipped():
    """A heavy zipf tail is renormalised onto 1..MAX, so MAX is not a spike."""
    sample = parse_lengths("zipf:1.1:100").sample(np.random.default_rng(0), 50_000)
    assert np.mean(sample == 100) < 2 * np.mean(sample == 99)
    assert np.mean(sample == 1) > np.mean(sample == 2) > np.mean(sample == 3)


@pytest.mark.parametrize(
    "spec", ["fixed:0", "0", "-5", "uniform:0:5", "uniform:9:3", "zipf:0:10", "zipf:1.5", "x:1", "fixed:10000001"]
)
def test_bad_specs_are_rejected(spec):
    """Out-of-range and malformed specs are rejected with the accepted forms."""
    with pytest.raises(ValueError, match="accepted"):
        parse_lengths(spec)


def test_empirical_samples_file_values(tmp_path):
    """empirical:FILE draws only values present in the file, from the column matching the role."""
    path = tmp_path / "lengths.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n100,1\n200,2\n300,3\n")
    rng = np.random.default_rng(0)
    assert set(parse_lengths(f"empirical:{path}", "prompt").sample(rng, 100).tolist()) == {100, 200, 300}
    assert set(parse_lengths(f"empirical:{path}", "output").sample(rng, 100).tolist()) == {1, 2, 3}


def test_empirical_reads_no_file_until_sampled():
    """Parsing an empirical spec does no I/O, so a config can be built before the file exists."""
    dist = parse_lengths("empirical:/no/such/file.csv")
    with pytest.raises(ValueError, match="no such file"):
        dist.sample(np.random.default_rng(0), 1)


# -- SyntheticWorkload ---------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_ordered():
    """The same config gives identical requests, sorted by arrival with ids 0..n-1."""
    workload = SyntheticWorkload(
        arrival="gamma",
        rate=8.0,
        burstiness=0.5,
        num_requests=300,
        prompt_dist="zipf:1.2:2048",
        output_dist="uniform:1:256",
        seed=42,
    )
    first, second = workload.generate(), workload.generate()
    assert as_tuples(first) == as_tuples(second)
    assert [r.id for r in first] == list(range(300))
    arrivals_s = [r.arrival_s for r in first]
    assert arrivals_s == sorted(arrivals_s) and arrivals_s[0] == 0.0
    assert all(type(r.arrival_s) is float and type(r.prompt_tokens) is int for r in first)


def test_seed_changes_requests():
    """Different seeds give different requests."""
    a = SyntheticWorkload(num_requests=50, prompt_dist="uniform:1:1000", seed=1).generate()
    b = SyntheticWorkload(num_requests=50, prompt_dist="uniform:1:1000", seed=2).generate()
    assert as_tuples(a) != as_tuples(b)


def test_lengths_do_not_depend_on_rate():
    """Changing the rate changes arrivals but not lengths (common random numbers)."""
    slow = SyntheticWorkload(rate=1.0, num_requests=50, prompt_dist="uniform:1:1000", seed=5).generate()
    fast = SyntheticWorkload(rate=9.0, num_requests=50, prompt_dist="uniform:1:1000", seed=5).generate()
    assert [r.prompt_tokens for r in slow] == [r.prompt_tokens for r in fast]
    assert [r.arrival_s for r in slow] != [r.arrival_s for r in fast]


def test_duration_workload():
    """duration_s instead of num_requests yields every arrival before it."""
    requests = SyntheticWorkload(arrival="constant", rate=10.0, num_requests=None, duration_s=2.0).generate()
    assert len(requests) == 20 and requests[-1].arrival_s < 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": float("inf")}, "rate"),
        ({"burstiness": -1.0}, "burstiness"),
        ({"num_requests": 0}, "num_requests"),
        ({"num_requests": None}, "num_requests / duration_s"),
        ({"num_requests": 5, "duration_s": 1.0}, "num_requests / duration_s"),
        ({"num_requests": None, "duration_s": -1.0}, "duration_s"),
        ({"arrival": "all-at-once", "num_requests": None, "duration_s": 1.0}, "duration_s"),
        ({"prompt_dist": "uniform:5"}, "prompt_dist"),
        ({"output_dist": "fixed:-1"}, "output_dist"),
        ({"seed": -1}, "seed"),
    ],
)
def test_synthetic_validation_names_the_field(kwargs, field):
    """Invalid settings are rejected at construction with a message naming the field."""
    with pytest.raises(ValueError, match=f"^{field}"):
        SyntheticWorkload(**kwargs)


# -- TraceReplay ---------------------------------------------------------------------------------


def test_replay_whole_trace(tmp_path):
    """A servesim trace replays as written, priorities included."""
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens,priority\n1.0,10,5,2\n3.0,20,6,0\n")
    assert as_tuples(TraceReplay(str(path)).requests()) == [(0, 0.0, 10, 5, 2), (1, 2.0, 20, 6, 0)]


def test_replay_slice_and_time_scale():
    """A slice starts at t = 0 and time_scale > 1 compresses the gaps."""
    trace = load_trace("azure-conv")
    assert trace.arrival_s is not None
    requests = TraceReplay("azure-conv", time_scale=2.0, start=1000, num_requests=500).requests()
    assert len(requests) == 500 and [r.id for r in requests] == list(range(500))
    assert requests[0].arrival_s == 0.0
    expected_s = (trace.arrival_s[1000:1500] - trace.arrival_s[1000]) / 2.0
    assert [r.arrival_s for r in requests] == pytest.approx(expected_s.tolist())
    assert [r.prompt_tokens for r in requests] == trace.prompt_tokens[1000:1500].tolist()


def test_replay_slice_past_end_is_an_error():
    """Asking for rows the trace does not have names the field."""
    with pytest.raises(ValueError, match=r"^num_requests"):
        TraceReplay("azure-conv", start=19_000, num_requests=1000).requests()
    with pytest.raises(ValueError, match=r"^start"):
        TraceReplay("azure-conv", start=19_366).requests()


def test_replay_scales_lengths_to_fit():
    """max_prompt/output_tokens scale lengths proportionally so the longest fits, and report the factor."""
    replay = TraceReplay("azure-conv", num_requests=2000, max_prompt_tokens=512, max_output_tokens=64).replay()
    trace = load_trace("azure-conv")
    longest = int(trace.prompt_tokens[:2000].max())
    assert replay.prompt_scale == pytest.approx(512 / longest)
    assert max(r.prompt_tokens for r in replay.requests) == 512
    assert max(r.output_tokens for r in replay.requests) <= 64
    assert min(r.prompt_tokens for r in replay.requests) >= 1
    # Proportional: the order of lengths is kept.
    original = trace.prompt_tokens[:2000]
    scaled = np.array([r.prompt_tokens for r in replay.requests])
    assert np.all(np.diff(scaled[np.argsort(original, kind="stable")]) >= 0)


def test_replay_no_scaling_when_it_fits():
    """A limit above the longest length leaves lengths as they are."""
    replay = TraceReplay("azure-conv", num_requests=100, max_prompt_tokens=100_000).replay()
    assert replay.prompt_scale == 1.0 and replay.output_scale == 1.0


def test_replay_length_only_trace_draws_arrivals(tmp_path):
    """A length-only trace keeps its lengths in order and takes arrivals from the process, deterministically."""
    path = tmp_path / "l.csv"
    path.write_text("num_prefill_tokens,num_decode_tokens\n" + "".join(f"{i + 1},{i + 2}\n" for i in range(100)))
    replay = TraceReplay(str(path), arrival="constant", rate=4.0).replay()
    assert replay.synthetic_arrivals
    assert [r.arrival_s for r in replay.requests[:3]] == [0.0, 0.25, 0.5]
    assert [r.prompt_tokens for r in replay.requests] == list(range(1, 101))
    poisson = TraceReplay(str(path), arrival="poisson", rate=4.0, seed=9)
    assert as_tuples(poisson.requests()) == as_tuples(poisson.requests())


@needs_shared
def test_replay_mooncake_slice():
    """The Mooncake trace replays from its shared copy, starting at 0."""
    requests = TraceReplay(str(SHARED / "mooncake" / "conversation_trace.jsonl"), start=100, num_requests=50).requests()
    assert len(requests) == 50 and requests[0].arrival_s == 0.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"time_scale": 0.0}, "time_scale"),
        ({"start": -1}, "start"),
        ({"num_requests": 0}, "num_requests"),
        ({"fmt": "csv"}, "fmt"),
        ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
        ({"rate": -2.0}, "rate"),
    ],
)
def test_replay_validation_names_the_field(kwargs, field):
    """Invalid replay settings are rejected at construction with a message naming the field."""
    with pytest.raises(ValueError, match=f"^{field}"):
        TraceReplay("azure-conv", **kwargs)
