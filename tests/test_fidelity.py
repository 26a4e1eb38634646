"""experiments/fidelity.py: one calibration against unseen workloads, one table, resumable."""

from __future__ import annotations

import json

import pytest

from experiments import fidelity
from experiments.validation.errors import metric_names
from experiments.validation.verdict import Tolerances


def _validation_json(errors: dict[str, float], runs: dict[str, list[float]] | None = None,
                     step: float = 0.02) -> dict:
    data: dict = {}
    for key, _ in metric_names():
        data[key] = {"live": 100.0, "sim": 100.0 * (1 + errors.get(key, 0.0)), "rel_error": errors.get(key, 0.0)}
        if runs and key in runs:
            data[key]["live_runs"] = runs[key]
    data["median_step_rel_error"] = step
    data["device_speed_vs_profile"] = {"before": 1.02, "after": 0.9}
    data["live_runs"] = 3 if runs else 1
    data["live_run_paces"] = [1.0, 1.1, 1.3] if runs else [1.05]
    return data


def test_workloads_cover_the_unseen_traces():
    """At least four distinct traces, each length-only one under Poisson and bursty Gamma arrivals."""
    traces = {w.trace for w in fidelity.WORKLOADS.values()}
    assert len(traces) >= 4 and "azure-conv" in traces and any("mooncake" in t for t in traces)
    for name in ("sharegpt", "arxiv", "bwb"):
        assert fidelity.WORKLOADS[f"{name}-poisson"].arrival == "poisson"
        gamma = fidelity.WORKLOADS[f"{name}-gamma"]
        assert gamma.arrival == "gamma" and gamma.burstiness < 1
    assert fidelity.WORKLOADS["azure-conv"].start > 0  # not the rows validate and the demo replay


def test_cells_are_workload_by_load_by_policy():
    """cells() lists every combination in table order, each with a distinct directory name."""
    cells = fidelity.cells(["azure-conv", "mooncake"], [0.5, 0.85], ["continuous", "chunked"])
    assert len(cells) == 8 and len({c.name for c in cells}) == 8
    assert cells[0].name == "azure-conv-load50-continuous" and cells[-1].name == "mooncake-load85-chunked"


def test_row_judges_stored_numbers_with_the_given_tolerances():
    """A row carries each error with its live spread, the step median, the live runs' mean step
    pace, the device speed furthest from 1, and the verdict recomputed for the tolerances given."""
    cell = fidelity.cells(["azure-conv"], [0.5], ["chunked"])[0]
    data = _validation_json({"mean_tpot_ms": 0.12}, runs={"mean_tpot_ms": [95.0, 100.0, 105.0]})
    r = fidelity.row(cell, data, Tolerances())
    assert r["verdict"] == "FAIL" and r["failed"] == ["mean_tpot_ms"] and r["noisy"] == []
    assert r["mean_tpot_ms"] == {"error": 0.12, "live_spread": pytest.approx(0.1)}
    assert r["device_speed_vs_profile"] == 0.9 and r["step_pace"] == pytest.approx((1.0 + 1.1 + 1.3) / 3)
    assert fidelity.row(cell, data, Tolerances(mean_pct=15))["verdict"] == "PASS"
    del data["live_run_paces"]  # a black box measures no steps
    assert fidelity.row(cell, data, Tolerances())["step_pace"] is None


def test_tables_show_errors_with_spreads_and_verdicts():
    """Text and markdown tables have one line per row, errors with the spread in brackets, and
    a * on a verdict whose live runs were beyond a tolerance."""
    cells = fidelity.cells(["azure-conv"], [0.5, 0.85], ["continuous"])
    noisy = _validation_json({}, runs={"mean_ttft_ms": [50.0, 100.0, 150.0]})
    rows = [fidelity.row(cells[0], _validation_json({"mean_e2el_ms": -0.05}), Tolerances()),
            fidelity.row(cells[1], noisy, Tolerances())]
    md = fidelity.format_markdown(rows).splitlines()
    assert len(md) == 4 and md[0].startswith("| workload | load | policy | n | mean TTFT |")
    assert "| -5.0% |" in md[2] and md[2].endswith("| PASS | - |")  # no comparison at the device's speed
    assert "+0.0% (100%)" in md[3] and md[3].endswith("| PASS* | - |")
    text = fidelity.format_text(rows).splitlines()
    assert len(text) == 4 and "x0.90" in text[2] and "step pace" in text[0]
    assert "x1.05" in text[2] and "x1.13" in text[3]  # each row's mean pace: 1.05; (1.0 + 1.1 + 1.3) / 3
    assert fidelity.totals(rows) == "2 of 2 cells PASS; 1 with live runs beyond a tolerance (*)"


