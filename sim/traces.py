"""Request traces: loaders for the formats servesim reads, and summary statistics.

Formats (``fmt``), auto-detected from the first line unless named:

- ``servesim``: CSV ``arrival_s,prompt_tokens,output_tokens[,priority]``; arrival_s as written.
- ``azure``: the Azure LLM inference CSV ``TIMESTAMP,ContextTokens,GeneratedTokens`` with
  timestamps like ``2023-11-16 18:15:46.6805900``; arrival_s is seconds since the first row.
- ``mooncake``: JSONL, one object per line with ``timestamp`` (ms, relative to the trace start),
  ``input_length`` and ``output_length``; ``hash_ids`` is ignored. arrival_s = timestamp / 1000.
- ``lengths``: CSV ``num_prefill_tokens,num_decode_tokens,...`` with no timestamps (the
  Sarathi/Vidur length files). ``Trace.arrival_s`` is None; the caller draws arrivals from
  an arrival process (``sim.workload.TraceReplay``).

Zero lengths: servesim files are written by people or by servesim and are strict (every length
>= 1). The vendor formats (azure, mooncake, lengths) record what production saw, where a
request with no generated tokens (cancelled, filtered) can occur; a zero there is raised to 1
and counted in ``Trace.clamped`` rather than rejecting the whole trace. Negative or non-numeric
lengths are errors in every format. (The embedded ``azure-conv`` trace has no zero lengths.)

Embedded traces are loaded by exact name (``EMBEDDED_TRACES``) from ``sim/data/``.
"""

from __future__ import annotations

import csv
import datetime
import io
import itertools
import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import numpy as np

TRACE_FORMATS = ("auto", "servesim", "azure", "mooncake", "lengths")
EMBEDDED_TRACES = {"azure-conv": "azure-conv.csv"}
"""Embedded trace name -> file in ``sim/data/`` (see its README.md for source and licence)."""

# Canonical column names per CSV format; matching is case-insensitive.
_COLUMNS = {
    "servesim": ("arrival_s", "prompt_tokens", "output_tokens"),
    "azure": ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    "lengths": ("num_prefill_tokens", "num_decode_tokens"),
}
_MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")
_EXPECTED = (
    "servesim 'arrival_s,prompt_tokens,output_tokens[,priority]', "
    "azure 'TIMESTAMP,ContextTokens,GeneratedTokens', lengths 'num_prefill_tokens,num_decode_tokens,...' "
    "or mooncake JSONL"
)
_TIMESTAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*(Z|[+-]\d{2}:?\d{2})?")


class TraceError(ValueError):
    """A malformed trace file, located by file, 1-based line and field (None when no single field)."""

    def __init__(self, source: str, line: int, field: str | None, problem: str) -> None:
        self.source = source
        self.line = line
        self.field = field
        where = f"{source}, line {line}" + (f", field {field!r}" if field is not None else "")
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, eq=False)
class Trace:
    """Rows of a trace as read-only numpy arrays, in file order (arrivals non-decreasing)."""

    source: str
    fmt: str
    arrival_s: np.ndarray | None
    """float64 seconds, or None for a length-only trace."""
    prompt_tokens: np.ndarray
    """int64, every value >= 1."""
    output_tokens: np.ndarray
    """int64, every value >= 1."""
    priority: np.ndarray
    """int64; zeros unless the file has a priority column."""
    clamped: int = 0
    """Rows of a vendor format whose zero length was raised to 1."""

    def __post_init__(self) -> None:
        for array in (self.arrival_s, self.prompt_tokens, self.output_tokens, self.priority):
            if array is not None:
                array.setflags(write=False)

    def __len__(self) -> int:
        return len(self.prompt_tokens)

    @property
    def has_arrivals(self) -> bool:
        return self.arrival_s is not None


