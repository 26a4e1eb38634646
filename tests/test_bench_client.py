"""`servesim bench`: the load generator against `servesim serve` and a fault-injecting server."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("aiohttp")

from experiments.cli import main
from experiments.loadgen import BenchConfig, prompt_ids, run_bench
from sim.request import Request, Status
from tests import fault_server as fs

TIMEOUT_S = 60


def write_trace(path: Path, rows: list[tuple[float, int, int]]) -> Path:
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def bench_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["bench", "--no-progress", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def faults():
    with fs.FaultServer() as server:
        yield server


@pytest.fixture(scope="module")
def servesim(net, one_torch_thread):
    """`servesim serve` in-process: tiny, continuous batching, byte-level text."""
    pytest.importorskip("torch")
    from runtime.tokenizer import ByteTokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    with ServerThread(tiny_engine(net), ByteTokenizer(), max_model_len=1024) as s:
        yield s


def test_prompts_are_distinct_and_exact():
    """A prompt has exactly the trace's length, is reproducible, and differs between requests."""
    a, b = prompt_ids(0, 1, 50, 4096), prompt_ids(0, 2, 50, 4096)
    assert len(a) == 50 and a == prompt_ids(0, 1, 50, 4096) and a[:16] != b[:16]
    assert all(0 <= t < 4096 for t in a)