def test_rows_judge_the_comparison_at_the_device_speed_too():
    """A cell's comparison at the device's speed is judged with the same tolerances, shown in
    its own column (the worst failed check named) and counted apart in the totals."""
    cells = fidelity.cells(["azure-conv"], [0.5, 0.85], ["continuous"])
    slow = _validation_json({"mean_ttft_ms": -0.15})
    slow["at_device_speed"] = {"factor": 1.08, "speed_checks": [1.07, 1.09],
                               **_validation_json({"mean_ttft_ms": -0.03}, step=0.03)}
    off = _validation_json({})
    off["at_device_speed"] = {"factor": 0.95, **_validation_json({"mean_ttft_ms": 0.04, "mean_tpot_ms": -0.12,
                                                                  "p99_tpot_ms": -0.3})}
    rows = [fidelity.row(cells[0], slow, Tolerances()), fidelity.row(cells[1], off, Tolerances())]
    assert rows[0]["verdict"] == "FAIL" and rows[0]["at_device_speed"]["verdict"] == "PASS"
    assert rows[0]["at_device_speed"]["factor"] == 1.08
    assert rows[1]["verdict"] == "PASS" and rows[1]["at_device_speed"]["failed"] == ["mean_tpot_ms", "p99_tpot_ms"]
    md = fidelity.format_markdown(rows).splitlines()
    assert md[0].endswith("| verdict | at device speed |")
    assert md[2].endswith("| FAIL | PASS |") and md[3].endswith("| PASS | FAIL: p99 TPOT -30.0% |")
    assert fidelity.totals(rows) == "1 of 2 cells PASS; at the device's speed around the live runs, 1 of 2"
    assert fidelity.row(cells[1], off, Tolerances(mean_pct=15, p99_pct=35))["at_device_speed"]["verdict"] == "PASS"


@pytest.mark.parametrize("args, message", [
    (["--workloads", "nope"], "--workloads: unknown nope"),
    (["--loads", "0"], "--loads"),
    (["--policies", "fifo"], "--policies: unknown fifo"),
    (["--tolerance", "p50:3"], "--tolerance"),
    (["--requests", "1"], "--requests"),
    (["--live-s", "0"], "--live-s"),
])
def test_bad_arguments(args, message, capsys):
    """Bad arguments stop the script with a message naming the option."""
    with pytest.raises(SystemExit) as e:
        fidelity.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    """A tiny CPU profile on a small grid (seconds)."""
    pytest.importorskip("torch")
    from calibrate.calibration import run_calibration
    from calibrate.grid import GridPoint
    from calibrate.profile import save_profile

    grid = [GridPoint(prefill=((c, ctx),)) for c in (8, 32, 96) for ctx in (0, 64)]
    grid += [GridPoint(decode=(ctx,) * b) for b in (1, 4, 12) for ctx in (16, 120)]
    profile = run_calibration("tiny", device="cpu", threads=1, repeats=2, warmup=1, folds=2, grid=grid,
                              progress=False, drift_threshold=None)
    path = tmp_path_factory.mktemp("profile") / "tiny.json"
    save_profile(profile, path)
    return path


def _traces(root):
    """A traces directory shaped as the shared one, with a few rows of each kind used here."""
    (root / "mooncake").mkdir(parents=True)
    (root / "lengths").mkdir()
    lines = [json.dumps({"timestamp": 40 * i, "input_length": 200 + 37 * i, "output_length": 5 + i % 7,
                         "hash_ids": [i]}) for i in range(12)]
    (root / "mooncake" / "conversation_trace.jsonl").write_text("\n".join(lines) + "\n")
    rows = ["num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio"]
    rows += [f"{50 + 13 * i},{4 + i % 9},{54 + 13 * i + i % 9},1.0" for i in range(12)]
    (root / "lengths" / "sharegpt_8k_filtered_stats_llama2_tokenizer.csv").write_text("\n".join(rows) + "\n")
    return root


