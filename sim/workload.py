"""Workloads: synthetic request streams and trace replay, both as ``list[Request]``.

Every workload returns requests sorted by arrival, ids 0..n-1 in that order, the first arrival
at t = 0 (as vLLM's benchmark sends its first request at once). The same config and seed give
the same requests; nothing reads a clock or keeps state between calls.

Arrival processes (``ARRIVALS``), inter-arrival gaps for a rate in requests per second:

- ``poisson``: exponential gaps with mean 1 / rate.
- ``gamma``: gamma gaps with shape k = ``burstiness`` and scale 1 / (rate * k), as in vLLM's
  ``bench serve``: mean 1 / rate, CV = 1 / sqrt(k); k = 1 is Poisson, k < 1 burstier.
- ``constant``: gaps of exactly 1 / rate.
- ``all-at-once``: every request at t = 0 (rate is ignored).

Length distributions are strings (see ``parse_lengths``): ``fixed:N`` or ``N``,
``uniform:A:B``, ``zipf:A:MAX``, ``empirical:FILE``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from sim.request import Request
from sim.traces import TRACE_FORMATS, Trace, load_lengths, load_trace

MAX_LENGTH_TOKENS = 10_000_000
"""Largest length a spec may name (the zipf sampler holds a float64 CDF of MAX entries)."""


# -- arrival processes ---------------------------------------------------------------------------


def _poisson_gaps(rng: np.random.Generator, rate: float, burstiness: float, size: int) -> np.ndarray:
    return rng.exponential(1.0 / rate, size)


def _gamma_gaps(rng: np.random.Generator, rate: float, burstiness: float, size: int) -> np.ndarray:
    return rng.gamma(burstiness, 1.0 / (rate * burstiness), size)


def _constant_gaps(rng: np.random.Generator, rate: float, burstiness: float, size: int) -> np.ndarray:
    return np.full(size, 1.0 / rate)


def _no_gaps(rng: np.random.Generator, rate: float, burstiness: float, size: int) -> np.ndarray:
    return np.zeros(size)


ARRIVALS: dict[str, Callable[[np.random.Generator, float, float, int], np.ndarray]] = {
    "poisson": _poisson_gaps,
    "gamma": _gamma_gaps,
    "constant": _constant_gaps,
    "all-at-once": _no_gaps,
}
"""Arrival process name -> sampler of ``size`` inter-arrival gaps in seconds."""


def arrival_times(
    process: str,
    rng: np.random.Generator,
    rate: float,
    burstiness: float = 1.0,
    num_requests: int | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """Arrival times in seconds (float64, non-decreasing, first at 0) for exactly one of
    ``num_requests`` requests or every arrival before ``duration_s``."""
    if process not in ARRIVALS:
        raise ValueError(f"unknown arrival process {process!r}; known: {', '.join(ARRIVALS)}")
    if (num_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of num_requests and duration_s")
    if num_requests is not None and num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if process == "constant":
        # k / rate rather than a running sum of 1 / rate, which drifts and can move the last
        # arrival across duration_s.
        if num_requests is not None:
            return np.arange(num_requests) / rate
        assert duration_s is not None
        times_s = np.arange(math.ceil(duration_s * rate) + 1) / rate
        return times_s[times_s < duration_s]
    gaps = ARRIVALS[process]
    if num_requests is not None:
        return np.concatenate([[0.0], np.cumsum(gaps(rng, rate, burstiness, num_requests - 1))])
    assert duration_s is not None
    if process == "all-at-once":
        raise ValueError("arrival 'all-at-once' needs num_requests, not duration_s")
    # Draw gaps in chunks until the arrivals pass duration_s; the chunk size only sets how
    # many draws are wasted, and is fixed by the inputs, so the result stays deterministic.
    chunk = min(int(rate * duration_s * 1.1) + 16, 1 << 20)
    times_s = np.zeros(1)
    while times_s[-1] < duration_s:
        times_s = np.concatenate([times_s, times_s[-1] + np.cumsum(gaps(rng, rate, burstiness, chunk))])
    return times_s[: int(np.searchsorted(times_s, duration_s, side="left"))]


# -- length distributions ------------------------------------------------------------------------

LENGTH_FORMS = (
    f"'fixed:N' or 'N', 'uniform:A:B' (inclusive), 'zipf:A:MAX' (exponent A > 0, MAX >= 2), 'empirical:FILE'; "
    f"lengths 1..{MAX_LENGTH_TOKENS:,}"
)


class LengthDist(Protocol):
    """A distribution of token counts, every sample >= 1."""

    @property
    def spec(self) -> str:
        """The string it was parsed from."""
        ...

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` token counts, int64."""
        ...


