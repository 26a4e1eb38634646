"""Model shapes: presets against published parameter counts, config.json parsing, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from experiments.cli import main
from sim.hf_config import ModelConfigError, load_hf_config
from sim.models import MODELS, get_model

CONFIGS = Path(__file__).parent / "data" / "hf-configs"

# Published totals: the safetensors index of each checkpoint (Llama) or the vendor's own figure
# (model card or paper), as named in sim/models.py.
PUBLISHED_PARAMS = {
    "llama-2-70b": 68_976_648_192,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405.85e9,
    "mixtral-8x7b": 46.7e9,
    "qwen3-32b": 32.8e9,
    "qwen3-30b-a3b": 30.5e9,
    "deepseek-v3": 671e9,
    "llama-3.1-8b": 8_030_261_248,
}
# Published active parameters per token, given to two or three figures (Qwen3-30B-A3B's 3.35 B
# is published as 3.3 B), so checked to 2%.
PUBLISHED_ACTIVE = {"mixtral-8x7b": 12.9e9, "qwen3-30b-a3b": 3.3e9}
# 2 (K, V) x layers x kv_heads x head_dim x 2 bytes; DeepSeek-V3: layers x (512 + 64) x 2.
KV_BYTES_BF16 = {
    "llama-2-70b": 2 * 80 * 8 * 128 * 2,
    "llama-3.1-70b": 2 * 80 * 8 * 128 * 2,
    "llama-3.1-405b": 2 * 126 * 8 * 128 * 2,
    "mixtral-8x7b": 2 * 32 * 8 * 128 * 2,
    "qwen3-32b": 2 * 64 * 8 * 128 * 2,
    "qwen3-30b-a3b": 2 * 48 * 4 * 128 * 2,
    "deepseek-v3": 61 * (512 + 64) * 2,
}
# config.json file -> the preset it describes
CONFIG_PRESETS = {
    "llama-2-70b.json": "llama-2-70b", "llama-3.1-8b.json": "llama-3.1-8b", "qwen2.5-7b.json": "qwen2.5-7b",
    "qwen3-32b.json": "qwen3-32b", "mixtral-8x7b.json": "mixtral-8x7b", "qwen3-30b-a3b.json": "qwen3-30b-a3b",
    "deepseek-v3.json": "deepseek-v3",
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_within_half_a_percent_of_published(name):
    """Every large preset's parameter count is within 0.5% of the published one."""
    assert get_model(name).num_params == pytest.approx(PUBLISHED_PARAMS[name], rel=0.005)


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACTIVE))
def test_active_parameters_match_published(name):
    """MoE presets use as many parameters per token as their makers publish (to its rounding)."""
    assert get_model(name).active_params == pytest.approx(PUBLISHED_ACTIVE[name], rel=0.02)


def test_deepseek_v3_activated_parameters():
    """DeepSeek-V3 activates 37 B parameters per token (its report counts the LM head, not the embedding lookup)."""
    assert get_model("deepseek-v3").matmul_params == pytest.approx(37e9, rel=0.02)


@pytest.mark.parametrize("name", sorted(KV_BYTES_BF16))
def test_kv_bytes_per_token_exact(name):
    """KV bytes per token are exactly the cache layout's (MLA: latent plus RoPE key)."""
    assert get_model(name).kv_bytes_per_token("bfloat16") == KV_BYTES_BF16[name]


@pytest.mark.parametrize("file", sorted(CONFIG_PRESETS))
def test_config_json_gives_the_preset(file):
    """A published config.json gives the preset's parameters, active parameters and KV bytes."""
    spec, preset = load_hf_config(CONFIGS / file), MODELS[CONFIG_PRESETS[file]]
    assert (spec.num_params, spec.active_params, spec.kv_bytes_per_token()) == (
        preset.num_params, preset.active_params, preset.kv_bytes_per_token())
    assert (spec.family, spec.head_dim, spec.tie_embeddings, spec.moe, spec.mla) == (
        preset.family, preset.head_dim, preset.tie_embeddings, preset.moe, preset.mla)


def test_deepseek_v2_lite_shared_experts_and_dense_first_layer():
    """DeepSeek-V2-Lite: 2 shared experts, 1 dense layer, direct queries; 15.7 B parameters, 2.4 B activated."""
    spec = load_hf_config(CONFIGS / "deepseek-v2-lite.json")
    assert spec.moe is not None and spec.mla is not None
    assert (spec.moe.shared_intermediate_size, spec.moe.dense_layers, spec.mla.q_lora_rank) == (2 * 1408, 1, None)
    assert spec.num_params == pytest.approx(15.7e9, rel=0.005)
    assert spec.matmul_params == pytest.approx(2.4e9, rel=0.03)  # published to two figures
    assert spec.kv_bytes_per_token() == 27 * (512 + 64) * 2


