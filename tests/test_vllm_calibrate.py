"""`servesim calibrate --engine vllm`: the step shape of a vLLM scheduler output, the step
recorder, the black-box analysis of streamed token times, the profile's engine provenance and
the command's errors. None of these needs vLLM (fake scheduler outputs stand in for it); the
in-process run against a real vLLM is in tests/test_vllm_calibrate_live.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from calibrate.profile import load_profile, save_profile
from calibrate.samples import Sample
from calibrate.vllm_blackbox import BlackboxPlan, decode_steps, lone_overhead_s, lone_prefill, mixed_step
from calibrate.vllm_calibration import find_vllm_python, profile_from_engine
from calibrate.vllm_inproc import InprocPlan, VllmEngineArgs
from calibrate.vllm_steps import StepRecorder, VllmApiError, require_api, step_shape
from experiments.cli import main
from sim.batch import StepShape, chunk_attention
from sim.request import Request, Status


def _new(req_id: str, computed: int) -> SimpleNamespace:
    return SimpleNamespace(req_id=req_id, num_computed_tokens=computed)


def _output(scheduled: dict[str, int], new: list[SimpleNamespace], cached: list[tuple[str, int]],
            spec: dict | None = None) -> SimpleNamespace:
    """A stand-in for vLLM 0.32.0's SchedulerOutput with the fields the recorder reads."""
    return SimpleNamespace(
        num_scheduled_tokens=scheduled, total_num_scheduled_tokens=sum(scheduled.values()),
        scheduled_new_reqs=new,
        scheduled_cached_reqs=SimpleNamespace(req_ids=[r for r, _ in cached],
                                              num_computed_tokens=[c for _, c in cached]),
        scheduled_spec_decode_tokens=spec or {})


def test_step_shape_counts_prefills_decodes_and_their_context():
    """New prompts, a chunk after context, a prefix-cache hit, decodes and a prompt's last
    one-token chunk become the prefill and decode sums servesim's Batch.shape would give."""
    out = _output(
        scheduled={"a": 100, "b": 50, "c": 30, "d": 1, "e": 1, "f": 1},
        new=[_new("a", 0), _new("c", 256)],  # c: 256 tokens of its prompt were cached
        cached=[("b", 200), ("d", 140), ("e", 99), ("f", 10)])
    prompts = {"a": 100, "b": 300, "c": 286, "d": 128, "e": 100, "f": 10}
    shape = step_shape(out, prompts)
    # e: prompt 100 with 99 computed, so its one token is the prompt's last: a prefill chunk.
    assert shape.prefill_seqs == 4 and shape.prefill_tokens == 100 + 50 + 30 + 1
    assert shape.prefill_context_tokens == 0 + 200 + 256 + 99
    assert shape.prefill_attention_tokens == pytest.approx(
        chunk_attention(100, 0) + chunk_attention(50, 200) + chunk_attention(30, 256) + chunk_attention(1, 99))
    # d (12 outputs, the 13th computing) and f (prompt 10, its first output computing) decode.
    assert shape.decode_seqs == 2 and shape.decode_context_tokens == 140 + 10


def test_step_shape_treats_a_resumed_request_as_a_prefill():
    """A request preempted by recompute comes back as a cached request computing from 0: a prefill."""
    out = _output(scheduled={"r": 140}, new=[], cached=[("r", 0)])
    assert step_shape(out, {"r": 128}) == StepShape(prefill_tokens=140, prefill_seqs=1,
                                                    prefill_attention_tokens=chunk_attention(140, 0))


def test_step_shape_refuses_speculative_tokens_and_unknown_requests():
    """Speculative decoding has no servesim shape, and a request without its counts is an error."""
    with pytest.raises(ValueError, match="speculative"):
        step_shape(_output({"a": 3}, [_new("a", 10)], [], spec={"a": [1, 2]}), {"a": 5})
    with pytest.raises(ValueError, match="'zz'"):
        step_shape(_output({"zz": 1}, [], []), {"zz": 5})


def test_a_scheduler_output_without_the_fields_names_them():
    """A vLLM whose SchedulerOutput lacks a field fails with its name, not an AttributeError."""
    bare = SimpleNamespace(num_scheduled_tokens={}, scheduled_new_reqs=[])
    with pytest.raises(VllmApiError, match=r"SchedulerOutput\.scheduled_cached_reqs"):
        step_shape(bare, {})


