"""Serving metrics with vLLM's names and definitions (``vllm bench serve``).

TTFT = first token - arrival. TPOT = (E2EL - TTFT) / (output tokens - 1), for requests with
more than one output token. ITL = every gap between consecutive tokens of a request, pooled
over all requests. E2EL = finish - arrival. Throughputs divide by the duration from the first
arrival to the last finish. A request counts towards goodput when it meets every SLO given.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sim.batch import ScheduledSeq
from sim.request import Request, Status

DEFAULT_PERCENTILES = (90.0, 99.0)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


class GapRecorder:
    """Inter-token gaps as (gap, count) pairs, so memory grows with steps, not tokens."""

    def __init__(self) -> None:
        self._gaps = array("d")
        self._counts = array("q")

    def add(self, gap_s: float, count: int = 1) -> None:
        if count > 0:
            self._gaps.append(gap_s)
            self._counts.append(count)

    def add_many(self, gaps_s: Sequence[float] | np.ndarray, counts: np.ndarray | int) -> None:
        """Many (gap, count) pairs at once (a run of steps); ``counts`` may be one count for all."""
        if isinstance(counts, int):
            self._gaps.extend(gaps_s)
            self._counts.extend(array("q", [counts]) * len(gaps_s))
            return
        gaps = np.ascontiguousarray(gaps_s, dtype=np.float64)
        self._gaps.frombytes(gaps.tobytes())
        self._counts.frombytes(np.ascontiguousarray(counts, dtype=np.int64).tobytes())

    def extend(self, other: GapRecorder) -> None:
        self._gaps.extend(other._gaps)
        self._counts.extend(other._counts)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        gaps = np.frombuffer(self._gaps, dtype=np.float64) if self._gaps else np.zeros(0)
        counts = np.frombuffer(self._counts, dtype=np.int64) if self._counts else np.zeros(0, dtype=np.int64)
        keep = counts > 0
        return gaps[keep], counts[keep]

    @property
    def total(self) -> int:
        return int(np.frombuffer(self._counts, dtype=np.int64).sum()) if self._counts else 0


def record_gaps(itl: GapRecorder, seqs: Sequence[ScheduledSeq], last_token_s: Sequence[float | None],
                now: float) -> None:
    """Add the inter-token gap of every sequence that sampled a token at ``now`` and had one before."""
    gaps: dict[float, int] = {}
    for s, prev in zip(seqs, last_token_s, strict=True):
        if prev is not None and s.request.last_token_s == now:
            gap = now - prev
            gaps[gap] = gaps.get(gap, 0) + 1
    for gap, count in gaps.items():
        itl.add(gap, count)


def record_run_gaps(itl: GapRecorder, seqs: Sequence[ScheduledSeq], before: Sequence[tuple[float | None, int]],
                    ends_s: Sequence[float]) -> None:
    """Inter-token gaps of a run of decode steps: the first step's per sequence, then one gap
    per step shared by every sequence that produced a token in it."""
    produced = []
    first_gaps: dict[float, int] = {}
    for s, (prev, generated) in zip(seqs, before, strict=True):
        k = s.request.num_generated - generated
        produced.append(k)
        if k > 0 and prev is not None:
            gap = ends_s[0] - prev
            first_gaps[gap] = first_gaps.get(gap, 0) + 1
    for gap, count in first_gaps.items():
        itl.add(gap, count)
    if len(ends_s) > 1:
        ends = np.asarray(ends_s)
        # Step j (from 1) gives a token to every sequence that produced more than j tokens.
        done_by = np.searchsorted(np.sort(np.asarray(produced)), np.arange(1, len(ends_s)), side="right")
        itl.add_many(np.diff(ends), len(produced) - done_by)


def _floats() -> array:
    return array("d")


def _ints() -> array:
    return array("q")


@dataclass
class TimeSeries:
    """One row per scheduling decision of a replica (compact arrays: millions of rows fit)."""

    time_s: array = field(default_factory=_floats)
    batch_size: array = field(default_factory=_ints)
    num_waiting: array = field(default_factory=_ints)
    num_running: array = field(default_factory=_ints)
    kv_blocks_used: array = field(default_factory=_ints)

    def record(self, now: float, batch_size: int, waiting: int, running: int, kv_used: int) -> None:
        self.time_s.append(now)
        self.batch_size.append(batch_size)
        self.num_waiting.append(waiting)
        self.num_running.append(running)
        self.kv_blocks_used.append(kv_used)


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The q-th percentile of ``values`` each repeated ``weights`` times, interpolated as numpy's
    default ('linear') would on the expanded array."""
    return _weighted_percentiles(values, weights)(q)


def _weighted_percentiles(values: np.ndarray, weights: np.ndarray) -> Callable[[float], float]:
    """:func:`weighted_percentile` of ``values`` as a function of q, sorting them once."""
    if values.size == 0 or weights.sum() == 0:
        return lambda q: 0.0
    order = np.argsort(values, kind="stable")
    v = values[order]
    ends = np.cumsum(weights[order])  # element i occupies expanded positions [ends[i]-w[i], ends[i])
    n = int(ends[-1])

    def percentile(q: float) -> float:
        pos = (n - 1) * q / 100.0
        lo, hi = int(np.floor(pos)), int(np.ceil(pos))
        v_lo = v[np.searchsorted(ends, lo, side="right")]
        v_hi = v[np.searchsorted(ends, hi, side="right")]
        return float(v_lo + (v_hi - v_lo) * (pos - lo))

    return percentile


