"""The run directory every executor writes: config.json, requests.csv, summary.json,
timeseries.csv (and tokens.csv when per-token times were kept).

Floats are written with ``repr`` so that the same run gives byte-identical files.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

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