def test_sliding_window_and_explicit_head_dim():
    """Mistral-7B-v0.1's window is read; Qwen2.5's unused window is not; Qwen3's explicit head_dim is kept."""
    assert load_hf_config(CONFIGS / "mistral-7b-v0.1.json").sliding_window == 4096
    assert load_hf_config(CONFIGS / "qwen2.5-7b.json").sliding_window is None
    qwen3 = load_hf_config(CONFIGS / "qwen3-32b.json")
    assert qwen3.head_dim == 128 and qwen3.head_dim * qwen3.num_heads != qwen3.hidden_size


def test_checkpoint_directory_and_get_model(tmp_path):
    """A directory holding config.json loads like the file; get_model takes either path."""
    (tmp_path / "config.json").write_text((CONFIGS / "mixtral-8x7b.json").read_text())
    assert get_model(str(tmp_path)).num_params == MODELS["mixtral-8x7b"].num_params


def test_experts_touched_by_a_batch():
    """One token touches its k experts; a large batch touches nearly all of them."""
    m = MODELS["mixtral-8x7b"]
    assert m.experts_touched(1) == pytest.approx(2)
    assert m.experts_touched(256) == pytest.approx(8)
    assert MODELS["llama-2-70b"].experts_touched(100) == 0


def _edited(tmp_path: Path, **changes) -> Path:
    data = json.loads((CONFIGS / "llama-3.1-8b.json").read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k)
        else:
            data[k] = v
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_hidden_layers": None}, "field 'num_hidden_layers' is missing"),
    ({"hidden_size": "4096"}, "field 'hidden_size' must be an integer"),
    ({"model_type": "gemma2"}, "field 'model_type' is 'gemma2'; supported: llama"),
    ({"model_type": None}, "field 'model_type' is missing"),
    ({"num_key_value_heads": 5}, "field 'num_key_value_heads' 5 does not divide"),
    ({"hidden_act": "gelu"}, "field 'hidden_act' is 'gelu'"),
    ({"attention_bias": True}, "field 'attention_bias' is True"),
    ({"mlp_bias": True}, "field 'mlp_bias' is True"),
])
def test_config_errors_name_the_field(tmp_path, changes, message):
    """A config the code does not understand is an error naming the file and the field."""
    path = _edited(tmp_path, **changes)
    with pytest.raises(ModelConfigError, match=message) as e:
        load_hf_config(path)
    assert str(path) in str(e.value)


def test_unreadable_and_invalid_json(tmp_path):
    """A missing file and broken JSON are errors naming the file (and the line)."""
    with pytest.raises(ModelConfigError, match="cannot read"):
        load_hf_config(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{\n"model_type": "llama",,\n}')
    with pytest.raises(ModelConfigError, match=r"bad\.json:2: not valid JSON"):
        load_hf_config(bad)


def test_multimodal_config_is_refused(tmp_path):
    """A config with only a text_config asks for the language model's config."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "text_config": {"model_type": "llama"}}))
    with pytest.raises(ModelConfigError, match="field 'text_config'"):
        load_hf_config(path)


def test_unknown_model_name_lists_presets():
    """A name that is neither a preset nor a path lists the presets."""
    with pytest.raises(ValueError, match=r"known: tiny, .*qwen3-30b-a3b"):
        get_model("llama-9")


def test_models_command_on_a_config_json():
    """`servesim models PATH` prints total and active parameters and KV bytes per token."""
    res = CliRunner().invoke(main, ["models", str(CONFIGS / "qwen3-30b-a3b.json")])
    assert res.exit_code == 0, res.output
    assert "30.532 B (30,532,122,624)" in res.output
    assert "3.353 B per token" in res.output
    assert "98,304" in res.output and "8 of 128 routed" in res.output


def test_models_command_bad_config_is_a_clear_error(tmp_path):
    """`servesim models` on a bad config exits 2 with the field named, no traceback."""
    path = _edited(tmp_path, vocab_size=None)
    res = CliRunner().invoke(main, ["models", str(path)])
    assert res.exit_code == 2 and "field 'vocab_size' is missing" in res.output
    assert "Traceback" not in res.output
