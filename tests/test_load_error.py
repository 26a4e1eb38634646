"""experiments/load_error.py: live/simulated TPOT binned by the live concurrency."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from experiments import load_error

HEADER = ["id", "replica", "arrival_s", "prompt_tokens", "output_tokens", "status", "first_token_s", "finish_s",
          "ttft_ms", "tpot_ms", "e2el_ms"]


def write_requests(path: Path, rows: list[tuple[int, float, float, float]], status: str = "finished") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for i, first, finish, tpot in rows:
            w.writerow([i, 0, first, 10, 5, status, first, finish, 5.0, tpot, 100.0])


def make_run(path: Path) -> Path:
    """Two requests decoding alone at their simulated TPOT, then twelve together at twice it."""
    (path / "sim").mkdir(parents=True)
    (path / "validation.json").write_text("{}")
    crowd = [(i, 10.0, 11.0) for i in range(2, 14)]
    write_requests(path / "sim" / "requests.csv", [(0, 0.0, 1.0, 20.0), (1, 2.0, 3.0, 20.0)]
                   + [(i, a, b, 30.0) for i, a, b in crowd])
    for live, scale in (("live", 1.0), ("live-2", 1.0)):
        write_requests(path / live / "requests.csv", [(0, 0.0, 1.0, 20.0 * scale), (1, 2.0, 3.0, 20.0 * scale)]
                       + [(i, a, b, 60.0) for i, a, b in crowd])
    return path


def test_ratios_are_binned_by_how_many_decoded_beside_each_request(tmp_path: Path) -> None:
    bins = load_error.load_bins(make_run(tmp_path / "run"))
    assert [(b.low, len(b.ratios), b.median) for b in bins] == [(0, 4, 1.0), (10, 24, 2.0)]


def test_concurrency_is_the_mean_overlap() -> None:
    assert load_error.concurrency(0.0, 2.0, [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == pytest.approx(1.5)


def test_main_reads_a_fidelity_output_and_prints_a_line_per_cell(tmp_path: Path) -> None:
    for cell in ("a-load50", "b-load85"):
        make_run(tmp_path / "fid" / "cells" / cell)
    out: list[str] = []
    assert load_error.main([str(tmp_path / "fid"), "--width", "5"], echo=out.append) == 0
    assert out[1].split() == ["a-load50", "0-4:", "x1.00", "(4)", "10-14:", "x2.00", "(24)"]
    assert out[2].startswith("b-load85")


def test_bad_input_is_named_and_exits_2(tmp_path: Path) -> None:
    out: list[str] = []
    assert load_error.main([str(tmp_path)], echo=out.append) == 2
    assert "neither a validation run nor a directory of them" in out[-1]

    run = make_run(tmp_path / "run")
    bad = run / "live" / "requests.csv"
    bad.write_text(bad.read_text().replace("11.0,5.0,60.0", "11.0,5.0,soon", 1))
    assert load_error.main([str(run)], echo=out.append) == 2
    assert str(bad) in out[-1] and "line " in out[-1] and "tpot_ms" in out[-1]

    bad.write_text("id,status\n0,finished\n")
    assert load_error.main([str(run)], echo=out.append) == 2
    assert f"{bad}: no column 'first_token_s'" in out[-1]


def test_reprice_names_what_a_run_does_not_record(tmp_path: Path) -> None:
    from experiments import reprice

    run = make_run(tmp_path / "run")
    profile = Path(__file__).resolve().parents[1] / "profiles" / "tiny-cpu.json"
    out: list[str] = []
    assert reprice.main([str(run), str(profile)], echo=out.append) == 2
    assert out[-1].startswith(f"error: {run / 'validation.json'}: no workload, scheduler, kv, "
                              "mean_tpot_ms, p99_tpot_ms, mean_ttft_ms")
    assert reprice.main([str(run), str(tmp_path / "nowhere.json")], echo=out.append) == 2
    assert out[-1].startswith("error: ") and "nowhere.json" in out[-1]