@dataclass(frozen=True)
class FixedLengths:
    spec: str
    tokens: int

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return np.full(size, self.tokens, dtype=np.int64)


@dataclass(frozen=True)
class UniformLengths:
    spec: str
    low: int
    high: int

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.integers(self.low, self.high, size, dtype=np.int64, endpoint=True)


@dataclass(frozen=True)
class ZipfLengths:
    """P(k) proportional to k^-exponent on 1..max_tokens: truncated (renormalised), not clipped,
    so no mass piles up at max_tokens; and any exponent > 0 is a proper distribution."""

    spec: str
    exponent: float
    max_tokens: int

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        cdf = np.cumsum(np.arange(1, self.max_tokens + 1, dtype=np.float64) ** -self.exponent)
        cdf /= cdf[-1]
        index = np.searchsorted(cdf, rng.random(size), side="right")
        return np.minimum(index, self.max_tokens - 1).astype(np.int64) + 1


@dataclass(frozen=True)
class EmpiricalLengths:
    """Values drawn with replacement from a file (see ``sim.traces.load_lengths``); the file is
    read when sampling, not when parsing, so a config can be built without I/O."""

    spec: str
    path: str
    role: str

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        return rng.choice(load_lengths(self.path, self.role), size)


def parse_lengths(spec: str, role: str = "prompt") -> LengthDist:
    """Parse a length spec: ``fixed:N`` or bare ``N`` (N >= 1); ``uniform:A:B``, integers with
    1 <= A <= B, both ends included; ``zipf:A:MAX``, exponent A > 0 truncated to 1..MAX;
    ``empirical:FILE``, a one-column integer file or any trace file or embedded trace name, whose
    prompt lengths (``role`` "prompt": prompt_tokens / ContextTokens / input_length /
    num_prefill_tokens) or output lengths (``role`` "output": output_tokens / GeneratedTokens /
    output_length / num_decode_tokens) are sampled."""
    if role not in ("prompt", "output"):
        raise ValueError(f"role must be 'prompt' or 'output', got {role!r}")
    kind, _, rest = spec.strip().partition(":")
    if kind == "empirical" and rest:
        return EmpiricalLengths(spec, rest, role)
    parts = rest.split(":") if rest else []
    hint = ""
    try:
        if not rest and _is_int(kind):
            kind, parts = "fixed", [kind]
        if kind == "fixed" and len(parts) == 1 and 1 <= int(parts[0]) <= MAX_LENGTH_TOKENS:
            return FixedLengths(spec, int(parts[0]))
        if kind == "uniform" and len(parts) == 2 and 1 <= int(parts[0]) <= int(parts[1]) <= MAX_LENGTH_TOKENS:
            return UniformLengths(spec, int(parts[0]), int(parts[1]))
        if kind == "zipf" and len(parts) == 2:
            exponent, max_tokens = float(parts[0]), int(parts[1])
            if math.isfinite(exponent) and exponent > 0 and 2 <= max_tokens <= MAX_LENGTH_TOKENS:
                return ZipfLengths(spec, exponent, max_tokens)
            if max_tokens < 2:
                # One value is no distribution: most likely A was meant as a minimum length.
                hint = (" (zipf's A is the exponent, not a minimum: lengths run 1..MAX, so MAX must be >= 2; "
                        "write fixed:1 for 1-token lengths)")
    except ValueError:
        pass
    raise ValueError(f"bad length spec {spec!r}{hint}; accepted: {LENGTH_FORMS}")


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


