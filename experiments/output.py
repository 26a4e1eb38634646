"""The run directory every executor writes: config.json, requests.csv, summary.json,
timeseries.csv (and tokens.csv when per-token times were kept; steps.csv for a live run,
stream-steps.csv for a server's), and the CSV of a sweep's runs.

Floats are written with ``repr`` so that the same run gives byte-identical files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sim.batch import StepShape
from sim.metrics import TimeSeries, request_latencies
from sim.request import Request, Status

REQUEST_COLUMNS = [
    "id", "replica", "arrival_s", "prompt_tokens", "output_tokens", "priority", "status",
    "first_scheduled_s", "first_token_s", "finish_s", "ttft_ms", "tpot_ms", "e2el_ms",
    "generated_tokens", "preemptions", "reject_reason",
]


def _num(x: float | int | None) -> str:
    return "" if x is None else repr(x)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(x: object) -> object:
    if hasattr(x, "item"):
        return x.item()  # numpy scalars
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_requests(path: Path, requests: Sequence[Request]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(REQUEST_COLUMNS)
        for r in sorted(requests, key=lambda r: r.id):
            ttft = tpot = e2el = None
            if r.status is Status.FINISHED:
                t, p, e = request_latencies(r)
                ttft, tpot, e2el = t * 1000, (p * 1000 if p is not None else None), e * 1000
            w.writerow([
                r.id, r.replica, _num(r.arrival_s), r.prompt_tokens, r.output_tokens, r.priority, r.status.value,
                _num(r.first_scheduled_s), _num(r.first_token_s), _num(r.finish_s), _num(ttft), _num(tpot),
                _num(e2el), r.num_generated, r.preemptions, r.reject_reason or "",
            ])


def write_timeseries(path: Path, series: Sequence[TimeSeries]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["replica", "time_s", "batch_size", "num_waiting", "num_running", "kv_blocks_used"])
        for i, ts in enumerate(series):
            for row in zip(ts.time_s, ts.batch_size, ts.num_waiting, ts.num_running, ts.kv_blocks_used, strict=True):
                w.writerow([i, repr(row[0]), *row[1:]])


def write_token_times(path: Path, requests: Sequence[Request]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["id", "token", "time_s"])
        for r in sorted(requests, key=lambda r: r.id):
            for k, t in enumerate(r.token_times_s or ()):
                w.writerow([r.id, k, repr(t)])


def write_run(out_dir: Path, config: dict, requests: Sequence[Request], summary: dict,
              series: Sequence[TimeSeries]) -> None:
    """Write a whole run directory (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", config)
    write_requests(out_dir / "requests.csv", requests)
    write_json(out_dir / "summary.json", summary)
    write_timeseries(out_dir / "timeseries.csv", series)
    if any(r.token_times_s is not None for r in requests):
        write_token_times(out_dir / "tokens.csv", requests)


STEP_COLUMNS = [f.name for f in dataclasses.fields(StepShape)] + ["step_s"]


def write_steps(path: Path, step_log: Sequence[tuple[StepShape, float]]) -> None:
    """One row per live engine step: its StepShape fields and the measured seconds."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(STEP_COLUMNS)
        for shape, step_s in step_log:
            w.writerow([repr(getattr(shape, name)) for name in STEP_COLUMNS[:-1]] + [repr(step_s)])


def write_stream_steps(path: Path, steps: Sequence[Any]) -> None:
    """One row per burst of a server's streams (:class:`~calibrate.stream_steps.StreamStep`): when
    it came, its StepShape fields, the step's seconds (empty: none seen) and why it was not
    priced (empty: it was)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["end_s", *STEP_COLUMNS, "left_out"])
        for s in steps:
            w.writerow([repr(s.end_s), *(repr(getattr(s.shape, name)) for name in STEP_COLUMNS[:-1]),
                        _num(s.step_s), s.reason or ""])


def write_runs_csv(path: Path, runs: Sequence[dict[str, Any]]) -> None:
    """One row per run of a sweep, every scalar of its summary; floats as repr, so runs compare byte for byte."""
    columns: list[str] = []
    for r in runs:
        columns += [k for k in r if k not in columns]
    with path.open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in runs:
            row = []
            for k in columns:
                v = r.get(k)
                row.append("" if v is None else json.dumps(v, sort_keys=True) if isinstance(v, dict)
                           else repr(v) if isinstance(v, float) else str(v))
            w.writerow(row)
