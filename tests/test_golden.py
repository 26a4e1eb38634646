"""Golden runs: fixed `servesim simulate` runs whose summary.json and requests.csv are checked in.

Each run is small (200 requests of the embedded azure-conv trace, well under a second), has a
machine-independent cost model (the roofline preset or the shipped ``profiles/tiny-cpu.json``)
and is checked in both the fast path and ``--exact-steps``: the two must give the same bytes.

A golden file changing means the simulator's answers changed. Changing one is a deliberate act:

    SERVESIM_UPDATE_GOLDEN=1 python -m pytest -q tests/test_golden.py

rewrites ``tests/golden/<name>/`` from ``--exact-steps`` (the reference, the loop the live
engine runs; the test still fails if the fast path disagrees), and the diff goes into a commit
that says why the answers moved.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments.cli import main

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).resolve().parent / "golden"
TINY_PROFILE = ROOT / "profiles" / "tiny-cpu.json"
UPDATE = os.environ.get("SERVESIM_UPDATE_GOLDEN") == "1"
FILES = ("summary.json", "requests.csv")

# A slice of azure-conv replayed 8x faster, prompts and outputs scaled down so that every
# request fits; the KV pools are small enough that the preempting policies really preempt.
TRACE = ["-n", "200", "--time-scale", "8", "--max-prompt-tokens", "1024", "--max-output-tokens", "512"]
SLOS = ["--goodput", "ttft:2000", "--goodput", "tpot:50", "--percentiles", "50,90,99"]

RUNS: dict[str, list[str]] = {
    "static": [*TRACE, "--policy", "static", "--batch-size", "8", "--max-wait-s", "0.5"],
    "continuous": [*TRACE, *SLOS, "--policy", "continuous", "--kv-blocks", "300"],
    "chunked": [*TRACE, *SLOS, "--policy", "chunked", "--token-budget", "256", "--kv-blocks", "300"],
    "vllm": [*TRACE, *SLOS, "--policy", "vllm", "--token-budget", "256", "--kv-blocks", "300"],
    "chunked-swap": [*TRACE, "--policy", "chunked", "--preempt", "swap", "--swap-gib", "1", "--kv-blocks", "200"],
    "continuous-sjf-2replicas": [*TRACE, "--policy", "continuous", "--order", "sjf", "--kv-blocks", "300",
                                 "--replicas", "2", "--router", "least_kv"],
    "chunked-tiny-cpu-profile": ["-n", "100", "--time-scale", "2", "--max-prompt-tokens", "512",
                                 "--max-output-tokens", "128", "--profile", str(TINY_PROFILE), "--policy", "chunked",
                                 "--goodput", "ttft:20", "--goodput", "e2el:1000"],
}


def simulate_to(out: Path, args: list[str]) -> None:
    res = CliRunner().invoke(main, ["simulate", *args, "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name", sorted(RUNS))
def test_golden_run_unchanged(name, tmp_path):
    """A fixed run gives exactly the checked-in summary.json and requests.csv, fast path and exact steps alike."""
    fast, exact = tmp_path / "fast", tmp_path / "exact"
    simulate_to(exact, [*RUNS[name], "--exact-steps"])
    simulate_to(fast, RUNS[name])
    golden = GOLDEN / name
    if UPDATE:
        golden.mkdir(parents=True, exist_ok=True)
        for f in FILES:
            (golden / f).write_bytes((exact / f).read_bytes())
    for f in FILES:
        assert (golden / f).exists(), f"no golden {golden / f}; create it with SERVESIM_UPDATE_GOLDEN=1"
        want = (golden / f).read_bytes()
        assert (exact / f).read_bytes() == want, f"{name}/{f} changed (--exact-steps): the simulator's answers moved"
    for f in FILES:
        assert (fast / f).read_bytes() == (golden / f).read_bytes(), \
            f"{name}/{f}: the fast path's answers differ from exact steps"


def test_golden_runs_exercise_what_they_claim():
    """The checked-in runs cover every policy, preemption by recompute and by swap, and goodput."""
    import csv

    summaries = {name: json.loads((GOLDEN / name / "summary.json").read_text()) for name in RUNS}
    for name, s in summaries.items():
        assert s["rejected"] == 0, f"{name}: golden runs should finish every request"
    assert summaries["static"]["num_preemptions"] == 0
    for name in ("continuous", "chunked", "chunked-swap", "continuous-sjf-2replicas", "vllm"):
        assert summaries[name]["num_preemptions"] > 0, f"{name} was meant to preempt"
    assert 0 < summaries["continuous"]["request_goodput"] < summaries["continuous"]["request_throughput"]
    assert len(summaries["continuous-sjf-2replicas"]["replicas"]) == 2
    rows = list(csv.DictReader((GOLDEN / "continuous-sjf-2replicas" / "requests.csv").open()))
    assert {r["replica"] for r in rows} == {"0", "1"}
    from sim.policies import POLICIES

    covered = {args[args.index("--policy") + 1] for args in RUNS.values()}
    shipped = {name for name, factory in POLICIES.items() if not factory.__module__.startswith("tests")}
    assert covered >= shipped, "a registered policy has no golden run"
