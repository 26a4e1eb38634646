"""End-to-end tests of `servesim simulate`, `models`, `hardware` from the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from click.testing import CliRunner

from experiments.cli import main

TINY_PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "tiny-cpu.json"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_simulate_trace_writes_run_directory(tmp_path):
    """Replaying a slice of azure-conv writes config, requests, summary (vLLM keys) and time series."""
    out = tmp_path / "run"
    res = invoke("simulate", "--num-requests", "300", "--policy", "chunked", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert "Mean TTFT (ms):" in res.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms", "mean_e2el_ms",
                "request_throughput", "output_throughput", "total_token_throughput", "completed", "rejected"):
        assert key in summary
    assert summary["completed"] + summary["rejected"] == 300
    rows = list(csv.DictReader((out / "requests.csv").open()))
    assert len(rows) == 300
    assert all(int(r["generated_tokens"]) == int(r["output_tokens"]) for r in rows if r["status"] == "finished")
    config = json.loads((out / "config.json").read_text())
    assert config["scheduler"]["policy"] == "chunked"
    assert config["workload"]["trace"] == "azure-conv"
    assert (out / "timeseries.csv").read_text().startswith("replica,time_s,batch_size")


def test_same_seed_gives_byte_identical_outputs(tmp_path):
    """Two runs with the same seed and inputs give byte-identical summary.json and requests.csv."""
    args = ["simulate", "--arrival", "gamma", "--burstiness", "0.5", "--rate", "20", "-n", "300",
            "--policy", "continuous", "--kv-blocks", "400", "--preempt", "swap", "--seed", "3"]
    for d in ("a", "b"):
        assert invoke(*args, "-o", str(tmp_path / d)).exit_code == 0
    for name in ("summary.json", "requests.csv", "timeseries.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_replicas_report_per_replica_metrics(tmp_path):
    """--replicas writes a summary per replica whose completed counts add up to the total."""
    out = tmp_path / "r"
    res = invoke("simulate", "-n", "200", "--replicas", "3", "--router", "least_loaded", "-o", str(out))
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["replicas"]) == 3
    assert sum(r["completed"] for r in summary["replicas"]) == summary["completed"]


def test_goodput_counts_requests_meeting_slos(tmp_path):
    """A generous SLO makes goodput equal throughput; an impossible one makes it zero."""
    out = tmp_path / "g"
    invoke("simulate", "-n", "100", "--goodput", "ttft:1000000", "--goodput", "e2el:10000000", "-o", str(out))
    s = json.loads((out / "summary.json").read_text())
    assert abs(s["request_goodput"] - s["request_throughput"]) < 1e-9
    invoke("simulate", "-n", "100", "--goodput", "ttft:0.001", "-o", str(out))
    assert json.loads((out / "summary.json").read_text())["request_goodput"] == 0


def test_oversized_requests_are_rejected_and_counted(tmp_path):
    """With a KV pool too small for some prompts, those are rejected with a reason and the rest finish."""
    out = tmp_path / "k"
    res = invoke("simulate", "-n", "200", "--kv-blocks", "80", "-o", str(out))
    assert res.exit_code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["rejected"] > 0 and s["completed"] + s["rejected"] == 200
    assert any("KV blocks" in reason for reason in s["reject_reasons"])


def test_bad_arguments_get_clear_errors():
    """Unknown presets, bad goodput strings and impossible configs are errors that say what is wrong."""
    res = CliRunner().invoke(main, ["simulate", "--model", "gpt-5"])
    assert res.exit_code != 0 and "qwen2.5-7b" in res.output
    res = CliRunner().invoke(main, ["simulate", "-n", "10", "--goodput", "latency:5"])
    assert res.exit_code != 0 and "ttft" in res.output
    res = CliRunner().invoke(main, ["simulate", "-n", "10", "--policy", "static", "--preempt", "swap"])
    assert res.exit_code != 0 and "static" in res.output
    res = CliRunner().invoke(main, ["simulate", "--trace", "no-such-trace"])
    assert res.exit_code != 0 and "azure-conv" in res.output


def test_presets_commands_show_kv_bytes():
    """`servesim models NAME` shows KV bytes per token; unknown names list the known ones."""
    res = invoke("models", "qwen2.5-0.5b")
    assert "12,288" in res.output
    res = invoke("hardware", "h100-sxm")
    assert "3350 GB/s" in res.output
    res = CliRunner().invoke(main, ["models", "nope"])
    assert res.exit_code != 0 and "tiny" in res.output


def test_every_command_has_help():
    """Every registered command answers --help."""
    from experiments.cli import COMMANDS

    for name in ["simulate", "models", "hardware", "traces"]:
        assert name in COMMANDS
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0 and "Usage" in res.output


def test_profile_sets_cost_capacity_and_model(tmp_path):
    """--profile alone simulates with the profile's model, cost and KV capacity."""
    out = tmp_path / "p"
    res = invoke("simulate", "--profile", str(TINY_PROFILE), "-n", "50", "--max-prompt-tokens", "256",
                 "--max-output-tokens", "64", "-o", str(out))
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    profile = json.loads(open(str(TINY_PROFILE)).read())
    assert config["model"] == "tiny"
    assert config["kv_blocks_per_replica"] == profile["num_kv_blocks"]


def test_profile_without_kv_memory_asks_for_capacity(tmp_path):
    """A profile fitted from timings alone has no KV memory: simulate says to pass --kv-blocks."""
    profile = json.loads(open(str(TINY_PROFILE)).read())
    profile["kv_memory_bytes"] = None
    path = tmp_path / "p.json"
    path.write_text(json.dumps(profile))
    res = CliRunner().invoke(main, ["simulate", "--profile", str(path), "-n", "10", "--max-prompt-tokens", "100"])
    assert res.exit_code != 0 and "--kv-blocks" in res.output
    res = CliRunner().invoke(main, ["simulate", "--profile", str(path), "-n", "10", "--max-prompt-tokens", "100",
                                    "--kv-blocks", "500"])
    assert res.exit_code == 0, res.output
