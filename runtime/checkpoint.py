"""A random-initialised Hugging Face checkpoint of a preset, written to disk.

Other engines (vLLM, SGLang, transformers) load models only from a checkpoint directory, and
this machine cannot download one; timing does not depend on weight values, so a checkpoint
of random weights lets those engines serve the very network servesim's runtime runs. The
directory holds what transformers' ``save_pretrained`` would write for the model plus a
tokenizer, so ``AutoModelForCausalLM.from_pretrained`` and ``vllm serve DIR`` read it as is:

- ``config.json``: :func:`runtime.model.hf_config` of the preset, with ``architectures``,
  ``dtype`` and the tokenizer's BOS/EOS ids;
- ``model.safetensors``: :func:`runtime.weights.random_state_dict` (transformers' own
  initialisation, drawn from ``seed``), under transformers' parameter names; a tied LM head
  is not stored (transformers ties it on load);
- ``tokenizer.json`` and ``tokenizer_config.json``: a word-level tokenizer over ``t0 .. tN``
  (:func:`runtime.tokenizer.write_wordlevel_tokenizer`), one token per word, so that a client
  and a server count tokens alike.
"""

from __future__ import annotations

from pathlib import Path

from sim.models import RUNTIME_FAMILIES, ModelSpec

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (unknown family, directory in the way)."""


def write_checkpoint(spec: ModelSpec, out_dir: str | Path, seed: int = 0, dtype: str = "bfloat16",
                     overwrite: bool = False) -> Path:
    """Write ``spec`` with random weights (``seed``) in ``dtype`` as a Hugging Face checkpoint
    in ``out_dir`` (created); returns the directory. Refuses a directory that already holds one
    of :data:`CHECKPOINT_FILES` unless ``overwrite``."""
    import torch
    from safetensors.torch import save_file

    from runtime.model import hf_config
    from runtime.tokenizer import WORDLEVEL_SPECIALS, write_wordlevel_tokenizer
    from runtime.weights import DTYPES, random_state_dict

    if spec.family not in RUNTIME_FAMILIES:
        raise CheckpointError(f"{spec.name}: family {spec.family!r} has no checkpoint writer; "
                              f"known: {', '.join(RUNTIME_FAMILIES)}")
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    present = [name for name in CHECKPOINT_FILES if (out / name).exists()]
    if present and not overwrite:
        raise CheckpointError(f"{out}: already holds {', '.join(present)} (overwrite to replace)")
    config = hf_config(spec)
    config.architectures = [ARCHITECTURES[spec.family]]
    config.dtype = dtype
    # The word-level tokenizer's <s> and </s>; a client that stops at EOS sees the same id.
    config.bos_token_id = WORDLEVEL_SPECIALS.index("<s>")
    config.eos_token_id = WORDLEVEL_SPECIALS.index("</s>")
    # Drawn in float32 and cast, so that every dtype gets the same weights from a seed.
    state = {name: t.to(DTYPES[dtype]).contiguous()
             for name, t in random_state_dict(spec, seed, torch.float32).items()}
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    # "format": "pt" is what transformers writes and what its loader checks for.
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    write_wordlevel_tokenizer(out, spec.vocab_size, model_max_length=spec.max_position)
    return out
