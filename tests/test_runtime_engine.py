"""The live engine end to end: every request finishes with its tokens, stats and step log are
recorded like the simulator's, and ``servesim run`` writes the simulator's run directory."""

from __future__ import annotations

import csv
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from experiments.commands.run import run  # noqa: E402
from experiments.output import STEP_COLUMNS  # noqa: E402
from runtime.engine import LiveEngine  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.weights import load_model  # noqa: E402
from sim.kv import BlockManager  # noqa: E402
from sim.metrics import summarize  # noqa: E402
from sim.models import get_model  # noqa: E402
from sim.policies import SchedulerConfig, make_policy  # noqa: E402
from sim.request import Request, Status  # noqa: E402
from sim.workload import SyntheticWorkload  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--threads", "1", "--no-progress", "--arrival", "poisson", "--num-requests", "6", "--rate", "200",
         "--prompt-tokens", "uniform:4:40", "--output-tokens", "uniform:2:12"]


def engine(net, config: SchedulerConfig, num_blocks: int = 512, block_size: int = 16) -> LiveEngine:
    blocks = BlockManager(num_blocks, block_size)
    return LiveEngine(ModelRunner(net, blocks, seed=1), make_policy(config, blocks))


def test_live_run_finishes_every_request_with_its_tokens(net):
    """A Poisson workload: all finish, token counts exact, stats and step log like the simulator's."""
    requests = SyntheticWorkload(rate=100.0, num_requests=12, prompt_dist="uniform:8:96",
                                 output_dist="uniform:1:24", seed=3).generate()
    result = engine(net, SchedulerConfig("chunked", token_budget=32)).run(requests, token_times=True)
    stats = result.replicas[0]
    for r in result.requests:
        assert r.status is Status.FINISHED
        assert r.num_generated == r.output_tokens == len(result.outputs[r.id]) == len(r.token_times_s)
        assert r.arrival_s <= r.first_scheduled_s <= r.first_token_s <= r.finish_s
        assert r.token_times_s == sorted(r.token_times_s)
    assert stats.steps == len(result.step_log) > 0
    assert stats.busy_s == pytest.approx(sum(s for _, s in result.step_log))
    assert stats.itl.total == sum(r.output_tokens - 1 for r in requests)
    assert sum(shape.num_tokens for shape, _ in result.step_log) >= sum(r.prompt_tokens for r in requests)
    assert all(shape.prefill_tokens + shape.decode_seqs <= 32 for shape, _ in result.step_log)
    assert len(stats.timeseries.time_s) >= stats.steps
    summary = summarize(result.requests, result.itl(), num_preemptions=result.num_preemptions)
    assert summary["completed"] == 12 and summary["output_throughput"] > 0


def test_decode_steps_are_logged_as_decodes(net):
    """The step log's shapes are taken before the step, so decodes count as decodes."""
    result = engine(net, SchedulerConfig("continuous")).run([Request(0, 0.0, 10, 4)])
    shapes = [s for s, _ in result.step_log]
    assert shapes[0].prefill_tokens == 10 and shapes[0].decode_seqs == 0
    assert [(s.decode_seqs, s.decode_context_tokens) for s in shapes[1:]] == [(1, 10), (1, 11), (1, 12)]


def test_engine_waits_for_arrivals_and_static_timeout(net):
    """Idle, the engine sleeps until the next arrival or the static batch's max_wait expires."""
    requests = [Request(0, 0.0, 5, 3), Request(1, 0.05, 5, 3)]
    result = engine(net, SchedulerConfig("static", batch_size=4, max_wait_s=0.02, preempt="off")).run(requests)
    first, second = result.requests
    assert first.first_scheduled_s >= 0.02  # waited max_wait for a fuller batch
    assert second.first_scheduled_s >= 0.05  # not before it arrived
    assert all(r.status is Status.FINISHED for r in result.requests)


def test_request_too_big_is_rejected_not_hung(net):
    """A request that can never fit the pool is rejected and the run still ends."""
    requests = [Request(0, 0.0, 20, 5), Request(1, 0.0, 500, 5)]
    result = engine(net, SchedulerConfig("continuous"), num_blocks=8, block_size=4).run(requests)
    assert [r.status for r in result.requests] == [Status.FINISHED, Status.REJECTED]


def test_policy_must_share_the_runner_block_manager(net):
    """The pool and the scheduler must be the same blocks; anything else is refused."""
    runner = ModelRunner(net, BlockManager(16, 4))
    with pytest.raises(ValueError, match="BlockManager"):
        LiveEngine(runner, make_policy(SchedulerConfig(), BlockManager(16, 4)))


