"""A measured step: its shape and how long it took; read and written as CSV.

The CSV has one row per step. Required columns::

    prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms

Optional columns: ``prefill_attention_tokens`` (exact prefill attention work, the sum over
chunks of ``chunk * (context + (chunk + 1) / 2)``; empty or absent means "estimate it from the
sums, assuming equal chunks"), ``step_ms_min``, ``step_ms_max`` (the spread over repeats),
``repeats`` and ``origin`` (``grid``: a controlled calibration step; ``live``: a step the live
engine ran on a synthetic workload during calibration; ``csv``: measured elsewhere; empty or
absent means ``csv``). ``step_ms`` is the mean over repeats of the whole engine step, in milliseconds;
a file with ``step_s`` (seconds) instead is read too, so the ``steps.csv`` of ``servesim run``
fits as it is. ``swap_in_tokens`` and ``swap_out_tokens`` may be present: predicting prices
them; fitting needs them 0. Other columns are ignored.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sim.batch import StepShape

REQUIRED_COLUMNS = ("prefill_tokens", "prefill_seqs", "prefill_context_tokens", "decode_seqs",
                    "decode_context_tokens", "step_ms")
INT_COLUMNS = ("prefill_tokens", "prefill_seqs", "prefill_context_tokens", "decode_seqs", "decode_context_tokens")
SWAP_COLUMNS = ("swap_in_tokens", "swap_out_tokens")
ORIGINS = ("grid", "live", "csv")


class SamplesError(ValueError):
    """A samples CSV that cannot be read; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Sample:
    """One measured step. ``step_ms`` is the mean over ``repeats``; min and max give the spread.
    ``origin`` says where it was measured: ``grid``, ``live`` or ``csv``."""

    prefill_tokens: int
    prefill_seqs: int
    prefill_context_tokens: int
    decode_seqs: int
    decode_context_tokens: int
    step_ms: float
    prefill_attention_tokens: float = 0.0
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    repeats: int = 1
    origin: str = "csv"

    @property
    def shape(self) -> StepShape:
        return StepShape(
            prefill_tokens=self.prefill_tokens,
            prefill_seqs=self.prefill_seqs,
            prefill_context_tokens=self.prefill_context_tokens,
            decode_seqs=self.decode_seqs,
            decode_context_tokens=self.decode_context_tokens,
            prefill_attention_tokens=self.prefill_attention_tokens,
        )

    @property
    def kind(self) -> str:
        """``prefill``, ``decode`` or ``mixed`` (both in one step); ``empty`` for neither."""
        if self.prefill_tokens and self.decode_seqs:
            return "mixed"
        if self.prefill_tokens:
            return "prefill"
        return "decode" if self.decode_seqs else "empty"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict, where: str) -> Sample:
        """Build from a mapping of column -> value (strings or numbers); ``where`` prefixes errors."""
        return _parse_row(row, where)


def _parse_shape(row: dict, where: str) -> dict[str, float | int]:
    """The validated StepShape fields of a row (swap columns included when present)."""
    values: dict[str, float | int] = {}
    for name in INT_COLUMNS:
        if row.get(name) in (None, ""):
            raise SamplesError(f"{where}: field {name!r} is missing")
        values[name] = _number(row[name], where, name, integer=True)
    if row.get("prefill_attention_tokens") not in (None, ""):
        values["prefill_attention_tokens"] = _number(row["prefill_attention_tokens"], where,
                                                     "prefill_attention_tokens", integer=False)
    for name in SWAP_COLUMNS:
        if row.get(name) not in (None, ""):
            values[name] = _number(row[name], where, name, integer=True)
    tokens, seqs = values["prefill_tokens"], values["prefill_seqs"]
    if (tokens == 0) != (seqs == 0) or tokens < seqs:
        raise SamplesError(f"{where}: field 'prefill_seqs' is {seqs} but 'prefill_tokens' is {tokens}: "
                           "each prefilling sequence computes at least one token")
    if tokens == 0 and values["prefill_context_tokens"]:
        raise SamplesError(f"{where}: field 'prefill_context_tokens' must be 0 when 'prefill_tokens' is 0")
    if values["decode_seqs"] == 0 and values["decode_context_tokens"]:
        raise SamplesError(f"{where}: field 'decode_context_tokens' must be 0 when 'decode_seqs' is 0")
    return values


