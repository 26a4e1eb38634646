"""The runtime network against transformers' own forward: same weights, same logits."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from runtime.model import Linear, default_pad_rows, hf_config  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.weights import build_hf_model, hf_param_shapes, load_model, random_state_dict  # noqa: E402
from sim.batch import Batch, ScheduledSeq  # noqa: E402
from sim.kv import BlockManager  # noqa: E402
from sim.models import MODELS, RUNTIME_FAMILIES, ModelSpec  # noqa: E402
from sim.request import Request  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPECS = {
    "llama": ModelSpec("t-llama", "llama", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                       intermediate_size=96, vocab_size=512, max_position=256, rope_theta=500000.0,
                       rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
    "qwen2": ModelSpec("t-qwen2", "qwen2", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=1, head_dim=16,
                       intermediate_size=96, vocab_size=512, max_position=256, rope_theta=1000000.0,
                       rms_norm_eps=1e-6, tie_embeddings=True, qkv_bias=True),
    "mistral": ModelSpec("t-mistral", "mistral", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                         head_dim=16, intermediate_size=96, vocab_size=512, max_position=256, rope_theta=10000.0,
                         rms_norm_eps=1e-5, tie_embeddings=False, qkv_bias=False),
}
ATOL = 1e-4


def transformers_model(spec: ModelSpec):
    """transformers' *ForCausalLM with its own random init, biases and norms perturbed so they matter."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config(spec), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def prefill_logits(runner: ModelRunner, request: Request, chunks: list[int]) -> torch.Tensor:
    """Logits of every prompt token, computed through the paged cache in the given chunk sizes."""
    runner.blocks.allocate(request, request.prompt_tokens)
    out, start = [], 0
    for n in chunks:
        batch = Batch([ScheduledSeq(request, start, n)], block_size=runner.block_size)
        out.append(runner.forward_logits(batch)[request.id])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("family", list(SPECS))
def test_logits_match_transformers(family):
    """Whole-prompt prefill gives transformers' logits (float32), weights copied by HF name."""
    spec = SPECS[family]
    hf = transformers_model(spec)
    net = load_model(spec, {k: v.clone() for k, v in hf.state_dict().items()})
    runner = ModelRunner(net, BlockManager(32, 4), seed=1)
    r = Request(0, 0.0, prompt_tokens=45, output_tokens=1)
    ids = runner.token_ids(r)
    expected = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(prefill_logits(runner, r, [45]), expected, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_chunked_prefill_and_decode_logits_match(family):
    """Chunks at nonzero offsets and a single-token step read the cache and still match."""
    spec = SPECS[family]
    hf = transformers_model(spec)
    net = load_model(spec, hf.state_dict())
    runner = ModelRunner(net, BlockManager(32, 4), seed=2)
    r = Request(0, 0.0, prompt_tokens=45, output_tokens=1)
    expected = hf(torch.tensor([runner.token_ids(r)])).logits[0]
    assert torch.allclose(prefill_logits(runner, r, [7, 1, 30, 6, 1]), expected, atol=ATOL)


def test_checkpoint_directory_round_trip(tmp_path):
    """A save_pretrained directory loads through --weights PATH and gives the same logits."""
    spec = SPECS["qwen2"]
    hf = transformers_model(spec)
    hf.save_pretrained(tmp_path)
    net = load_model(spec, tmp_path)
    runner = ModelRunner(net, BlockManager(32, 4))
    r = Request(3, 0.0, prompt_tokens=20, output_tokens=1)
    expected = hf(torch.tensor([runner.token_ids(r)])).logits[0]
    assert torch.allclose(prefill_logits(runner, r, [20]), expected, atol=ATOL)


def test_state_dict_round_trip_and_shape_errors():
    """hf_state_dict gives back what was loaded; a wrong or missing tensor is named in the error."""
    spec = SPECS["llama"]
    state = random_state_dict(spec, seed=5)
    net = load_model(spec, state)
    back = net.hf_state_dict()
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    bad = dict(state)
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="up_proj"):
        load_model(spec, bad)
    del bad["model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing"):
        load_model(spec, bad)