def test_end_to_end_and_resume(tmp_path, tiny_profile):
    """Two unseen workloads (a timed trace, a length-only one under Gamma arrivals) are validated
    live against one profile into one table; a rerun reuses the stored cells without serving."""
    traces = _traces(tmp_path / "traces")
    out = tmp_path / "fid"
    args = ["--profile", str(tiny_profile), "--workloads", "mooncake,sharegpt-gamma", "--loads", "0.5",
            "--policies", "continuous", "--requests", "6", "--repeats", "1", "--max-prompt-tokens", "64",
            "--max-output-tokens", "8", "--traces", str(traces), "-o", str(out)]
    lines: list[str] = []
    assert fidelity.main(args, echo=lines.append) == 0
    assert any("estimated" in line for line in lines)
    data = json.loads((out / "fidelity.json").read_text())
    assert [(r["workload"], r["policy"]) for r in data["rows"]] == [("mooncake", "continuous"),
                                                                   ("sharegpt-gamma", "continuous")]
    for r in data["rows"]:
        assert r["verdict"] in ("PASS", "FAIL") and r["median_step_rel_error"] >= 0
    md = (out / "fidelity.md").read_text()
    assert "| mooncake | 50% | continuous |" in md and "python experiments/fidelity.py" in md
    cell = out / "cells" / "sharegpt-gamma-load50-continuous" / "validation.json"
    stored = json.loads(cell.read_text())
    assert stored["setup"]["workload"]["arrival"] == "gamma" and stored["setup"]["load"] == 0.5
    before = cell.stat().st_mtime_ns
    again: list[str] = []
    assert fidelity.main(args, echo=again.append) == 0
    assert sum("stored" in line for line in again) == 2 and cell.stat().st_mtime_ns == before
    assert json.loads((out / "fidelity.json").read_text())["rows"] == data["rows"]


@pytest.mark.parametrize("args, message", [
    (["--url", "http://127.0.0.1:9", "--profile", "p.json", "--policies", "chunked"], "vllm policy only"),
    (["--url", "http://127.0.0.1:9"], "--url needs --profile"),
    (["--url", "http://127.0.0.1:9", "--profile", "p.json", "--threads", "2"], "--threads"),
    (["--max-num-seqs", "8"], "--max-num-seqs: only with --url"),
    (["--warmup-runs", "1"], "--warmup-runs: only with --url"),
    (["--build-tokens", "8"], "--build-tokens: only with --url"),
    (["--url", "http://127.0.0.1:9", "--profile", "p.json", "--build-tokens", "-1"], "--build-tokens: 0 or more"),
    (["--url", "http://127.0.0.1:9", "--profile", "p.json", "--warmup-runs", "-1"], "--warmup-runs: 0 or more"),
])
def test_bad_url_arguments(args, message, capsys):
    """--url takes the vllm policy only and a profile of that server; its settings need --url."""
    with pytest.raises(SystemExit) as e:
        fidelity.parse_args(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_url_cells_against_a_running_server(net, one_torch_thread, tmp_path):
    """With --url every cell replays its slice against the server (servesim serve with the vllm
    policy here) after one warm-up replay, and is judged without a step check; the table says the
    steps are not seen."""
    from pathlib import Path

    from runtime.tokenizer import ByteTokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    traces = _traces(tmp_path / "traces")
    out = tmp_path / "fid"
    profile = Path(__file__).resolve().parents[1] / "profiles" / "tiny-cpu.json"
    lines: list[str] = []
    with ServerThread(tiny_engine(net, policy="vllm", kv_blocks=256, max_num_seqs=32), ByteTokenizer()) as server:
        args = ["--url", server.url, "--profile", str(profile), "--workloads", "sharegpt-poisson", "--loads", "0.5",
                "--requests", "6", "--repeats", "1", "--max-prompt-tokens", "64", "--max-output-tokens", "8",
                "--max-num-seqs", "32", "--max-num-batched-tokens", "2048", "--build-tokens", "8",
                "--traces", str(traces), "-o", str(out)]
        assert fidelity.main(args, echo=lines.append) == 0
    # Once, before the first cell: a step of every token count 1..8 on the server.
    assert sum("built: every step token count up to 8 run once" in line for line in lines) == 1
    data = json.loads((out / "fidelity.json").read_text())
    [r] = data["rows"]
    assert (r["workload"], r["policy"], r["requests"]) == ("sharegpt-poisson", "vllm", 6)
    assert r["verdict"] in ("PASS", "FAIL") and r["median_step_rel_error"] is None
    assert "median_step_rel_error" not in r["failed"]
    stored = json.loads((out / "cells" / "sharegpt-poisson-load50-vllm" / "validation.json").read_text())
    assert stored["setup"]["external"]["url"] == server.url and stored["completed"]["live"] == 6
    assert len(stored["warmup_runs"]) == 1  # a served engine gets one replay first, not compared, by default
    assert "no step-median check" in (out / "fidelity.md").read_text()