def _parse_time_ms(row: dict, where: str) -> float | None:
    """``step_ms``, else ``step_s`` in milliseconds, else None."""
    for name, to_ms in (("step_ms", 1.0), ("step_s", 1000.0)):
        if row.get(name) not in (None, ""):
            value = _number(row[name], where, name, integer=False) * to_ms
            if value <= 0:
                raise SamplesError(f"{where}: field {name!r} must be > 0, got {row[name]!r}")
            return value
    return None


def _parse_row(row: dict, where: str) -> Sample:
    values = _parse_shape(row, where)
    step_ms = _parse_time_ms(row, where)
    if step_ms is None:
        raise SamplesError(f"{where}: field 'step_ms' is missing")
    for name in SWAP_COLUMNS:
        if values.pop(name, 0):
            raise SamplesError(f"{where}: field {name!r} is not 0: a step with swap copies cannot be fitted "
                               "(the step model has no swap term; CalibratedCost adds swaps from the host link)")
    if values["prefill_tokens"] == 0 and values["decode_seqs"] == 0:
        raise SamplesError(f"{where}: an empty step (no prefill tokens, no decode seqs)")
    for name in ("step_ms_min", "step_ms_max"):
        if row.get(name) not in (None, ""):
            values[name] = _number(row[name], where, name, integer=False)
    if row.get("repeats") not in (None, ""):
        values["repeats"] = _number(row["repeats"], where, "repeats", integer=True)
        if values["repeats"] < 1:
            raise SamplesError(f"{where}: field 'repeats' must be >= 1, got {row['repeats']!r}")
    origin = row.get("origin")
    if origin not in (None, ""):
        if origin not in ORIGINS:
            raise SamplesError(f"{where}: field 'origin' must be one of {', '.join(ORIGINS)}, got {origin!r}")
        values["origin"] = origin
    return Sample(step_ms=step_ms, **values)  # type: ignore[arg-type]


def _number(text: object, where: str, name: str, integer: bool) -> float | int:
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SamplesError(f"{where}: field {name!r} is not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SamplesError(f"{where}: field {name!r} must be a finite number >= 0, got {text!r}")
    if integer:
        if value != int(value):
            raise SamplesError(f"{where}: field {name!r} must be an integer, got {text!r}")
        return int(value)
    return value


def _rows(path: Path, need_time: bool) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) of every non-blank row, after checking the header."""
    try:
        f = path.open(newline="")
    except OSError as e:
        raise SamplesError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        reader = csv.DictReader(f)
        header = reader.fieldnames
        if not header:
            raise SamplesError(f"{path}: empty file (expected a header: {','.join(REQUIRED_COLUMNS)})")
        missing = [c for c in INT_COLUMNS if c not in header]
        if need_time and "step_ms" not in header and "step_s" not in header:
            missing.append("step_ms")
        if missing:
            raise SamplesError(f"{path}:1: missing column(s) {', '.join(missing)}; "
                               f"required: {','.join(REQUIRED_COLUMNS)}")
        count = 0
        for row in reader:
            if None in row:
                raise SamplesError(f"{path}:{reader.line_num}: more fields than the header has")
            if all(v in (None, "") for v in row.values()):
                continue
            count += 1
            yield f"{path}:{reader.line_num}", row
    if not count:
        raise SamplesError(f"{path}: no rows after the header")


def read_samples(path: str | Path) -> list[Sample]:
    """Read measured steps; raises :class:`SamplesError` naming the file, line and field."""
    return [_parse_row(row, where) for where, row in _rows(Path(path), need_time=True)]


def read_shapes(path: str | Path) -> list[tuple[StepShape, float | None]]:
    """Read step shapes (swap columns included) and their measured milliseconds when the file
    has them; for predicting. Same format and errors as :func:`read_samples`."""
    out = []
    for where, row in _rows(Path(path), need_time=False):
        shape = StepShape(**_parse_shape(row, where))  # type: ignore[arg-type]
        out.append((shape, _parse_time_ms(row, where)))
    return out


CSV_COLUMNS = [f.name for f in fields(Sample)]


def write_samples(path: str | Path, samples: Iterable[Sample]) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for s in samples:
            w.writerow(["" if v is None else v if isinstance(v, str) else repr(v)
                        for v in (getattr(s, c) for c in CSV_COLUMNS)])