# -- workloads -----------------------------------------------------------------------------------


def _check_arrival(arrival: str, rate: float, burstiness: float) -> None:
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival: unknown process {arrival!r}; known: {', '.join(ARRIVALS)}")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"rate: must be a finite number of requests per second > 0, got {rate}")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise ValueError(f"burstiness: must be a finite gamma shape k > 0, got {burstiness}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")


def _requests(arrival_s: np.ndarray, prompts: np.ndarray, outputs: np.ndarray, priority: np.ndarray) -> list[Request]:
    # .tolist() gives Python ints and floats, so requests never carry numpy scalars.
    rows = zip(arrival_s.tolist(), prompts.tolist(), outputs.tolist(), priority.tolist(), strict=True)
    return [Request(i, a, p, o, pr) for i, (a, p, o, pr) in enumerate(rows)]


@dataclass(frozen=True)
class SyntheticWorkload:
    """Requests from an arrival process and two length distributions.

    Give exactly one of ``num_requests`` and ``duration_s`` (every arrival before it). ``rate``
    is in requests per second; ``burstiness`` is the gamma shape k, used only by ``gamma``.
    Arrivals, prompt lengths and output lengths come from three streams spawned from ``seed``,
    so changing the rate or the arrival process leaves the lengths unchanged (common random
    numbers across a load sweep). ``priority_classes`` N > 1 gives each request a priority drawn
    uniformly from 0..N-1 (0 first under ``--order priority``) from a fourth stream; 1 leaves
    every priority 0.
    """

    arrival: str = "poisson"
    rate: float = 1.0
    burstiness: float = 1.0
    num_requests: int | None = 100
    duration_s: float | None = None
    prompt_dist: str = "fixed:512"
    output_dist: str = "fixed:128"
    seed: int = 0
    priority_classes: int = 1

    def __post_init__(self) -> None:
        _check_arrival(self.arrival, self.rate, self.burstiness)
        if isinstance(self.priority_classes, bool) or not isinstance(self.priority_classes, numbers.Integral) \
                or self.priority_classes < 1:
            raise ValueError(f"priority_classes: must be an integer >= 1, got {self.priority_classes!r}")
        if (self.num_requests is None) == (self.duration_s is None):
            raise ValueError(
                f"num_requests / duration_s: give exactly one, got {self.num_requests} and {self.duration_s}"
            )
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1, got {self.num_requests}")
        if self.duration_s is not None:
            if not (math.isfinite(self.duration_s) and self.duration_s > 0):
                raise ValueError(f"duration_s: must be a finite number of seconds > 0, got {self.duration_s}")
            if self.arrival == "all-at-once":
                raise ValueError("duration_s: 'all-at-once' arrivals need num_requests instead")
        for name, role in (("prompt_dist", "prompt"), ("output_dist", "output")):
            try:
                parse_lengths(getattr(self, name), role)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
        _check_seed(self.seed)

    def generate(self) -> list[Request]:
        """The requests, sorted by arrival, ids 0..n-1 (empty if nothing arrives before duration_s)."""
        # Spawned children depend only on their index: the fourth stream leaves the others as they were.
        arrival_rng, prompt_rng, output_rng, priority_rng = np.random.default_rng(self.seed).spawn(4)
        arrival_s = arrival_times(
            self.arrival, arrival_rng, self.rate, self.burstiness, self.num_requests, self.duration_s
        )
        n = len(arrival_s)
        prompts = parse_lengths(self.prompt_dist, "prompt").sample(prompt_rng, n)
        outputs = parse_lengths(self.output_dist, "output").sample(output_rng, n)
        priority = (priority_rng.integers(0, self.priority_classes, n, dtype=np.int64) if self.priority_classes > 1
                    else np.zeros(n, dtype=np.int64))
        return _requests(arrival_s, prompts, outputs, priority)


