"""Greedy outputs do not depend on how a request was scheduled: alone, batched, chunked,
recomputed or swapped (float32, CPU), and they equal transformers' generate."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime.engine import LiveEngine  # noqa: E402
from runtime.hf_static import HFStaticEngine  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.weights import build_hf_model  # noqa: E402
from sim.kv import BlockManager  # noqa: E402
from sim.models import get_model  # noqa: E402
from sim.policies import SchedulerConfig, make_policy  # noqa: E402
from sim.request import Request, Status  # noqa: E402
from tests.checks import CheckedPolicy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEED = 7
LENGTHS = [(30, 12), (5, 20), (70, 8), (17, 15), (40, 10), (3, 25), (52, 6), (9, 18)]


def requests() -> list[Request]:
    # All arrive at t = 0, so what the policy schedules does not depend on the machine's speed.
    return [Request(i, 0.0, p, o) for i, (p, o) in enumerate(LENGTHS)]


def serve(net, config: SchedulerConfig, num_blocks: int = 256, host_blocks: int = 0, block_size: int = 4,
          min_split_blocks: int | None = None):
    blocks = BlockManager(num_blocks, block_size, host_blocks)
    runner = ModelRunner(net, blocks, seed=SEED)
    if min_split_blocks is not None:
        runner.min_split_blocks = min_split_blocks
    policy = CheckedPolicy(make_policy(config, blocks), config.token_budget)
    result = LiveEngine(runner, policy).run(requests())
    for r in result.requests:
        assert r.status is Status.FINISHED
        assert len(result.outputs[r.id]) == r.output_tokens == r.num_generated
    assert blocks.num_used == 0 and blocks.num_host_used == 0
    return result


@pytest.fixture(scope="module")
def alone(net) -> dict[int, list[int]]:
    """Each request served by itself."""
    out: dict[int, list[int]] = {}
    for r in requests():
        blocks = BlockManager(256, 4)
        runner = ModelRunner(net, blocks, seed=SEED)
        out.update(LiveEngine(runner, make_policy(SchedulerConfig("continuous"), blocks)).run([r]).outputs)
    return out


def test_outputs_are_not_degenerate(alone):
    """Sanity: the greedy outputs of different requests differ (the comparisons below mean something)."""
    assert len({tuple(o) for o in alone.values()}) == len(LENGTHS)


@pytest.mark.parametrize("config", [
    SchedulerConfig("continuous"),
    SchedulerConfig("continuous", max_num_seqs=3),
    SchedulerConfig("chunked", token_budget=8),
    SchedulerConfig("chunked", token_budget=33),
    SchedulerConfig("static", batch_size=3, max_wait_s=0.0, preempt="off"),
], ids=["continuous", "continuous-3-seqs", "chunked-8", "chunked-33", "static"])
def test_batched_outputs_equal_alone(net, alone, config):
    """Continuous batching, chunked prefill and static batches give every request its solo tokens."""
    assert serve(net, config).outputs == alone


def test_decodes_split_into_length_groups_keep_outputs(net, alone):
    """Decodes attending in several padded-length groups give the same tokens as one group."""
    assert serve(net, SchedulerConfig("continuous"), min_split_blocks=1).outputs == alone


@pytest.mark.parametrize("widths,min_saving,groups", [
    ([], 1, []),
    ([5], 1, [(0, 1)]),
    ([4, 4, 4, 4], 1, [(0, 4)]),  # equal lengths: nothing to save
    ([1, 1, 1, 40], 10, [(0, 3), (3, 4)]),
    ([1, 1, 1, 40], 200, [(0, 4)]),  # the saving (117 blocks) does not pay for a call
    ([1, 2, 3, 4, 5, 6, 7, 8], 1, [(0, 2), (2, 4), (4, 6), (6, 8)]),  # at most two levels deep
])
def test_split_decodes_groups(widths, min_saving, groups):
    """Sorted decode widths split where padding saved pays for another attention call."""
    from runtime.runner import split_decodes

    assert split_decodes(widths, min_saving) == groups


@pytest.mark.parametrize("policy,budget", [("continuous", None), ("chunked", 16)])
def test_recompute_preemption_keeps_outputs(net, alone, policy, budget):
    """A request preempted by recompute re-prefills prompt + its real outputs and goes on identically."""
    result = serve(net, SchedulerConfig(policy, token_budget=budget, preempt="recompute"), num_blocks=24)
    assert result.num_preemptions > 0
    assert result.outputs == alone


@pytest.mark.parametrize("policy,budget", [("continuous", None), ("chunked", 16)])
def test_swap_preemption_keeps_outputs(net, alone, policy, budget):
    """A request swapped to host memory and back continues from its copied cache identically."""
    result = serve(net, SchedulerConfig(policy, token_budget=budget, preempt="swap"), num_blocks=24, host_blocks=64)
    assert result.num_preemptions > 0
    assert sum(s.swap_out_tokens for s, _ in result.step_log) > 0
    assert sum(s.swap_in_tokens for s, _ in result.step_log) > 0
    assert result.outputs == alone


def test_transformers_generate_gives_the_same_tokens(net, alone):
    """The hf-static reference (left-padded batches on transformers' generate) agrees token for token."""
    hf = build_hf_model(get_model("tiny"), net.hf_state_dict())
    result = HFStaticEngine(hf, batch_size=3, max_wait_s=0.0, seed=SEED).run(requests())
    assert result.outputs == alone
    assert all(r.status is Status.FINISHED and r.num_generated == r.output_tokens for r in result.requests)