def test_require_api_names_what_a_vllm_lacks():
    """An engine core without a scheduler, or a scheduler without requests, is named in the error."""
    with pytest.raises(VllmApiError, match=r"EngineCore\.scheduler"):
        require_api(SimpleNamespace(), "9.9")
    with pytest.raises(VllmApiError, match=r"Scheduler\.update_from_output, Scheduler\.requests.*--url"):
        require_api(SimpleNamespace(scheduler=SimpleNamespace(schedule=None)), "9.9")


class _FakeCore:
    """An EngineCore stand-in: a step schedules the next scripted output, 'runs' it, and updates
    from it; with ``ahead`` the next one is scheduled before the previous is updated (a batch queue)."""

    def __init__(self, outputs: list, prompts: dict[str, int], clock: list[float], step_s: list[float]) -> None:
        self._outputs, self._clock, self._step_s = iter(outputs), clock, iter(step_s)
        self.scheduler = SimpleNamespace(requests={r: SimpleNamespace(num_prompt_tokens=n) for r, n in prompts.items()},
                                         schedule=lambda: next(self._outputs), update_from_output=lambda out, mro: {})

    def step_fn(self):
        out = self.scheduler.schedule()
        self._clock[0] += next(self._step_s)
        return self.scheduler.update_from_output(out, None), True


def test_step_recorder_keeps_each_step_with_its_wall_time_and_phase():
    """Every step that scheduled tokens is kept with the time step_fn took, under the phase
    label then set; an empty step and steps with no phase (warm-up) are not."""
    clock = [0.0]
    outputs = [_output({"a": 64}, [_new("a", 0)], []), _output({"a": 1}, [], [("a", 64)]),
               _output({}, [], []), _output({"a": 1}, [], [("a", 65)])]
    core = _FakeCore(outputs, {"a": 64}, clock, [0.5, 0.02, 0.001, 0.03])
    rec = StepRecorder(core, clock=lambda: clock[0])
    core.step_fn()  # warm-up: phase None
    rec.phase = "grid"
    core.step_fn()
    core.step_fn()  # empty
    rec.phase = "live"
    core.step_fn()
    assert [(s.shape, s.phase) for s in rec.steps] == [
        (StepShape(decode_seqs=1, decode_context_tokens=64), "grid"),
        (StepShape(decode_seqs=1, decode_context_tokens=65), "live")]
    assert [s.step_s for s in rec.steps] == pytest.approx([0.02, 0.03])


def test_step_recorder_times_overlapping_steps_from_the_previous_end():
    """With a batch queue (async scheduling) a step is scheduled while the previous runs: it is
    timed from the previous step's end to its own, so the steps add up to the wall time."""
    clock = [0.0]
    outs = [_output({"a": 1}, [], [("a", 10 + k)]) for k in range(3)]
    sched = SimpleNamespace(requests={"a": SimpleNamespace(num_prompt_tokens=10)}, schedule=iter(outs).__next__,
                            update_from_output=lambda out, mro: {})
    rec = StepRecorder(SimpleNamespace(scheduler=sched), clock=lambda: clock[0])
    rec.phase = "live"
    first = sched.schedule()  # t = 0
    clock[0] = 0.004
    second = sched.schedule()  # scheduled at 0.004 while the first runs
    clock[0] = 0.010
    sched.update_from_output(first, None)
    clock[0] = 0.012
    third = sched.schedule()
    clock[0] = 0.021
    sched.update_from_output(second, None)
    clock[0] = 0.030
    sched.update_from_output(third, None)
    assert [s.step_s for s in rec.steps] == pytest.approx([0.010, 0.011, 0.009])
    assert [s.shape.decode_context_tokens for s in rec.steps] == [10, 11, 12]


def _req(i: int, prompt: int, times: list[float], arrival: float = 0.0) -> Request:
    r = Request(i, arrival, prompt, len(times))
    r.token_times_s = []
    r.record_tokens(times)
    r.status = Status.FINISHED
    return r