@dataclass(frozen=True)
class Replay:
    """What a ``TraceReplay`` produced, with the choices to record in a run's config."""

    requests: list[Request]
    source: str
    fmt: str
    rows: int
    """Rows replayed (the slice)."""
    prompt_scale: float
    """Factor applied to prompt lengths (1.0 = as in the trace)."""
    output_scale: float
    clamped: int
    """Zero lengths in the whole trace raised to 1 by the loader."""
    synthetic_arrivals: bool
    """True for a length-only trace, whose arrivals came from the arrival process."""


@dataclass(frozen=True)
class TraceReplay:
    """Requests replayed from a trace (embedded name or path).

    Rows ``start`` .. ``start + num_requests`` (all the rest when None) are replayed, shifted so
    the first arrives at t = 0. ``time_scale`` > 1 speeds the trace up: arrival_s / time_scale
    (2.0 replays an hour in 30 minutes at twice the rate). A length-only trace has no
    timestamps: its arrivals come from ``arrival`` / ``rate`` / ``burstiness`` / ``seed``
    (and ``time_scale`` is not applied). ``max_prompt_tokens`` / ``max_output_tokens`` scale
    lengths down proportionally so the longest in the slice fits, for a small model:
    factor = max / longest, each length rounded and clamped to 1..max; the factor is reported
    in ``Replay``.
    """

    trace: str
    fmt: str = "auto"
    time_scale: float = 1.0
    start: int = 0
    num_requests: int | None = None
    arrival: str = "poisson"
    rate: float = 1.0
    burstiness: float = 1.0
    seed: int = 0
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None

    def __post_init__(self) -> None:
        if not self.trace:
            raise ValueError("trace: must name an embedded trace or a file, got ''")
        if self.fmt not in TRACE_FORMATS:
            raise ValueError(f"fmt: unknown trace format {self.fmt!r}; known: {', '.join(TRACE_FORMATS)}")
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale: must be a finite factor > 0, got {self.time_scale}")
        if self.start < 0:
            raise ValueError(f"start: must be a row index >= 0, got {self.start}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests: must be >= 1 or None for every row, got {self.num_requests}")
        _check_arrival(self.arrival, self.rate, self.burstiness)
        _check_seed(self.seed)
        for name in ("max_prompt_tokens", "max_output_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or None for no limit, got {value}")

    def requests(self) -> list[Request]:
        """The replayed requests, sorted by arrival, ids 0..n-1."""
        return self.replay().requests

    def replay(self) -> Replay:
        """Load the trace and build the requests, with the scale factors used."""
        trace = load_trace(self.trace, self.fmt)
        rows = self._rows(trace)
        prompts, prompt_scale = _fit(trace.prompt_tokens[rows], self.max_prompt_tokens)
        outputs, output_scale = _fit(trace.output_tokens[rows], self.max_output_tokens)
        n = len(prompts)
        if trace.arrival_s is None:
            rng = np.random.default_rng(self.seed)
            arrival_s = arrival_times(self.arrival, rng, self.rate, self.burstiness, num_requests=n)
        else:
            sliced_s = trace.arrival_s[rows]
            arrival_s = (sliced_s - sliced_s[0]) / self.time_scale
        requests = _requests(arrival_s, prompts, outputs, trace.priority[rows])
        return Replay(
            requests, trace.source, trace.fmt, n, prompt_scale, output_scale, trace.clamped, trace.arrival_s is None
        )

    def _rows(self, trace: Trace) -> slice:
        if self.start >= len(trace):
            raise ValueError(f"start: row {self.start} is past the end of {trace.source} ({len(trace)} rows)")
        left = len(trace) - self.start
        if self.num_requests is not None and self.num_requests > left:
            raise ValueError(
                f"num_requests: {self.num_requests} rows asked for but {trace.source} has {left} from row {self.start}"
            )
        return slice(self.start, self.start + (self.num_requests or left))


def _fit(tokens: np.ndarray, max_tokens: int | None) -> tuple[np.ndarray, float]:
    """Scale lengths down proportionally so the longest is ``max_tokens``; (lengths, factor)."""
    longest = int(tokens.max())
    if max_tokens is None or longest <= max_tokens:
        return tokens, 1.0
    scale = max_tokens / longest
    return np.clip(np.rint(tokens * scale), 1, max_tokens).astype(np.int64), scale