def _weighted_stats(prefix: str, values_s: np.ndarray, weights: np.ndarray,
                    percentiles: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    total = weights.sum()
    if total > 0:
        mean = float((values_s * weights).sum() / total)
        var = float((weights * (values_s - mean) ** 2).sum() / total)
    else:
        mean = var = 0.0
    percentile = _weighted_percentiles(values_s, weights)
    out[f"mean_{prefix}_ms"] = mean * 1000
    out[f"median_{prefix}_ms"] = percentile(50) * 1000
    out[f"std_{prefix}_ms"] = float(np.sqrt(max(var, 0.0))) * 1000
    for p in percentiles:
        out[f"p{_pword(p)}_{prefix}_ms"] = percentile(p) * 1000
    return out


def parse_percentiles(text: str) -> list[float]:
    """``"90,99,99.9"`` -> ``[90.0, 99.0, 99.9]`` (sorted, unique); each must be in [0, 100]
    (0 is the minimum, 100 the maximum)."""
    values = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            values.append(float(item))
        except ValueError:
            raise ValueError(f"percentile {item.strip()!r} is not a number; expected numbers in [0, 100] "
                             "separated by commas, e.g. 50,90,99") from None
    check_percentiles(values)
    return sorted(set(values))


def check_percentiles(percentiles: Sequence[float]) -> None:
    """ValueError unless every percentile is a number in [0, 100]."""
    bad = [p for p in percentiles if not (isinstance(p, int | float) and 0 <= p <= 100)]
    if bad:
        raise ValueError(f"percentiles must be in [0, 100], got {', '.join(f'{p:g}' for p in bad)}")


def _pword(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """``["ttft:200", "tpot:50"]`` -> ``{"ttft": 200.0, "tpot": 50.0}`` (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"goodput SLO {item!r}: expected NAME:MS with NAME one of {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput SLO {item!r}: {value!r} is not a number of milliseconds") from None
        if ms <= 0:
            raise ValueError(f"goodput SLO {item!r}: the target must be > 0 ms")
        slos[name] = ms
    return slos


def request_latencies(r: Request) -> tuple[float, float | None, float]:
    """(TTFT, TPOT or None, E2EL) of a finished request, in seconds."""
    assert r.first_token_s is not None and r.finish_s is not None
    ttft = r.first_token_s - r.arrival_s
    e2el = r.finish_s - r.arrival_s
    # Tokens received, not asked for: they differ when an external engine stops early (vLLM
    # divides by the tokens it got too); the simulator and the live engine give what was asked.
    tpot = (e2el - ttft) / (r.num_generated - 1) if r.num_generated > 1 else None
    return ttft, tpot, e2el


def summarize(requests: Sequence[Request], itl: GapRecorder,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              goodput: dict[str, float] | None = None, num_preemptions: int | None = None) -> dict:
    """The vLLM-style summary of a run, plus ``rejected`` and its reasons."""
    check_percentiles(percentiles)
    done = [r for r in requests if r.status is Status.FINISHED]
    rejected = [r for r in requests if r.status is Status.REJECTED]
    ttft, tpot, e2el = [], [], []
    good = 0
    for r in done:
        t, p, e = request_latencies(r)
        ttft.append(t)
        e2el.append(e)
        if p is not None:
            tpot.append(p)
        if goodput and _meets(goodput, t, p, e):
            good += 1
    start = min((r.arrival_s for r in requests), default=0.0)
    end = max((r.finish_s for r in done if r.finish_s is not None), default=start)
    duration = end - start
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.num_generated for r in done)

    def rate(x: float) -> float:
        return x / duration if duration > 0 else 0.0

    reasons: dict[str, int] = {}
    for r in rejected:
        key = r.reject_reason or "unknown"
        reasons[key] = reasons.get(key, 0) + 1
    out: dict = {
        "duration": duration,
        "completed": len(done),
        "rejected": len(rejected),
        "reject_reasons": dict(sorted(reasons.items())),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": rate(len(done)),
        "request_goodput": rate(good) if goodput else None,
        "output_throughput": rate(output_tokens),
        "total_token_throughput": rate(input_tokens + output_tokens),
        "num_preemptions": num_preemptions if num_preemptions is not None else sum(r.preemptions for r in requests),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot)):
        arr = np.asarray(values, dtype=np.float64)
        out.update(_weighted_stats(name, arr, np.ones(arr.size, dtype=np.int64), percentiles))
    gaps, counts = _merge_equal(*itl.arrays())
    out.update(_weighted_stats("itl", gaps, counts, percentiles))
    arr = np.asarray(e2el, dtype=np.float64)
    out.update(_weighted_stats("e2el", arr, np.ones(arr.size, dtype=np.int64), percentiles))
    return out


def _merge_equal(gaps: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One (gap, summed count) pair per distinct gap, in ascending order. The same gaps may come
    as many (gap, 1) pairs or fewer pairs with counts (the fast path); merged, the statistics'
    sums run in one order and both give the same bytes."""
    order = np.argsort(gaps)
    gaps, counts = gaps[order], counts[order]
    if gaps.size == 0:
        return gaps, counts
    starts = np.flatnonzero(np.concatenate(([True], gaps[1:] != gaps[:-1])))
    return gaps[starts], np.add.reduceat(counts, starts)


def _meets(slos: dict[str, float], ttft: float, tpot: float | None, e2el: float) -> bool:
    values = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
    for name, ms in slos.items():
        v = values[name]
        if v is not None and v * 1000 > ms:
            return False
    return True