def test_decode_steps_reads_lockstep_batches_from_token_times():
    """Two requests sent together, the second prefilled one step later (with the first's decode):
    from then on each step decodes both, priced at the median of their gaps, with the context
    each had; streams of one step arriving a little apart are still one step."""
    a = _req(0, 32, [1.00, 1.0502, 1.15, 1.2501, 1.35])
    b = _req(1, 32, [1.05, 1.1501, 1.25, 1.35])
    steps = decode_steps([a, b])
    assert [s.decode_seqs for s, _ in steps] == [2, 2, 2]
    # a computes its 3rd, 4th, 5th token (context: the prompt and 1, 2, 3 outputs); b its 2nd, 3rd, 4th.
    assert [s.decode_context_tokens for s, _ in steps] == [32 + 1 + 32 + 0, 32 + 2 + 32 + 1, 32 + 3 + 32 + 2]
    assert [t for _, t in steps] == pytest.approx([0.1, 0.1, 0.1], abs=2e-4)


def test_decode_steps_skips_coalesced_chunks_and_failed_requests():
    """Tokens that came in one chunk give no gap, nor does the gap after them (delivered late);
    a failed request voids the batch."""
    a = _req(0, 16, [1.0, 1.1, 1.1, 1.15, 1.25])
    steps = decode_steps([a])
    assert [s.decode_context_tokens for s, _ in steps] == [16 + 0, 16 + 3]
    assert [t for _, t in steps] == pytest.approx([0.1, 0.1])
    a.status = Status.FAILED
    assert decode_steps([a]) == []


def test_mixed_step_is_the_decoders_gap_that_ends_at_the_joiners_token():
    """A one-token request arriving while two decode: their gap ending at its token is the mixed step."""
    d1 = _req(0, 64, [1.0, 1.1, 1.2, 1.5, 1.6])
    d2 = _req(1, 64, [1.0, 1.1, 1.2, 1.5, 1.6])
    joiner = _req(2, 128, [1.501], arrival=1.25)
    shape, step_s = mixed_step([d1, d2], joiner)
    assert shape == StepShape(prefill_tokens=128, prefill_seqs=1, decode_seqs=2, decode_context_tokens=2 * (64 + 2),
                              prefill_attention_tokens=chunk_attention(128, 0))
    assert step_s == pytest.approx(0.3)
    early = _req(3, 128, [1.0], arrival=0.0)  # prefilled with the decoders' prompts
    assert mixed_step([d1, d2], early) is None


def test_lone_prefill_takes_off_the_per_request_cost_of_one_token_prompts():
    """One-token prompts: TTFT minus their decode gap is the server's own cost, which a lone
    prefill's TTFT loses to leave its step."""
    ones = [_req(i, 1, [0.030 + i * 1e-3, 0.050 + i * 1e-3, 0.070 + i * 1e-3]) for i in range(3)]
    overhead = lone_overhead_s(ones)
    assert overhead == pytest.approx(0.031 - 0.020)
    shape, step_s = lone_prefill(_req(9, 256, [0.411, 0.43]), overhead)
    assert shape.prefill_tokens == 256 and shape.decode_seqs == 0
    assert step_s == pytest.approx(0.4)


def test_blackbox_plan_fits_the_servers_limits():
    """Patterns beyond the token budget, the sequence cap or the model length are left out."""
    assert BlackboxPlan.make(quick=True).decode_batches == (1, 4, 16, 32, 64)
    plan = BlackboxPlan.make(quick=True).fitted(budget=256, max_seqs=4, max_len=512)
    assert plan.prefill_lengths == (16, 64, 256)
    assert plan.decode_batches == (1, 4)
    assert plan.decode_contexts == (32,)
    # Decode batches whose prompts take more prefill steps than leave lockstep gaps are not sent.
    wide = BlackboxPlan.make(quick=True).fitted(budget=2048, max_seqs=128, max_len=2048)
    assert wide.token_budget == 2048 and (16, 512) in wide.decode_patterns() and (64, 32) in wide.decode_patterns()
    assert (32, 512) not in wide.decode_patterns() and BlackboxPlan().decode_patterns()[-1] == (64, 512)
    assert plan.join_lengths == (16, 128) and plan.join_batch == 3
    # One pass of every pattern first, not kept: vLLM's CPU backend builds a kernel per new token count.
    assert plan.warm_passes == 1
    assert BlackboxPlan(warm_passes=0).fitted(budget=256, max_seqs=4, max_len=512).warm_passes == 0
    with pytest.raises(ValueError, match="warm_passes"):
        BlackboxPlan(warm_passes=-1)
    # Bursts within the sequence cap and the budget: 32 x 2 and 8 x 64 tokens are beyond a cap of 4.
    assert plan.bursts == () and plan.burst_repeats == 3
    assert BlackboxPlan().fitted(budget=512, max_seqs=16, max_len=512).bursts == ((16, 24), (8, 64))
    with pytest.raises(ValueError, match="bursts"):
        BlackboxPlan(bursts=((1, 24),))


