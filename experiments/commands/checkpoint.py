"""``servesim checkpoint write``: a preset as a random-initialised Hugging Face checkpoint, for
engines that load models only from disk (vLLM, SGLang, transformers)."""

from __future__ import annotations

from pathlib import Path

import click

from sim.models import MODELS, RUNTIME_FAMILIES, get_model


@click.group("checkpoint", help="Write model presets as Hugging Face checkpoints.")
def checkpoint() -> None:
    pass


BUILT = [name for name, m in MODELS.items() if m.family in RUNTIME_FAMILIES]


@checkpoint.command("write")
@click.option("--model", required=True, metavar="NAME|PATH",
              help=f"A preset of a family the runtime builds ({', '.join(BUILT)}) or a config.json.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default="bfloat16", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True,
              help="The random weights (the runtime's own weights for the same seed).")
@click.option("--force", is_flag=True, help="Replace a checkpoint already in the directory.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write (created).")
def write(model: str, dtype: str, seed: int, force: bool, output: Path) -> None:
    """Write config.json, model.safetensors (random weights) and a word-level tokenizer.

    \b
      servesim checkpoint write --model small -o ckpt/small
      vllm serve ckpt/small --served-model-name small      # elsewhere, with vLLM installed
      servesim run --model small --weights ckpt/small ...  # the same weights in our runtime
    """
    try:
        from runtime.checkpoint import CHECKPOINT_FILES, CheckpointError, write_checkpoint
    except ImportError as e:
        raise click.ClickException(f"writing a checkpoint needs the runtime extras (pip install '.[runtime]'): {e}"
                                   ) from None
    present = [name for name in CHECKPOINT_FILES if (output / name).exists()]
    if present and not force:
        raise click.ClickException(f"{output}: already holds {', '.join(present)} (--force replaces it)")
    try:
        spec = get_model(model)
        out = write_checkpoint(spec, output, seed=seed, dtype=dtype, overwrite=force)
    except (ValueError, CheckpointError) as e:
        raise click.ClickException(str(e)) from None
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    click.echo(f"wrote {out}: {spec.name}, {spec.num_params / 1e6:.1f} M parameters, {dtype}, seed {seed} "
               f"({size_mb:.0f} MB of weights), tokenizer of {spec.vocab_size} words")
