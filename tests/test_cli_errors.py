"""What a new user hit (issue 13): each item as a regression test on the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments.cli import main
from experiments.comparison import Comparison
from experiments.plots import _curves
from experiments.report import comparison_table
from experiments.validation.report import format_bias, format_speed, format_speeds
from sim.workload import SyntheticWorkload

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("value, words", [
    ("150", "got 150"), ("-5", "got -5"), ("abc", "'abc' is not a number"), ("100.5", "got 100.5"),
    ("nan", "got nan")])
def test_percentiles_out_of_range_or_not_numbers_name_the_option(value, words):
    """--percentiles outside [0, 100] or not a number is a one-line error naming the option, never a traceback."""
    res = invoke("simulate", "-n", "20", f"--percentiles={value}")
    assert res.exit_code == 2 and "--percentiles" in res.output and words in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


def test_percentiles_in_range_are_reported(tmp_path):
    """Accepted percentiles, 0 and 100 included, appear as summary keys."""
    res = invoke("simulate", "-n", "20", "--percentiles", "0,50,99.9,100", "-o", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {"p0_ttft_ms", "p50_ttft_ms", "p99.9_ttft_ms", "p100_ttft_ms"} <= set(summary)


def test_simulate_rejects_a_prompt_longer_than_the_model_with_its_reason(tmp_path):
    """A 50,000-token prompt on tiny (2,048 positions) is rejected and counted with the reason, as `run` does."""
    res = invoke("simulate", "--model", "tiny", "--arrival", "poisson", "-n", "4", "--prompt-tokens", "50000",
                 "--output-tokens", "8", "-o", str(tmp_path))
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rejected"] == 4 and summary["completed"] == 0
    assert summary["reject_reasons"] == {"50000 prompt + 8 output tokens exceed the model's 2048 positions": 4}


def test_zipf_with_max_below_two_is_refused_with_a_hint():
    """`--prompt-tokens zipf:5:1` (A read as a minimum) is an error that says A is the exponent."""
    res = invoke("simulate", "--arrival", "poisson", "-n", "5", "--prompt-tokens", "zipf:5:1")
    assert res.exit_code == 1 and "zipf:5:1" in res.output and "exponent" in res.output


def test_run_help_states_its_own_default_request_count():
    """`run`'s -n help gives its default of 32, as its description does, not the simulator's."""
    res = invoke("run", "--help")
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert "first 32 requests" in text and "[default: 32" in text and "whole trace" not in text


def test_synthetic_priority_classes_reorder_under_priority_order(tmp_path):
    """--priority-classes draws priorities that --order priority acts on; without them the run says it is fcfs."""
    args = ["simulate", "--arrival", "poisson", "--rate", "200", "-n", "300", "--kv-blocks", "400",
            "--order", "priority"]
    plain = invoke(*args, "-o", str(tmp_path / "plain"))
    assert plain.exit_code == 0 and "runs as fcfs" in plain.output
    classes = invoke(*args, "--priority-classes", "3", "-o", str(tmp_path / "classes"))
    assert classes.exit_code == 0, classes.output
    assert "runs as fcfs" not in classes.output
    rows = [line.split(",") for line in (tmp_path / "classes" / "requests.csv").read_text().splitlines()[1:]]
    assert {row[5] for row in rows} == {"0", "1", "2"}
    mean_ttft = {}
    for p in "012":
        ttfts = [float(row[10]) for row in rows if row[5] == p and row[10]]
        mean_ttft[p] = sum(ttfts) / len(ttfts)
    assert mean_ttft["0"] < mean_ttft["2"]  # class 0 is served first under load


def test_priority_classes_leave_lengths_and_arrivals_unchanged():
    """Drawing priorities does not move the other random streams: the same arrivals and lengths."""
    base = SyntheticWorkload(num_requests=50, prompt_dist="uniform:1:100", seed=3).generate()
    drawn = SyntheticWorkload(num_requests=50, prompt_dist="uniform:1:100", seed=3, priority_classes=4).generate()
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in base] == \
        [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in drawn]
    assert all(r.priority == 0 for r in base) and len({r.priority for r in drawn}) == 4


def test_priority_classes_on_a_trace_is_an_error():
    """--priority-classes with a trace (whose priorities are its own) is refused, not ignored."""
    res = invoke("simulate", "-n", "10", "--priority-classes", "3")
    assert res.exit_code == 1 and "--priority-classes" in res.output


def _cmp(rates: tuple[float, ...], saturation: float | None) -> Comparison:
    runs = tuple({"policy": p, "rate": r, "output_throughput": 1.0} for r in rates for p in ("static", "continuous"))
    return Comparison(("static", "continuous"), rates, runs, saturation)


def test_compare_calls_a_ratio_saturated_only_beyond_saturation(tmp_path):
    """`compare --rates` below saturation prints the throughput ratio at its top rate, not a "saturation" ratio."""
    res = invoke("compare", "--policies", "static,continuous", "--rates", "0.5,1", "-n", "100", "--jobs", "1",
                 "-o", str(tmp_path))
    assert res.exit_code == 0, res.output
    assert "saturation throughput ratio" not in res.output
    assert "output throughput vs static at the highest rate, 1 req/s, below saturation" in res.output
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["top_rate_saturated"] is False and data["saturation_rps"] > 1
    assert _cmp((1.0, 10.0), 5.0).saturated and not _cmp((1.0, 4.0), 5.0).saturated


def test_compare_prints_long_latencies_in_seconds():
    """A latency row that reaches 10,000 ms is printed in seconds with the unit in its label."""
    run = {"offered_rate": 1.0, "completed": 1, "rejected": 0, "request_throughput": 1.0, "output_throughput": 1.0,
           "mean_ttft_ms": 3_417_141.0, "p99_ttft_ms": 4_000_000.0, "mean_tpot_ms": 20.0, "p99_tpot_ms": 30.0,
           "p99_itl_ms": 30.0, "mean_e2el_ms": 5_000_000.0, "num_preemptions": 0, "policy": "static"}
    table = comparison_table([run], goodput=False)
    assert "mean TTFT (s)" in table and "3417.1" in table and "3417141" not in table
    assert "mean TPOT (ms)" in table


def test_plot_curves_merge_identical_policies():
    """Two policies with identical results share one labelled curve in the plots, so none is hidden."""
    runs = [{"policy": p, "rate": r, "output_throughput": 10.0 * r, "mean_ttft_ms": 5.0}
            for p in ("continuous", "chunked", "static") for r in (1.0, 2.0)]
    runs[-1]["mean_ttft_ms"] = 50.0
    curves = _curves(runs, ["continuous", "chunked", "static"], "output_throughput", "mean_ttft_ms")
    assert [label for label, _ in curves] == ["continuous = chunked", "static"]
    assert [rate for _, _, rate in curves[0][1]] == [1.0, 2.0]


def test_progress_bars_stay_out_of_a_log(tmp_path):
    """With stderr not a terminal and no --progress, a command writes no progress bars."""
    out = subprocess.run([sys.executable, "-c", "from experiments.cli import main; main()", "compare", "--policies",
                          "static,continuous", "--rates", "1,2", "-n", "50", "--jobs", "1", "-o", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "run/s" not in out.stderr and "%|" not in out.stderr


def test_default_output_folders_are_ignored_by_git():
    """The folders demo, validate and compare write by default are in .gitignore; the tour writes under runs/."""
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"/servesim-demo/", "/servesim-validate/", "/compare-out/", "/runs/"} <= set(ignored)
    assert "-o profiles/" not in (ROOT / "README.md").read_text()


def test_speed_and_bias_read_plainly():
    """Speeds said once when they agree, never 'N% faster than predicted' for a time ratio."""
    assert format_speeds(0.95, 0.95) == "5% faster than at calibration, before and after the live run"
    assert format_speeds(1.0, 1.0).startswith("as fast as at calibration")
    assert format_speeds(1.1, 0.5) == "10% slower before the live run and 100% faster after, against calibration"
    assert format_speed(1.2) == "20% slower"
    assert format_bias(1.17) == "the profile predicts 117% more time than the live steps took"
    assert format_bias(-0.2) == "the profile predicts 20% less time than the live steps took"


@pytest.mark.parametrize(("args", "message"), [
    (["--rows", "1,x"], "comma-separated integers"),
    (["--rows", "0"], "row counts must be >= 1"),
    (["--dtype", "foo"], "'foo' is not one of"),
    (["--model", "nope"], "unknown model 'nope'"),
])
def test_bench_gemm_rows_bad_input_is_one_error_line(args, message):
    """experiments/bench_gemm_rows.py answers a bad option with click's error, exit 2, no traceback."""
    pytest.importorskip("torch")
    from experiments.bench_gemm_rows import main as bench

    result = CliRunner().invoke(bench, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_bench_versions_bad_modes_is_one_error_line():
    """experiments/bench_versions.py answers a bad --modes with argparse's error, exit 2."""
    out = subprocess.run([sys.executable, "experiments/bench_versions.py", "--base", "HEAD", "--modes", "slow"],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and "--modes: give fast, step or fast,step, not 'slow'" in out.stderr
    assert "Traceback" not in out.stderr


def test_bench_versions_counts_instructions_under_valgrind():
    """--instructions' job: a real simulation under cachegrind, its answer and its count."""
    import shutil

    if shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed")
    from experiments.bench_versions import _run_in

    row = _run_in(ROOT, ("poisson", 20, "continuous", False, 0), None, instructions=True)
    assert row["requests"] == 20 and len(row["tokens"]) == 20
    assert row["instructions"] > 10**8  # starting Python and importing numpy alone run more than this


def test_device_session_reports_the_machine_and_stops_without_cuda(tmp_path):
    """experiments/device_session.sh (the prepared run for a lent GPU) writes what the machine
    has and, where torch sees no CUDA device, stops before calibrating with its own exit status."""
    import os

    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would calibrate on it")
    env = {**os.environ, "OUT": str(tmp_path), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "experiments/device_session.sh"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 3, out.stdout + out.stderr
    machine = (tmp_path / "machine.txt").read_text()
    assert "python 3." in machine and "torch" in machine and "simpy" in machine
    assert "no CUDA device for torch here: nothing to calibrate" in machine
    assert not (tmp_path / "profile.json").exists()