def test_inproc_config_is_validated_naming_the_field():
    """Bad engine args or plans are refused with the field's name."""
    with pytest.raises(ValueError, match="max_num_seqs"):
        VllmEngineArgs(model="/x", max_num_seqs=0)
    with pytest.raises(ValueError, match="dtype"):
        VllmEngineArgs(model="/x", dtype="int8")
    with pytest.raises(ValueError, match="decode_tokens"):
        InprocPlan(decode_tokens=1)
    plan = InprocPlan.make(quick=True)
    assert plan.prefill_lengths(budget=2048, max_prompt=2047) == [16, 64, 256, 1024, 2047]
    assert plan.decode_batches(128) == [1, 4, 16, 64]


ENGINE_INFO = {"engine": "vllm", "vllm_version": "0.32.0", "mode": "in-process", "device": "cpu: test",
               "dtype": "bfloat16", "model": "small", "torch_version": "2.13.0+cpu", "torch_threads": 1,
               "settings": {"max_num_batched_tokens": 2048, "max_num_seqs": 128, "max_model_len": 2048,
                            "block_size": 128, "num_gpu_blocks": 682, "enable_prefix_caching": True},
               "phases_s": {"startup": 30.0, "grid": 10.0}}


def test_profile_from_engine_records_the_engine_and_round_trips(tmp_path):
    """The profile carries vLLM's version, settings and blocks, and reads back unchanged."""
    samples = [Sample(StepShape(prefill_tokens=p, prefill_seqs=1), 1.0 + p / 100, origin="grid") for p in
               (16, 32, 64, 128, 256, 512)] + [
        Sample(StepShape(decode_seqs=b, decode_context_tokens=b * 64), 5.0 + b, origin="grid") for b in (1, 2, 4, 8)]
    profile = profile_from_engine(samples, ENGINE_INFO, source="vllm:in-process", grid="vllm-quick",
                                  calibration_s=40.0)
    assert profile.block_size == 128 and profile.num_kv_blocks == 682
    assert profile.kv_memory_bytes == 682 * 128 * profile.kv_bytes_per_token
    assert profile.torch_threads == 1 and profile.max_model_len == 2048
    save_profile(profile, tmp_path / "p.json")
    again = load_profile(tmp_path / "p.json")
    assert again.engine == ENGINE_INFO and again.source == "vllm:in-process"
    shown = CliRunner().invoke(main, ["profile", "show", str(tmp_path / "p.json")])
    assert shown.exit_code == 0
    assert "vllm 0.32.0 (in-process): max_num_batched_tokens 2048, max_num_seqs 128" in shown.output


def test_find_vllm_python_names_the_ways_to_give_one(monkeypatch, tmp_path):
    """Without vllm here and no SERVESIM_VLLM_PYTHON, the error names --vllm-python and the variable."""
    import importlib.util

    from calibrate.errors import CalibrationError

    monkeypatch.delenv("SERVESIM_VLLM_PYTHON", raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CalibrationError, match=r"--vllm-python.*SERVESIM_VLLM_PYTHON"):
        find_vllm_python()
    with pytest.raises(CalibrationError, match="no such file"):
        find_vllm_python(str(tmp_path / "nope"))
    monkeypatch.setenv("SERVESIM_VLLM_PYTHON", "/bin/sh")
    assert find_vllm_python() == "/bin/sh"


