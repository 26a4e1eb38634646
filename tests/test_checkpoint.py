"""`servesim checkpoint write`: a preset as a Hugging Face checkpoint that transformers and our
runtime both load, with the same logits."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from experiments.cli import main  # noqa: E402
from runtime.checkpoint import CheckpointError, write_checkpoint  # noqa: E402
from runtime.runner import ModelRunner  # noqa: E402
from runtime.tokenizer import HFTokenizer  # noqa: E402
from runtime.weights import load_checkpoint, load_model  # noqa: E402
from sim.batch import Batch, ScheduledSeq  # noqa: E402
from sim.kv import BlockManager  # noqa: E402
from sim.models import get_model  # noqa: E402
from sim.request import Request  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ATOL = 1e-4


def runtime_logits(net, ids: list[int]) -> torch.Tensor:
    """Our network's logits of every token of ``ids`` (one whole-prompt prefill through the paged cache)."""
    runner = ModelRunner(net, BlockManager(16, 16), seed=0)
    r = Request(0, 0.0, prompt_tokens=len(ids), output_tokens=1)
    runner.set_prompt(r.id, ids)
    runner.blocks.allocate(r, len(ids))
    return runner.forward_logits(Batch([ScheduledSeq(r, 0, len(ids))], block_size=16))[r.id]


def test_tiny_checkpoint_loads_in_transformers_and_runtime_alike(tmp_path):
    """transformers' from_pretrained and our load_checkpoint read the same weights: logits agree."""
    from transformers import AutoModelForCausalLM

    spec = get_model("tiny")
    out = write_checkpoint(spec, tmp_path / "ckpt", seed=3, dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="sdpa").eval()
    ours = load_model(spec, load_checkpoint(out))
    ids = [int(i) for i in torch.randint(0, spec.vocab_size, (37,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
    assert torch.allclose(runtime_logits(ours, ids), expected, atol=ATOL)
    # The same seed is the runtime's own random network: a served checkpoint is what we time.
    assert torch.allclose(runtime_logits(load_model(spec, seed=3), ids), expected, atol=ATOL)


def test_checkpoint_files_and_tokenizer(tmp_path):
    """config.json names the architecture, dtype and EOS; the tokenizer has the model's vocabulary."""
    spec = get_model("tiny")
    out = write_checkpoint(spec, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["num_key_value_heads"], config["vocab_size"]) == (4, 2, 4096)
    state = load_checkpoint(out)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    tok = HFTokenizer(out)
    assert tok.vocab_size == spec.vocab_size and tok.eos_token_id == config["eos_token_id"]
    assert tok.encode("t5 t4095 t17") == [5, 4095, 17]
    assert get_model(str(out)).num_params == spec.num_params


def test_tied_small_preset_stores_no_lm_head(tmp_path):
    """The small preset's checkpoint holds its 100 M parameters once (LM head tied to the embedding)."""
    spec = get_model("small")
    assert 95e6 < spec.num_params < 105e6
    out = write_checkpoint(spec, tmp_path / "small", dtype="bfloat16")
    state = load_checkpoint(out)
    assert "lm_head.weight" not in state
    assert sum(t.numel() for t in state.values()) == spec.num_params
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_cli_writes_and_refuses_to_overwrite(tmp_path):
    """The CLI writes a checkpoint, refuses to overwrite it without --force, and names bad models."""
    out = tmp_path / "ckpt"
    runner = CliRunner()
    result = runner.invoke(main, ["checkpoint", "write", "--model", "tiny", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "tiny" in result.output and (out / "model.safetensors").exists()
    again = runner.invoke(main, ["checkpoint", "write", "--model", "tiny", "-o", str(out)])
    assert again.exit_code == 1 and "already holds config.json" in again.output and "--force" in again.output
    assert runner.invoke(main, ["checkpoint", "write", "--model", "tiny", "--force", "-o", str(out)]).exit_code == 0
    moe = runner.invoke(main, ["checkpoint", "write", "--model", "mixtral-8x7b", "-o", str(tmp_path / "m")])
    assert moe.exit_code == 1 and "no checkpoint writer" in moe.output and "Traceback" not in moe.output
    unknown = runner.invoke(main, ["checkpoint", "write", "--model", "nope", "-o", str(tmp_path / "n")])
    assert unknown.exit_code == 1 and "unknown model 'nope'" in unknown.output


def test_library_refuses_existing_checkpoint(tmp_path):
    """write_checkpoint raises CheckpointError for a directory that already holds one."""
    write_checkpoint(get_model("tiny"), tmp_path)
    with pytest.raises(CheckpointError, match="already holds"):
        write_checkpoint(get_model("tiny"), tmp_path)
