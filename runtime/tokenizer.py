"""Text <-> token ids for ``servesim serve``: a Hugging Face tokenizer on disk, or bytes.

A served model has random weights (or a checkpoint's), so its output text means nothing; the
tokenizer only has to turn any client's text into ids of the right count and back. Two kinds:

- :class:`ByteTokenizer` - the fallback: a prompt's UTF-8 bytes are its ids (0..255), and an
  id decodes to the byte ``id % 256`` (invalid UTF-8 shows as U+FFFD). No EOS: outputs run to
  ``max_tokens``.
- :class:`HFTokenizer` - a tokenizer directory (``tokenizer.json`` and friends) read with
  transformers, offline; its EOS ends a request unless the client sends ``ignore_eos``.

:func:`write_wordlevel_tokenizer` writes a small word-level tokenizer (``t0 t1 ...``) that vLLM
and its benchmark client load as well, so that both sides of a comparison count tokens alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

WORDLEVEL_SPECIALS = ("<unk>", "<s>", "</s>")


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int:
        """Ids are 0..vocab_size-1."""
        ...

    @property
    def eos_token_id(self) -> int | None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids: every text is valid, one token per byte."""

    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i % 256 for i in ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer directory, loaded offline (nothing is downloaded)."""

    def __init__(self, path: str | Path) -> None:
        from transformers import AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"tokenizer {path}: not a directory")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(f"tokenizer {path}: cannot load ({e})") from None
        self.path = path

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids))


def load_tokenizer(path: str | Path | None) -> Tokenizer:
    """The tokenizer in directory ``path``, or the byte-level fallback for ``None``."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


def write_wordlevel_tokenizer(out_dir: str | Path, vocab_size: int, model_max_length: int = 4096) -> Path:
    """A whitespace word-level tokenizer over ``<unk> <s> </s> t3 ... t{vocab_size-1}``, as
    ``tokenizer.json`` plus ``tokenizer_config.json`` in ``out_dir`` (created). EOS is ``</s>``."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    if vocab_size <= len(WORDLEVEL_SPECIALS):
        raise ValueError(f"vocab_size must be > {len(WORDLEVEL_SPECIALS)}, got {vocab_size}")
    vocab = {t: i for i, t in enumerate(WORDLEVEL_SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(WORDLEVEL_SPECIALS), vocab_size)})
    tok = RawTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>", "bos_token": "<s>",
              "eos_token": "</s>", "model_max_length": model_max_length, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