@pytest.mark.parametrize(("args", "message"), [
    (["--engine", "vllm", "-o", "p.json"], "--model CHECKPOINT_DIR"),
    (["--engine", "vllm", "--model", "ckpt", "--threads", "2", "-o", "p.json"], "--threads apply to --engine servesim"),
    (["--engine", "vllm", "--url", "http://127.0.0.1:9", "--kv-cache-gib", "2", "-o", "p.json"],
     "--kv-cache-gib cannot be used with --url"),
    (["--model", "tiny", "--url", "http://127.0.0.1:9", "-o", "p.json"], "--url apply to --engine vllm"),
    (["--engine", "vllm", "--model", "ckpt", "--device", "cpu", "-o", "p.json"],
     "--device applies to --engine vllm only with --url"),
    (["--engine", "vllm", "--model", "nowhere", "-o", "p.json"], "not a checkpoint directory"),
    (["--engine", "vllm", "--url", "http://127.0.0.1:9", "-o", "p.json"], "cannot read the engine's settings"),
    (["--engine", "vllm", "--model", "ckpt", "--build-tokens", "8", "-o", "p.json"],
     "--build-tokens applies to --engine vllm only with --url"),
    # A CPU server the user runs: how to size its oneDNN cache is said before anything is sent.
    (["--engine", "vllm", "--url", "http://127.0.0.1:9", "--device", "cpu", "-o", "p.json"],
     "ONEDNN_PRIMITIVE_CACHE_CAPACITY=16384; start yours with the same"),
])
def test_calibrate_engine_vllm_errors_are_for_people(args, message, tmp_path, monkeypatch):
    """Misused options and an unreachable server give one line naming the option, no traceback."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["calibrate", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_blackbox_calibration_against_servesim_serve(net, one_torch_thread, tmp_path):
    """`calibrate --engine vllm --url` end to end against a server of the same API and /metrics
    (servesim serve, tiny model): every kind of step is measured with the pattern's shape, and the
    profile records the server's block size and blocks."""
    from calibrate.vllm_blackbox import calibrate_blackbox
    from runtime.tokenizer import load_tokenizer, write_wordlevel_tokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    tok = write_wordlevel_tokenizer(tmp_path / "tok", 4096)
    plan = BlackboxPlan(prefill_lengths=(64, 256), decode_batches=(1, 3), decode_contexts=(32,), decode_tokens=12,
                        join_batch=2, join_lengths=(16,), repeats=1, overhead_requests=2, warm_passes=1,
                        bursts=((4, 2),), burst_repeats=3)
    with ServerThread(tiny_engine(net), load_tokenizer(tok), max_model_len=512) as server:
        profile = calibrate_blackbox(server.url, model="tiny", dtype="float32", max_num_batched_tokens=512,
                                     max_num_seqs=64, plan=plan, workdir=tmp_path / "work", folds=2, build_tokens=5)
    kinds = {s.kind for s in profile.samples}
    assert kinds >= {"prefill", "decode"}
    # A lone prefill whose TTFT is within the per-request cost's jitter (the tiny model's take a
    # few ms) is left out, so the lengths measured are some of the planned ones, nothing else.
    assert {s.shape.prefill_tokens for s in profile.samples if s.kind == "prefill"} <= {64, 256}
    batch3 = [s.shape for s in profile.samples if s.kind == "decode" and s.shape.decode_seqs == 3]
    assert batch3 and all(3 * 32 <= sh.decode_context_tokens < 3 * 44 for sh in batch3)
    assert profile.engine["mode"] == "http" and profile.engine["settings"]["block_size"] == 16
    assert profile.num_kv_blocks == 512 and profile.source.startswith("vllm:http://127.0.0.1:")
    # The server's per-request cost, measured from the one-token prompts, is what the simulator will add.
    assert profile.request_overhead_s == profile.engine["measured"]["overhead_ms"] / 1000 >= 0
    written = json.loads((tmp_path / "work" / "engine.json").read_text())
    assert written["settings_assumed"] == []
    # A pass is 2 lone prefills, decode batches of 1 and 3, 2 decoders and 1 joiner: 9 requests.
    # Before them 1 warm-up and 2 one-token prompts; the warm pass is sent, then the kept one.
    assert written["measured"]["requests"] == 3 + 2 * 9 and written["measured"]["warm_passes"] == 1
    assert set(written["measured"]["pattern_median_ms"]) <= {"prefill 64", "prefill 256", "decode 1 after a prefill",
                                                             "decode 1x32", "decode 3x32", "join 16"}
    # Before them, lone prompts of 1..5 tokens built the server's kernels (their own client).
    assert written["measured"]["build_tokens"] == 5 and written["measured"]["build_s"] > 0
    # After them, bursts of 4 at once: whether the first stepped alone in each, each burst's bounds
    # on the frontend's intake gap, and the gap kept, which the profile carries for the simulator.
    burst = written["measured"]["burst"]
    # (a burst whose first token came coalesced with the next tells nothing of the gap: left out)
    assert burst["bursts"] == [[4, 2]] and len(burst["first_alone"]) == 3 and len(burst["intake_bounds_ms"]) <= 3
    assert all(0 <= lo <= hi for lo, hi in burst["intake_bounds_ms"])
    gap_ms = burst["intake_gap_ms"]  # None when no burst told
    assert (gap_ms is None) == (not burst["intake_bounds_ms"])
    assert profile.intake_gap_s == pytest.approx((gap_ms or 0.0) / 1000) and profile.intake_gap_s >= 0