def test_end_to_end_against_servesim_serve(servesim, tmp_path):
    """Every request completes with exactly its tokens; the run directory reads like a simulation's."""
    rows = [(0.02 * i, 8 + 13 * i, 3 + (i * 7) % 17) for i in range(12)]
    trace = write_trace(tmp_path / "t.csv", rows)
    out = tmp_path / "run"
    code, text = bench_cli("--url", servesim.url, "--trace", str(trace), "-o", str(out), "--token-times")
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 12 and summary["failed"] == 0 and summary["output_length_mismatches"] == 0
    assert summary["total_input_tokens"] == sum(p for _, p, _ in rows)
    assert summary["total_output_tokens"] == sum(o for _, _, o in rows)
    for key in ("mean_ttft_ms", "p99_itl_ms", "mean_tpot_ms", "mean_e2el_ms", "request_throughput"):
        assert summary[key] > 0
    reqs = read_csv(out / "requests.csv")
    assert [int(r["generated_tokens"]) for r in reqs] == [o for _, _, o in rows]
    assert all(r["status"] == "finished" for r in reqs)
    tokens = read_csv(out / "tokens.csv")
    assert len(tokens) == sum(o for _, _, o in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["command"] == "bench" and config["model"] == "tiny"
    series = read_csv(out / "timeseries.csv")
    assert max(int(s["num_running"]) for s in series) >= 1 and series[-1]["num_running"] == "0"


def test_max_concurrency_bounds_requests_in_flight(servesim):
    """With --max-concurrency 2 no more than 2 requests are ever in flight, and all finish."""
    reqs = [Request(i, 0.0, 20, 6) for i in range(8)]
    result = run_bench(BenchConfig(servesim.url, max_concurrency=2, progress=False), reqs)
    assert all(r.status is Status.FINISHED and r.num_generated == 6 for r in result.requests)
    assert max(result.series.num_running) == 2
    assert max(result.series.num_waiting) >= 1


def test_faults_are_counted_by_kind_and_the_run_goes_on(faults, tmp_path):
    """HTTP 500, a timeout, a dropped connection, a cut stream, an error event and garbage each
    fail their request with its reason; the normal requests around them complete."""
    lengths = [20, fs.HTTP_500, fs.HANG, fs.DROP, fs.CUT, fs.ERROR_EVENT, fs.GARBAGE, 21]
    trace = write_trace(tmp_path / "t.csv", [(0.01 * i, n, 5) for i, n in enumerate(lengths)])
    out = tmp_path / "run"
    start = time.monotonic()
    code, text = bench_cli("--url", faults.url, "--trace", str(trace), "--timeout", "1", "-o", str(out))
    assert time.monotonic() - start < fs.HANG_S  # the hang was cut by --timeout
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 2 and summary["failed"] == 6
    assert summary["failed_reasons"] == {"bad_response": 1, "connection": 1, "http_500": 1, "stream_cut": 1,
                                         "stream_error": 1, "timeout": 1}
    status = {int(r["prompt_tokens"]): (r["status"], r["reject_reason"]) for r in read_csv(out / "requests.csv")}
    assert status[20] == ("finished", "") and status[fs.HANG] == ("failed", "timeout")
    assert status[fs.CUT] == ("failed", "stream_cut") and status[fs.DROP] == ("failed", "connection")
    assert "failed x1: http_500 (e.g. injected failure)" in text


def test_chunks_of_several_tokens_count_as_several(faults):
    """Two tokens per chunk (vLLM's running usage): all counted, the second at a zero gap."""
    reqs = [Request(0, 0.0, fs.PAIRS, 7)]
    result = run_bench(BenchConfig(faults.url, progress=False, token_times=True), reqs)
    r = result.requests[0]
    assert r.status is Status.FINISHED and r.num_generated == 7
    assert r.token_times_s is not None and len(r.token_times_s) == 7
    assert r.token_times_s[0] == r.token_times_s[1]
    gaps, counts = result.itl.arrays()
    assert int(counts.sum()) == 6 and int(counts[gaps == 0.0].sum()) == 3


def test_a_short_output_is_reported(faults, tmp_path):
    """A server that stops early: the request completes with what it got, and the mismatch is reported."""
    trace = write_trace(tmp_path / "t.csv", [(0.0, fs.SHORT, 10), (0.0, 30, 10)])
    out = tmp_path / "run"
    code, text = bench_cli("--url", faults.url, "--trace", str(trace), "-o", str(out))
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 2 and summary["output_length_mismatches"] == 1
    assert summary["total_output_tokens"] == 15
    assert "output length mismatch: 1 requests received 5 tokens of the 10 asked for" in text


def test_unreachable_server_is_one_error_line(tmp_path):
    """A closed port: one clear error line, exit != 0, nothing written."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends
    out = tmp_path / "run"
    code, text = bench_cli("--url", f"http://127.0.0.1:{port}", "-n", "2", "-o", str(out))
    assert code != 0
    assert f"Error: cannot reach http://127.0.0.1:{port}: connect" in text
    assert "Traceback" not in text and not out.exists()


@pytest.mark.parametrize(("url", "message"), [
    ("localhost:8000", "url must be http://HOST:PORT"),
    ("http://127.0.0.1:99999", "the port is not a number"),
])
def test_bad_url_is_an_error(url, message):
    """A malformed URL is refused before anything is sent."""
    code, text = bench_cli("--url", url, "-n", "1")
    assert code != 0 and message in text


def test_unknown_model_is_refused_before_any_load(faults):
    """--model that the server does not list: one error naming what it does list."""
    code, text = bench_cli("--url", faults.url, "--model", "nope", "-n", "1")
    assert code != 0 and "does not serve model 'nope'; it lists: fault-model" in text


def test_ctrl_c_writes_what_finished(faults, tmp_path):
    """SIGINT mid-run: the run directory is written with the finished requests, exit 130."""
    trace = write_trace(tmp_path / "t.csv", [(0.05 * i, 25, 3) for i in range(4)] + [(30.0, 25, 3)])
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "from experiments.cli import main; main()", "bench",
                             "--no-progress", "--url", faults.url, "--trace", str(trace), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    served = faults.served
    deadline = time.monotonic() + TIMEOUT_S
    while faults.served < served + 4 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)  # interpreter start-up, then the first four requests
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["interrupted"] is True
    assert summary["completed"] == 4 and summary["not_sent"] == 1