def _rows(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("engine_name", ["servesim", "hf-static"])
def test_cli_run_writes_the_run_directory(tmp_path, engine_name):
    """`servesim run -o DIR` writes config, requests, summary, timeseries and the step log."""
    out = tmp_path / "run"
    res = CliRunner().invoke(run, [*SMALL, "--engine", engine_name, "--batch-size", "4", "--max-wait-s", "0",
                                   "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "Output token throughput" in res.output
    rows = _rows(out / "requests.csv")
    assert len(rows) == 6
    assert all(r["status"] == "finished" and r["generated_tokens"] == r["output_tokens"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 6
    config = json.loads((out / "config.json").read_text())
    assert config["engine"] == engine_name and config["model"] == "tiny" and config["device"] == "cpu"
    steps = _rows(out / "steps.csv")
    assert steps and list(steps[0]) == STEP_COLUMNS
    assert (out / "timeseries.csv").exists()


def test_cli_replays_a_trace_with_swap(tmp_path):
    """A scaled slice of the embedded trace runs with swap preemption in a tiny pool."""
    out = tmp_path / "run"
    res = CliRunner().invoke(run, ["--threads", "1", "--no-progress", "--trace", "azure-conv", "--num-requests", "6",
                                   "--time-scale", "1000", "--max-prompt-tokens", "48", "--max-output-tokens", "12",
                                   "--policy", "chunked", "--token-budget", "16", "--preempt", "swap",
                                   "--kv-blocks", "8", "--block-size", "8", "-o", str(out)])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["kv"]["num_host_blocks"] == 8
    assert all(r["status"] == "finished" for r in _rows(out / "requests.csv"))
    assert json.loads((out / "summary.json").read_text())["num_preemptions"] > 0
    assert any(int(row["swap_out_tokens"]) > 0 for row in _rows(out / "steps.csv"))


def test_cli_reports_bad_options_plainly():
    """Bad input is a one-line error, not a traceback: an unknown preset; hf-static with a prompt too long."""
    res = CliRunner().invoke(run, [*SMALL, "--model", "gpt-9"])
    assert res.exit_code != 0 and "tiny" in res.output
    res = CliRunner().invoke(run, [*SMALL, "--engine", "hf-static", "--prompt-tokens", "4000"])
    assert res.exit_code != 0 and "--max-prompt-tokens" in res.output and "Traceback" not in res.output


def test_cli_rejects_requests_longer_than_the_model_as_simulate_does(tmp_path):
    """A prompt beyond tiny's 2048 positions is rejected by the scheduler and counted with its
    reason, as in `servesim simulate`; the other requests are served."""
    out = tmp_path / "run"
    res = CliRunner().invoke(run, ["--threads", "1", "--no-progress", "--arrival", "poisson", "--rate", "100",
                                   "-n", "3", "--prompt-tokens", "4000", "--output-tokens", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == 3 and summary["completed"] == 0
    assert list(summary["reject_reasons"]) == ["4000 prompt + 2 output tokens exceed the model's 2048 positions"]
    assert "rejected x3" in res.output


@pytest.mark.gpu
def test_live_engine_on_cuda_bf16():
    """On CUDA in bfloat16 a small mixed workload runs end to end with every token produced."""
    spec = get_model("tiny")
    gpu_net = load_model(spec, dtype=torch.bfloat16, device="cuda", seed=0)
    blocks = BlockManager(256, 16)
    runner = ModelRunner(gpu_net, blocks, seed=1)
    requests = SyntheticWorkload(rate=200.0, num_requests=16, prompt_dist="uniform:8:200",
                                 output_dist="uniform:1:32", seed=5).generate()
    result = LiveEngine(runner, make_policy(SchedulerConfig("chunked", token_budget=64), blocks)).run(requests)
    assert all(r.num_generated == r.output_tokens for r in result.requests)
    assert all(s > 0 for _, s in result.step_log)


@pytest.mark.gpu
def test_cuda_float32_logits_match_cpu():
    """The same weights give the same logits on CUDA as on CPU (float32), prefill and decode."""
    from sim.batch import Batch, ScheduledSeq

    spec = get_model("tiny")
    cpu_net = load_model(spec, seed=0)
    gpu_net = load_model(spec, cpu_net.hf_state_dict(), device="cuda")
    logits = []
    for net in (cpu_net, gpu_net):
        runner = ModelRunner(net, BlockManager(64, 16), seed=2)
        a, b = Request(0, 0.0, 50, 2), Request(1, 0.0, 33, 2)
        runner.blocks.allocate(a, 50)
        runner.blocks.allocate(b, 34)
        runner.execute(Batch([ScheduledSeq(b, 0, 33)], block_size=16))
        b.num_computed_tokens, b.num_generated = 33, 1
        out = runner.forward_logits(Batch([ScheduledSeq(a, 0, 50), ScheduledSeq(b, 33, 1)], block_size=16))
        logits.append(torch.cat([out[0], out[1]]))
    assert torch.allclose(logits[0], logits[1], atol=1e-3)