def test_decode_batches_against_servesim_serve(net, one_torch_thread, tmp_path):
    """experiments/decode_batches.py --url end to end against servesim serve (tiny): a step is
    read for every batch and context, longer for more sequences, and written to the CSV."""
    import csv

    from experiments.decode_batches import main
    from runtime.tokenizer import load_tokenizer, write_wordlevel_tokenizer
    from tests.serve_thread import ServerThread, tiny_engine

    tok = write_wordlevel_tokenizer(tmp_path / "tok", 4096)
    lines: list[str] = []
    with ServerThread(tiny_engine(net), load_tokenizer(tok), max_model_len=512) as server:
        code = main(["--url", server.url, "--batches", "1,8", "--contexts", "32", "--repeats", "1",
                     "-o", str(tmp_path / "out")], echo=lines.append)
    assert code == 0, lines
    rows = list(csv.DictReader((tmp_path / "out" / "decode-batches.csv").open()))
    assert [(r["batch"], r["context"]) for r in rows] == [("1", "32"), ("8", "32")]
    assert all(int(r["steps"]) >= 1 and float(r["median_ms"]) > 0 for r in rows)
    assert any(line.startswith("    8") for line in lines)


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://x", "--batches", "1,a"], "comma-separated integers"),
    (["--url", "http://x", "--batches", "0,4"], "must be >= 1"),
    (["--url", "http://x", "--tokens", "2"], "need >= 3"),
    ([], "give --url URL"),
])
def test_decode_batches_bad_arguments(argv, message, capsys, monkeypatch):
    from experiments.decode_batches import main

    monkeypatch.delenv("SERVESIM_VLLM_PYTHON", raising=False)
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_build_kernels_sends_every_token_count_within_the_servers_limits(monkeypatch):
    """One lone one-token prompt per token count, in order, never past the budget or max_model_len - 1."""
    from calibrate import vllm_blackbox

    sent: list[list[tuple[float, int, int]]] = []
    monkeypatch.setattr(vllm_blackbox._Client, "run", lambda self, specs, one_at_a_time=False: sent.append(
        list(specs)) or [])
    assert vllm_blackbox.build_kernels("http://x", 0) == 0.0 and sent == []
    vllm_blackbox.build_kernels("http://x", 6)
    assert sent[-1] == [(0.0, n, 1) for n in range(1, 7)]
    vllm_blackbox.build_kernels("http://x", 512, budget=4)
    assert [n for _, n, _ in sent[-1]] == [1, 2, 3, 4]
    vllm_blackbox.build_kernels("http://x", 512, budget=2048, max_model_len=6)
    assert [n for _, n, _ in sent[-1]] == [1, 2, 3, 4, 5]
    # What is recorded is what was sent.
    assert vllm_blackbox.build_count(512, 4) == 4 and vllm_blackbox.build_count(512, 2048, 6) == 5
    assert vllm_blackbox.build_count(0, 4) == 0 and vllm_blackbox.build_count(8) == 8

