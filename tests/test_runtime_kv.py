"""The paged KV pool: sizes by formula, shared with the block manager, swap copies real data."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from runtime.kvcache import KVCache, blocks_from_memory, kv_bytes_per_token  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.weights import load_model  # noqa: E402
from sim.kv import BlockManager  # noqa: E402
from sim.models import MODELS, RUNTIME_FAMILIES, get_model  # noqa: E402
from sim.request import Request  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m.family in RUNTIME_FAMILIES])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_kv_bytes_per_token_is_the_formula(name, dtype):
    """2 x layers x kv_heads x head_dim x dtype bytes, as the simulator's ModelSpec counts it."""
    spec = MODELS[name]
    size = DTYPES[dtype].itemsize
    assert kv_bytes_per_token(spec, DTYPES[dtype]) == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * size
    assert kv_bytes_per_token(spec, DTYPES[dtype]) == spec.kv_bytes_per_token(dtype)


def test_qwen_half_a_billion_bf16_is_12288_bytes_per_token():
    """The published figure: 24 layers x 2 KV heads x 64 dims x 2 (K, V) x 2 bytes."""
    assert kv_bytes_per_token(get_model("qwen2.5-0.5b"), torch.bfloat16) == 12_288


def test_pool_matches_block_manager_and_its_property():
    """The runner allocates exactly the BlockManager's device and host blocks, of its block size."""
    spec = get_model("tiny")
    blocks = BlockManager(num_blocks=37, block_size=8, num_host_blocks=5)
    runner = ModelRunner(load_model(spec), blocks)
    cache = runner.cache
    assert cache.pool.shape == (spec.num_layers, 2, spec.num_kv_heads, 37, 8, spec.head_dim)
    assert cache.host.shape == (spec.num_layers, 2, spec.num_kv_heads, 5, 8, spec.head_dim)
    assert cache.host.device.type == "cpu"
    assert cache.kv_bytes_per_token == spec.kv_bytes_per_token("float32")
    assert cache.device_bytes == 37 * 8 * cache.kv_bytes_per_token
    assert len(cache.layers) == spec.num_layers
    assert cache.layers[1].data_ptr() == cache.pool[1].data_ptr()


def test_swap_out_then_in_restores_blocks_elsewhere():
    """Swap copies every layer's K and V of each block to host memory and back into new ids."""
    spec = get_model("tiny")
    cache = KVCache(spec, num_blocks=6, block_size=4, num_host_blocks=3)
    cache.pool.copy_(torch.randn_like(cache.pool))
    before = cache.pool[:, :, :, [1, 4]].clone()
    cache.swap_out([(1, 2), (4, 0)])
    cache.pool[:, :, :, [1, 4]] = 0
    cache.swap_in([(2, 5), (0, 3)])
    assert torch.equal(cache.pool[:, :, :, [5, 3]], before)


def test_swap_preemption_moves_real_cache_through_the_runner():
    """A request swapped out and back by BlockManager ids keeps its KV bit for bit."""
    spec = get_model("tiny")
    blocks = BlockManager(num_blocks=8, block_size=4, num_host_blocks=8)
    runner = ModelRunner(load_model(spec), blocks)
    r = Request(0, 0.0, prompt_tokens=10, output_tokens=2)
    blocks.allocate(r, 10)
    from sim.batch import Batch, ScheduledSeq

    runner.execute(Batch([ScheduledSeq(r, 0, 10)], block_size=4))
    kv = runner.cache.pool[:, :, :, blocks.tables[0]].clone()
    out = blocks.swap_out(r)
    runner.execute(Batch([], swap_out_blocks=out, block_size=4))
    runner.cache.pool.zero_()
    other = Request(1, 0.0, prompt_tokens=4, output_tokens=1)
    blocks.allocate(other, 4)  # the freed ids go to someone else first
    back = blocks.swap_in(r)
    runner.execute(Batch([], swap_in_blocks=back, block_size=4))
    assert blocks.tables[0] != [d for d, _ in out]
    assert torch.equal(runner.cache.pool[:, :, :, blocks.tables[0]], kv)


def test_blocks_from_memory_refuses_cpu():
    """Sizing from free memory is for CUDA; on CPU the number of blocks is given."""
    with pytest.raises(ValueError, match="CUDA"):
        blocks_from_memory(get_model("tiny"), 16, torch.float32, "cpu")


@pytest.mark.gpu
def test_blocks_from_memory_on_cuda_leaves_room():
    """On CUDA the pool sized from free memory fits and is allocated."""
    spec = get_model("tiny")
    net = load_model(spec, dtype=torch.bfloat16, device="cuda")
    n = blocks_from_memory(spec, 16, torch.bfloat16, "cuda", utilization=0.05)
    assert n > 0
    runner = ModelRunner(net, BlockManager(n, 16))
    assert runner.cache.pool.shape[2] == n and runner.cache.pool.is_cuda
    del runner
    torch.cuda.empty_cache()
