"""A measured step: its shape and how long it took; read and written as CSV.

The CSV has one row per step. Required columns::

    prefill_tokens,prefill_seqs,prefill_context_tokens,decode_seqs,decode_context_tokens,step_ms

Every other :class:`~sim.batch.StepShape` field is an optional column, empty or absent meaning
the field's default: ``prefill_attention_tokens`` (exact prefill attention work, the sum over
chunks of ``chunk * (context + (chunk + 1) / 2)``; 0 means "estimate it from the sums, assuming
equal chunks"), and ``swap_in_tokens`` and ``swap_out_tokens`` (predicting prices them;
fitting needs them 0, so files of fitted samples leave them out). Further optional columns:
``step_ms_min``, ``step_ms_max`` (the spread over repeats), ``repeats`` and ``origin``
(``grid``: a controlled calibration step; ``live``: a step the live engine ran on a synthetic
workload during calibration; ``csv``: measured elsewhere; empty or absent means ``csv``).
``step_ms`` is the mean over repeats of the whole engine step, in milliseconds; a file with
``step_s`` (seconds) instead is read too, so the ``steps.csv`` of ``servesim run`` fits as it
is. Other columns are ignored.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import get_type_hints

from sim.batch import STEP_FIELDS, StepShape

SHAPE_REQUIRED = ("prefill_tokens", "prefill_seqs", "prefill_context_tokens", "decode_seqs", "decode_context_tokens")
REQUIRED_COLUMNS = (*SHAPE_REQUIRED, "step_ms")
SWAP_COLUMNS = ("swap_in_tokens", "swap_out_tokens")
INT_COLUMNS = SHAPE_REQUIRED
"""Kept for callers that print a shape's counts; the required shape columns."""
_SHAPE_TYPES: dict[str, type] = {name: get_type_hints(StepShape)[name] for name in STEP_FIELDS}
"""Each StepShape field's type (int or float), which its column is parsed as."""
ORIGINS = ("grid", "live", "csv")


class SamplesError(ValueError):
    """A samples CSV that cannot be read; the message names the file, the line and the field."""


@dataclass(frozen=True)
class Sample:
    """One measured step: its ``shape`` and ``step_ms``, the mean over ``repeats``; min and
    max give the spread. ``origin`` says where it was measured: ``grid``, ``live`` or ``csv``."""

    shape: StepShape
    step_ms: float
    step_ms_min: float | None = None
    step_ms_max: float | None = None
    repeats: int = 1
    origin: str = "csv"

    def __post_init__(self) -> None:
        if not self.step_ms > 0:
            raise ValueError(f"Sample.step_ms must be > 0, got {self.step_ms}")
        if self.repeats < 1:
            raise ValueError(f"Sample.repeats must be >= 1, got {self.repeats}")
        if self.origin not in ORIGINS:
            raise ValueError(f"Sample.origin must be one of {', '.join(ORIGINS)}, got {self.origin!r}")

    @property
    def kind(self) -> str:
        """``prefill``, ``decode`` or ``mixed`` (both in one step); ``empty`` for neither."""
        if self.shape.prefill_tokens and self.shape.decode_seqs:
            return "mixed"
        if self.shape.prefill_tokens:
            return "prefill"
        return "decode" if self.shape.decode_seqs else "empty"

    def row(self) -> list:
        """The values of :data:`CSV_COLUMNS`, in order."""
        if self.shape.swap_in_tokens or self.shape.swap_out_tokens:
            raise ValueError("a sample with swap copies has no samples-file row (fitted samples have none)")
        return [*(getattr(self.shape, c) for c in SHAPE_COLUMNS), *(getattr(self, c) for c in _OWN_COLUMNS)]

    @classmethod
    def from_dict(cls, row: dict, where: str) -> Sample:
        """Build from a mapping of column -> value (strings or numbers); ``where`` prefixes errors."""
        return _parse_row(row, where)


SHAPE_COLUMNS = tuple(name for name in STEP_FIELDS if name not in SWAP_COLUMNS)
"""The StepShape fields a samples file holds (fitted samples copy nothing to or from the host)."""
_OWN_COLUMNS = tuple(f.name for f in fields(Sample) if f.name != "shape")
CSV_COLUMNS = [*SHAPE_COLUMNS, *_OWN_COLUMNS]
"""The columns :func:`write_samples` writes and a profile's ``samples.columns`` lists."""


def _parse_shape(row: dict, where: str) -> StepShape:
    """The validated StepShape of a row (swap columns included when present)."""
    values: dict[str, float | int] = {}
    for name in STEP_FIELDS:
        if row.get(name) in (None, ""):
            if name in SHAPE_REQUIRED:
                raise SamplesError(f"{where}: field {name!r} is missing")
            continue
        values[name] = _number(row[name], where, name, integer=_SHAPE_TYPES[name] is int)
    tokens, seqs = values["prefill_tokens"], values["prefill_seqs"]
    if (tokens == 0) != (seqs == 0) or tokens < seqs:
        raise SamplesError(f"{where}: field 'prefill_seqs' is {seqs} but 'prefill_tokens' is {tokens}: "
                           "each prefilling sequence computes at least one token")
    if tokens == 0 and values["prefill_context_tokens"]:
        raise SamplesError(f"{where}: field 'prefill_context_tokens' must be 0 when 'prefill_tokens' is 0")
    if values["decode_seqs"] == 0 and values["decode_context_tokens"]:
        raise SamplesError(f"{where}: field 'decode_context_tokens' must be 0 when 'decode_seqs' is 0")
    return StepShape(**values)  # type: ignore[arg-type]


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
    shape = _parse_shape(row, where)
    step_ms = _parse_time_ms(row, where)
    if step_ms is None:
        raise SamplesError(f"{where}: field 'step_ms' is missing")
    for name in SWAP_COLUMNS:
        if getattr(shape, name):
            raise SamplesError(f"{where}: field {name!r} is not 0: a step with swap copies cannot be fitted "
                               "(the step model has no swap term; CalibratedCost adds swaps from the host link)")
    if shape.prefill_tokens == 0 and shape.decode_seqs == 0:
        raise SamplesError(f"{where}: an empty step (no prefill tokens, no decode seqs)")
    values: dict[str, float | int | str] = {}
    for name in ("step_ms_min", "step_ms_max"):
        if row.get(name) not in (None, ""):
            values[name] = _number(row[name], where, name, integer=False)
    if row.get("repeats") not in (None, ""):
        values["repeats"] = repeats = _number(row["repeats"], where, "repeats", integer=True)
        if repeats < 1:
            raise SamplesError(f"{where}: field 'repeats' must be >= 1, got {row['repeats']!r}")
    origin = row.get("origin")
    if origin not in (None, ""):
        if origin not in ORIGINS:
            raise SamplesError(f"{where}: field 'origin' must be one of {', '.join(ORIGINS)}, got {origin!r}")
        values["origin"] = origin
    return Sample(shape, step_ms, **values)  # type: ignore[arg-type]


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
        missing = [c for c in SHAPE_REQUIRED if c not in header]
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
    return [(_parse_shape(row, where), _parse_time_ms(row, where))
            for where, row in _rows(Path(path), need_time=False)]


def write_samples(path: str | Path, samples: Iterable[Sample]) -> None:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(CSV_COLUMNS)
        for s in samples:
            w.writerow(["" if v is None else v if isinstance(v, str) else repr(v) for v in s.row()])
