"""experiments/stream_error.py: a server's live steps read back from a run's files and priced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from calibrate.profile import CalibratedCost, load_profile
from calibrate.stream_steps import read_steps
from experiments import stream_error
from experiments.output import write_run
from tests.test_stream_steps import served

ROOT = Path(__file__).resolve().parents[1]
TINY_PROFILE = ROOT / "profiles" / "tiny-cpu.json"


def make_run(path: Path) -> tuple[Path, list]:
    """A validation directory with two live runs, each the simulator's streams."""
    runs = []
    for live, seed in (("live", 1), ("live-2", 2)):
        requests, _ = served(seed=seed)
        write_run(path / live, {}, requests, {}, [])
        runs.append(requests)
    profile = load_profile(TINY_PROFILE)
    setup = {"profile": str(TINY_PROFILE), "scheduler": {"token_budget": 2048}}
    (path / "validation.json").write_text(json.dumps({"setup": setup}))
    return path, [read_steps(r, profile.request_overhead_s, 2048) for r in runs]


def test_the_files_give_the_steps_the_streams_did(tmp_path: Path) -> None:
    run, steps = make_run(tmp_path / "run")
    back = stream_error.run_steps(run, load_profile(TINY_PROFILE).request_overhead_s, 2048)
    assert [s.clean() for s in back] == [s.clean() for s in steps]
    p = stream_error.priced(back, CalibratedCost(load_profile(TINY_PROFILE)))
    assert p["steps"] == sum(len(s.clean()) for s in steps) > 0
    assert p["left_out"] == sum(sum(s.excluded().values()) for s in steps)
    lines: list[str] = []
    assert stream_error.main([str(run)], echo=lines.append) == 0
    assert lines[-1].startswith("run  [tiny-cpu]  ") and f"{p['steps']} steps (+{p['left_out']} left out)" in lines[-1]
    assert f"pace x{p['pace']:.2f}" in lines[-1] and "1:x" in lines[-1]


def test_other_profiles_price_the_same_steps(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path / "run")
    lines: list[str] = []
    assert stream_error.main([str(run), "--profile", str(TINY_PROFILE), "--profile", str(TINY_PROFILE)],
                             echo=lines.append) == 0
    assert len(lines) == 3 and lines[1] == lines[2]


@pytest.mark.parametrize(("edit", "message"), [
    (lambda run: (run / "live" / "tokens.csv").unlink(), "tokens.csv: missing"),
    (lambda run: (run / "live" / "tokens.csv").write_text("id,token,time_s\n0,0,soon\n"),
     "tokens.csv, line 2: id or time_s is not a number"),
    (lambda run: (run / "live" / "tokens.csv").write_text("id,token,time_s\n999,0,1.5\n"),
     "tokens.csv, line 2: request 999 is not in requests.csv"),
    (lambda run: (run / "live" / "requests.csv").write_text("id,arrival_s\n0,0.1\n"),
     "requests.csv: no column 'prompt_tokens'"),
    (lambda run: (run / "validation.json").write_text("{}"), "no setup.profile; give --profile"),
])
def test_bad_input_is_named_with_exit_2(tmp_path: Path, edit, message: str) -> None:
    run, _ = make_run(tmp_path / "run")
    edit(run)
    lines: list[str] = []
    assert stream_error.main([str(run)], echo=lines.append) == 2
    assert lines[-1].startswith("error: ") and message in lines[-1]


def test_a_setup_that_cannot_be_simulated_is_one_error_line(tmp_path: Path) -> None:
    run, _ = make_run(tmp_path / "run")
    setup = {"profile": str(TINY_PROFILE), "scheduler": {"token_budget": 2048, "no_such_knob": 1},
             "workload": {"trace": "azure-conv"}, "kv": {"num_blocks": 64, "block_size": 16}}
    (run / "validation.json").write_text(json.dumps({"setup": setup}))
    lines: list[str] = []
    assert stream_error.main([str(run)], echo=lines.append) == 2
    assert lines[-1].startswith("error: ") and "its setup cannot be simulated again" in lines[-1]
