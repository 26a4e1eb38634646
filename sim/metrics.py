"""Serving metrics with vLLM's names and definitions (``vllm bench serve``).

TTFT = first token - arrival. TPOT = (E2EL - TTFT) / (output tokens - 1), for requests with
more than one output token. ITL = every gap between consecutive tokens of a request, pooled
over all requests. E2EL = finish - arrival. Throughputs divide by the duration from the first
arrival to the last finish. A request counts towards goodput when it meets every SLO given.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from sim.request import Request, Status

DEFAULT_PERCENTILES = (90.0, 99.0)
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


class GapRecorder:
    """Inter-token gaps as (gap, count) pairs, so memory grows with steps, not tokens."""

    def __init__(self) -> None:
        self._gaps: list[float] = []
        self._counts: list[int] = []
        self._gap_runs: list[np.ndarray] = []
        self._count_runs: list[np.ndarray] = []

    def add(self, gap_s: float, count: int = 1) -> None:
        if count > 0:
            self._gaps.append(gap_s)
            self._counts.append(count)

    def add_many(self, gaps_s: np.ndarray, counts: np.ndarray) -> None:
        """Many (gap, count) pairs at once (a run of steps)."""
        self._gap_runs.append(np.asarray(gaps_s, dtype=np.float64))
        self._count_runs.append(np.asarray(counts, dtype=np.int64))

    def extend(self, other: GapRecorder) -> None:
        self._gaps.extend(other._gaps)
        self._counts.extend(other._counts)
        self._gap_runs.extend(other._gap_runs)
        self._count_runs.extend(other._count_runs)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        gaps = np.concatenate([np.asarray(self._gaps, dtype=np.float64), *self._gap_runs])
        counts = np.concatenate([np.asarray(self._counts, dtype=np.int64), *self._count_runs])
        keep = counts > 0
        return gaps[keep], counts[keep]

    @property
    def total(self) -> int:
        return int(sum(self._counts) + sum(int(c.sum()) for c in self._count_runs))


@dataclass
class TimeSeries:
    """One row per scheduling decision of a replica."""

    time_s: list[float] = field(default_factory=list)
    batch_size: list[int] = field(default_factory=list)
    num_waiting: list[int] = field(default_factory=list)
    num_running: list[int] = field(default_factory=list)
    kv_blocks_used: list[int] = field(default_factory=list)

    def record(self, now: float, batch_size: int, waiting: int, running: int, kv_used: int) -> None:
        self.time_s.append(now)
        self.batch_size.append(batch_size)
        self.num_waiting.append(waiting)
        self.num_running.append(running)
        self.kv_blocks_used.append(kv_used)


def weighted_percentile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The q-th percentile of ``values`` each repeated ``weights`` times, interpolated as numpy's
    default ('linear') would on the expanded array."""
    if values.size == 0 or weights.sum() == 0:
        return 0.0
    order = np.argsort(values, kind="stable")
    v, w = values[order], weights[order]
    n = int(w.sum())
    pos = (n - 1) * q / 100.0
    lo, hi = int(np.floor(pos)), int(np.ceil(pos))
    ends = np.cumsum(w)  # element i occupies expanded positions [ends[i]-w[i], ends[i])
    v_lo = v[np.searchsorted(ends, lo, side="right")]
    v_hi = v[np.searchsorted(ends, hi, side="right")]
    return float(v_lo + (v_hi - v_lo) * (pos - lo))


def _weighted_stats(prefix: str, values_s: np.ndarray, weights: np.ndarray,
                    percentiles: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    total = weights.sum()
    if total > 0:
        mean = float((values_s * weights).sum() / total)
        var = float((weights * (values_s - mean) ** 2).sum() / total)
    else:
        mean = var = 0.0
    out[f"mean_{prefix}_ms"] = mean * 1000
    out[f"median_{prefix}_ms"] = weighted_percentile(values_s, weights, 50) * 1000
    out[f"std_{prefix}_ms"] = float(np.sqrt(max(var, 0.0))) * 1000
    for p in percentiles:
        out[f"p{_pword(p)}_{prefix}_ms"] = weighted_percentile(values_s, weights, p) * 1000
    return out


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
    tpot = (e2el - ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None
    return ttft, tpot, e2el


def summarize(requests: Sequence[Request], itl: GapRecorder,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              goodput: dict[str, float] | None = None, num_preemptions: int | None = None) -> dict:
    """The vLLM-style summary of a run, plus ``rejected`` and its reasons."""
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
    gaps, counts = itl.arrays()
    out.update(_weighted_stats("itl", gaps, counts, percentiles))
    arr = np.asarray(e2el, dtype=np.float64)
    out.update(_weighted_stats("e2el", arr, np.ones(arr.size, dtype=np.int64), percentiles))
    return out


def _meets(slos: dict[str, float], ttft: float, tpot: float | None, e2el: float) -> bool:
    values = {"ttft": ttft, "tpot": tpot, "e2el": e2el}
    for name, ms in slos.items():
        v = values[name]
        if v is not None and v * 1000 > ms:
            return False
    return True