def test_random_weights_deterministic_and_hf_initialised():
    """Random weights depend only on the seed; matrices ~N(0, 0.02), norms 1, biases 0."""
    spec = SPECS["qwen2"]
    a, b = random_state_dict(spec, seed=9), random_state_dict(spec, seed=9)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], random_state_dict(spec, 10)["model.embed_tokens.weight"])
    assert abs(a["model.embed_tokens.weight"].std().item() - 0.02) < 0.002
    assert torch.all(a["model.norm.weight"] == 1)
    assert torch.all(a["model.layers.0.self_attn.q_proj.bias"] == 0)


def test_transformers_model_built_from_our_weights():
    """build_hf_model puts our random weights into transformers' model: same logits."""
    spec = SPECS["llama"]
    net = load_model(spec, seed=4)
    hf = build_hf_model(spec, net.hf_state_dict())
    runner = ModelRunner(net, BlockManager(32, 4), seed=4)
    r = Request(0, 0.0, prompt_tokens=30, output_tokens=1)
    expected = hf(torch.tensor([runner.token_ids(r)])).logits[0]
    assert torch.allclose(prefill_logits(runner, r, [30]), expected, atol=ATOL)


@pytest.mark.parametrize("name", [n for n, m in MODELS.items() if m.family in RUNTIME_FAMILIES])
def test_hf_config_matches_every_preset(name):
    """hf_config describes each preset's shapes, and the parameter list matches the spec's count."""
    spec = MODELS[name]
    cfg = hf_config(spec)
    assert cfg.model_type == spec.family
    assert (cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) == (
        spec.num_layers, spec.num_kv_heads, spec.head_dim)
    assert cfg.rope_parameters["rope_theta"] == spec.rope_theta
    assert cfg.tie_word_embeddings == spec.tie_embeddings
    count = sum(int(torch.Size(s).numel()) for s in hf_param_shapes(spec).values())
    assert count == spec.num_params


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
def test_padded_linear_gives_each_row_its_own_product(rows):
    """A Linear padding 2 and 3 rows to 4 returns the same rows (within float rounding of
    another kernel) as without padding, for row counts around the padding."""
    torch.manual_seed(0)
    layer = Linear(48, 80, bias=True).requires_grad_(False)
    x = torch.randn(rows, 48)
    plain = layer(x)
    layer.pad_rows = {2: 4, 3: 4}
    padded = layer(x)
    assert padded.shape == (rows, 80)
    torch.testing.assert_close(padded, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)


def test_padding_set_where_it_pays_and_for_every_projection(monkeypatch):
    """float32 on a CPU pads 2 and 3 rows to 4 and 7-15 to 16 for a model with a large head
    (small), not for tiny, bfloat16 or CUDA; load_model sets it on every projection, the tied
    head included, and on the network (what calibration records); a mapping that does not pad
    is refused."""
    import runtime.model

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    small = {2: 4, 3: 4, 7: 16, 8: 16, 9: 16, 10: 16, 11: 16, 12: 16, 13: 16, 14: 16, 15: 16}
    assert default_pad_rows(MODELS["small"], cpu, torch.float32) == small
    assert default_pad_rows(MODELS["tiny"], cpu, torch.float32) == {}
    assert default_pad_rows(MODELS["small"], cpu, torch.bfloat16) == {}
    assert default_pad_rows(MODELS["small"], cuda, torch.float32) == {}
    assert all(m.pad_rows == {} for m in load_model(SPECS["qwen2"]).modules() if isinstance(m, Linear))
    monkeypatch.setattr(runtime.model, "PAD_MIN_HEAD_ELEMENTS", 0)  # as if the test model were large
    net = load_model(SPECS["qwen2"], dtype=torch.float32)
    projections = [m for m in net.modules() if isinstance(m, Linear)]
    assert len(projections) == 1 + 4 * SPECS["qwen2"].num_layers  # lm_head + qkv, o, gate_up, down per layer
    assert all(m.pad_rows == small for m in projections) and net.pad_rows == small
    net.pad_small_products({})
    assert all(m.pad_rows == {} for m in projections) and net.pad_rows == {}
    with pytest.raises(ValueError, match="pad_rows"):
        net.pad_small_products({4: 3})