def load_trace(name_or_path: str, fmt: str = "auto") -> Trace:
    """Load an embedded trace by exact name, or a trace file by path, in format ``fmt``."""
    if fmt not in TRACE_FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(TRACE_FORMATS)}")
    file = _resolve(name_or_path)
    source = str(file)
    with _open_text(file) as f:
        first = f.readline()
        if not first.strip():
            raise TraceError(source, 1, None, f"empty file; expected a header: {_EXPECTED}")
        if fmt == "auto":
            fmt = _detect(source, first)
        lines = itertools.chain([first], f)
        if fmt == "mooncake":
            return _load_mooncake(source, lines)
        return _load_csv(source, fmt, lines)


def _resolve(name_or_path: str) -> Traversable:
    if name_or_path in EMBEDDED_TRACES:
        return resources.files("sim") / "data" / EMBEDDED_TRACES[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return path
    raise ValueError(
        f"unknown trace {name_or_path!r}: not an embedded trace (known: {', '.join(EMBEDDED_TRACES)}) and no such file"
    )


def _open_text(file: Traversable) -> io.TextIOWrapper:
    # newline="" as the csv module asks; "utf-8-sig" drops the BOM some spreadsheet exports add.
    return io.TextIOWrapper(file.open("rb"), encoding="utf-8-sig", newline="")


def _detect(source: str, first_line: str) -> str:
    if first_line.lstrip().startswith("{"):
        return "mooncake"
    header = {name.strip().lower() for name in next(csv.reader([first_line]))}
    for fmt, columns in _COLUMNS.items():
        if header & {c.lower() for c in columns}:
            return fmt
    raise TraceError(source, 1, None, f"unrecognised header {_clip(first_line.strip())!r}; expected {_EXPECTED}")


def _load_csv(source: str, fmt: str, lines: Iterable[str]) -> Trace:
    if fmt not in _COLUMNS:
        raise ValueError(f"unknown trace format {fmt!r}; known: {', '.join(TRACE_FORMATS)}")
    reader = csv.reader(lines)
    header = [name.strip() for name in next(reader)]
    index = {name.lower(): i for i, name in enumerate(header)}
    wanted = _COLUMNS[fmt] + (("priority",) if fmt == "servesim" and "priority" in index else ())
    for column in wanted:
        if column.lower() not in index:
            raise TraceError(source, 1, column, f"missing column; the header is {_clip(','.join(header))!r}")
    columns = [(index[c.lower()], header[index[c.lower()]]) for c in wanted]
    timed = fmt != "lengths"
    strict = fmt == "servesim"
    prompt_at = 1 if timed else 0

    times: list[Any] = []
    prompts: list[int] = []
    outputs: list[int] = []
    priorities: list[int] = []
    line_numbers: list[int] = []
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # blank line, e.g. at the end of a hand-written file
        cells = []
        for i, column in columns:
            if i >= len(row):
                raise TraceError(source, line, column, f"missing value; the row has {len(row)} fields")
            cells.append(row[i].strip())
        if timed:
            field = columns[0][1]
            times.append(
                _arrival_s(source, line, field, cells[0]) if strict else _timestamp(source, line, field, cells[0])
            )
        prompts.append(_length(source, line, columns[prompt_at][1], cells[prompt_at], strict))
        outputs.append(_length(source, line, columns[prompt_at + 1][1], cells[prompt_at + 1], strict))
        if len(cells) == 4:
            priorities.append(_integer(source, line, columns[3][1], cells[3]))
        line_numbers.append(line)
    if not prompts:
        raise TraceError(source, 2, None, "no rows after the header")

    arrival_s = None
    if timed:
        arrival_s = np.array(times, dtype=np.float64) if strict else _seconds_since_first(times)
        _check_sorted(source, arrival_s, columns[0][1], line_numbers)
    priority = np.array(priorities, dtype=np.int64) if priorities else np.zeros(len(prompts), dtype=np.int64)
    return _trace(source, fmt, arrival_s, prompts, outputs, priority)


def _load_mooncake(source: str, lines: Iterable[str]) -> Trace:
    times: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    line_numbers: list[int] = []
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as e:
            raise TraceError(source, line, None, f"not a JSON object: {e.msg}") from None
        if not isinstance(record, dict):
            raise TraceError(source, line, None, f"expected a JSON object, got {type(record).__name__}")
        for key in _MOONCAKE_KEYS:
            if key not in record:
                raise TraceError(source, line, key, "missing key")
        stamp_ms = record["timestamp"]
        if isinstance(stamp_ms, bool) or not isinstance(stamp_ms, int | float) or not math.isfinite(stamp_ms):
            raise TraceError(source, line, "timestamp", f"expected a number of milliseconds, got {stamp_ms!r}")
        times.append(stamp_ms / 1000.0)
        prompts.append(_length(source, line, "input_length", record["input_length"], strict=False))
        outputs.append(_length(source, line, "output_length", record["output_length"], strict=False))
        line_numbers.append(line)
    if not prompts:
        raise TraceError(source, 1, None, "empty file; expected one JSON object per line")
    arrival_s = np.array(times, dtype=np.float64)
    _check_sorted(source, arrival_s, "timestamp", line_numbers)
    return _trace(source, "mooncake", arrival_s, prompts, outputs, np.zeros(len(prompts), dtype=np.int64))


def _trace(
    source: str, fmt: str, arrival_s: np.ndarray | None, prompts: list[int], outputs: list[int], priority: np.ndarray
) -> Trace:
    prompt_tokens = np.array(prompts, dtype=np.int64)
    output_tokens = np.array(outputs, dtype=np.int64)
    # A row counts once even when both of its lengths were zero.
    clamped = int(np.count_nonzero((prompt_tokens == 0) | (output_tokens == 0)))
    if clamped:
        prompt_tokens = np.maximum(prompt_tokens, 1)
        output_tokens = np.maximum(output_tokens, 1)
    return Trace(source, fmt, arrival_s, prompt_tokens, output_tokens, priority, clamped)


# -- fields ------------------------------------------------------------------------------------


def _length(source: str, line: int, field: str, value: Any, strict: bool) -> int:
    """A token count: >= 1 when ``strict``, else >= 0 (the caller clamps zeros and counts them)."""
    number = _as_int(value)
    if number is None or number < 1 - (not strict):
        kind = "a positive integer" if strict else "a non-negative integer"
        raise TraceError(source, line, field, f"expected {kind}, got {_shown(value)}")
    return number


def _integer(source: str, line: int, field: str, value: str) -> int:
    number = _as_int(value)
    if number is None:
        raise TraceError(source, line, field, f"expected an integer, got {_shown(value)}")
    return number


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    try:
        number = float(value)  # some exporters write counts as "12.0"
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _clip(text: str, chars: int = 80) -> str:
    return text if len(text) <= chars else text[: chars - 3] + "..."


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else repr(str(value))


def _arrival_s(source: str, line: int, field: str, text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):
        raise TraceError(source, line, field, f"expected a non-negative number of seconds, got {text!r}")
    return seconds


def _timestamp(source: str, line: int, field: str, text: str) -> tuple[int, float]:
    """(day ordinal, seconds into that day, UTC): split so 100 ns digits survive float64."""
    match = _TIMESTAMP.fullmatch(text)
    try:
        if match is None:
            raise ValueError
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        if hour > 23 or minute > 59 or second > 60:
            raise ValueError
        ordinal = datetime.date(year, month, day).toordinal()
    except ValueError:
        raise TraceError(
            source, line, field, f"expected a time like '2023-11-16 18:15:46.6805900', got {text!r}"
        ) from None
    fraction, zone = match.group(7), match.group(8)
    seconds = hour * 3600 + minute * 60 + second + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        seconds -= sign * (int(zone[1:3]) * 3600 + int(zone[-2:]) * 60)
    return ordinal, seconds


def _seconds_since_first(stamps: list[tuple[int, float]]) -> np.ndarray:
    days = np.array([d for d, _ in stamps], dtype=np.int64)
    seconds = np.array([s for _, s in stamps], dtype=np.float64)
    return (days - days[0]).astype(np.float64) * 86400.0 + (seconds - seconds[0])


def _check_sorted(source: str, arrival_s: np.ndarray, field: str, lines: list[int]) -> None:
    backwards = np.flatnonzero(np.diff(arrival_s) < 0)
    if len(backwards) == 0:
        return
    row = int(backwards[0]) + 1
    raise TraceError(
        source,
        lines[row],
        field,
        f"time goes backwards ({arrival_s[row]:.6f} s after {arrival_s[row - 1]:.6f} s on the row before); "
        "sort the trace by arrival",
    )


# -- statistics --------------------------------------------------------------------------------


def trace_stats(trace: Trace) -> dict[str, Any]:
    """Shape of a trace: size, span, rate, burstiness and length percentiles.

    ``rate_rps`` is 1 / mean inter-arrival gap; ``interarrival_cv`` is the gaps' coefficient of
    variation (1 for Poisson) and ``gamma_k`` = 1 / CV^2, the shape of the gamma arrival process
    with that burstiness. Arrival keys are None for a length-only trace or where undefined
    (fewer than two rows, all arrivals at one instant).
    """
    stats: dict[str, Any] = {
        "source": trace.source,
        "fmt": trace.fmt,
        "rows": len(trace),
        "clamped": trace.clamped,
        "span_s": None,
        "rate_rps": None,
        "interarrival_cv": None,
        "gamma_k": None,
    }
    if trace.arrival_s is not None:
        stats["span_s"] = float(trace.arrival_s[-1] - trace.arrival_s[0])
        gaps_s = np.diff(trace.arrival_s)
        if len(gaps_s) and gaps_s.mean() > 0:
            mean_s = float(gaps_s.mean())
            cv = float(gaps_s.std() / mean_s)
            stats.update(rate_rps=1.0 / mean_s, interarrival_cv=cv, gamma_k=1.0 / cv**2 if cv > 0 else None)
    stats["prompt_tokens"] = _percentiles(trace.prompt_tokens)
    stats["output_tokens"] = _percentiles(trace.output_tokens)
    return stats


def _percentiles(tokens: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.percentile(tokens, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(tokens.max()),
        "mean": float(tokens.mean()),
    }


# -- empirical length files ----------------------------------------------------------------------


def load_lengths(name_or_path: str, role: str) -> np.ndarray:
    """Token counts from a file, for an empirical length distribution (int64, every value >= 1).

    A file whose first line is a single column is a list of integers, one a line, with an
    optional non-numeric header line. Anything else is loaded as a trace (any format above, or
    an embedded trace name) and ``role`` picks its prompt lengths ("prompt": ``prompt_tokens``,
    ``ContextTokens``, ``input_length``, ``num_prefill_tokens``) or output lengths ("output":
    ``output_tokens``, ``GeneratedTokens``, ``output_length``, ``num_decode_tokens``).
    """
    if role not in ("prompt", "output"):
        raise ValueError(f"role must be 'prompt' or 'output', got {role!r}")
    file = _resolve(name_or_path)
    with _open_text(file) as f:
        first = f.readline()
        if first.strip() and "," not in first and not first.lstrip().startswith("{"):
            return _load_column(str(file), itertools.chain([first], f))
    trace = load_trace(name_or_path)
    return np.array(trace.prompt_tokens if role == "prompt" else trace.output_tokens)


def _load_column(source: str, lines: Iterator[str]) -> np.ndarray:
    values: list[int] = []
    for line, text in enumerate(lines, start=1):
        text = text.strip()
        if not text:
            continue
        if line == 1 and _as_int(text) is None:
            continue  # a header naming the column
        values.append(_length(source, line, "length", text, strict=True))
    if not values:
        raise TraceError(source, 1, None, "empty file; expected one positive integer a line")
    return np.array(values, dtype=np.int64)
