"""The grid of controlled steps that calibration times.

Three families, so that the fit sees each feature move on its own and together:

- prefill-only: chunk sizes x prior context lengths, one sequence; and several equal chunks
  in one step (the per-sequence cost of chunked prefill);
- decode-only: batch sizes x context lengths;
- mixed: a decode batch plus one prefill chunk (chunked prefill's typical step).

A decode batch's contexts are spread (:func:`spread_contexts`, from a eighth of the nominal
context up to it), as in a serving engine where sequences started at different times: the
runtime pads each decode group to its longest sequence, so a batch of identical contexts
would time the cheapest case and under-predict real mixed-length batches.

Bounds come from the model (no sequence longer than ``max_position``) and the KV pool (a
step's sequences must fit in it at once). Chunk sizes stop at ``max_step_tokens``, the largest
step a serving engine would schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from sim.kv import blocks_for


@dataclass(frozen=True)
class GridPoint:
    """One step to time: ``prefill`` is (chunk_tokens, context_tokens) per prefilling sequence,
    ``decode`` the context tokens of each decoding sequence."""

    prefill: tuple[tuple[int, int], ...] = ()
    decode: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.prefill and not self.decode:
            raise ValueError("a grid point needs at least one prefill chunk or one decode")
        for chunk, context in self.prefill:
            if chunk < 1 or context < 0:
                raise ValueError(f"prefill chunk must be >= 1 and context >= 0, got ({chunk}, {context})")
        if any(c < 1 for c in self.decode):
            raise ValueError(f"decode contexts must be >= 1, got {self.decode}")

    @property
    def kind(self) -> str:
        return "mixed" if self.prefill and self.decode else "prefill" if self.prefill else "decode"

    def seq_lengths(self) -> list[int]:
        """Tokens each sequence's cache holds after the step."""
        return [chunk + context for chunk, context in self.prefill] + [c + 1 for c in self.decode]

    def kv_blocks(self, block_size: int) -> int:
        return sum(blocks_for(n, block_size) for n in self.seq_lengths())

    def fits(self, max_len: int, num_blocks: int, block_size: int) -> bool:
        return max(self.seq_lengths()) <= max_len and self.kv_blocks(block_size) <= num_blocks

    def to_dict(self) -> dict[str, list]:
        """``{"prefill": [[chunk, context], ...], "decode": [context, ...]}``, as a profile keeps it."""
        return {"prefill": [list(p) for p in self.prefill], "decode": list(self.decode)}

    @classmethod
    def from_dict(cls, data: object) -> GridPoint:
        """The inverse of :meth:`to_dict`; ValueError naming what is wrong."""
        if not isinstance(data, dict) or set(data) - {"prefill", "decode"}:
            raise ValueError(f"a grid point is {{'prefill': [[chunk, context], ...], 'decode': [context, ...]}}, "
                             f"got {data!r}")
        prefill, decode = data.get("prefill", []), data.get("decode", [])

        def is_int(x: object) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not isinstance(prefill, list) or not all(isinstance(c, list) and len(c) == 2 and all(map(is_int, c))
                                                    for c in prefill):
            raise ValueError(f"a grid point's prefill is a list of [chunk, context] integer pairs, got {prefill!r}")
        if not isinstance(decode, list) or not all(map(is_int, decode)):
            raise ValueError(f"a grid point's decode is a list of integer contexts, got {decode!r}")
        return cls(prefill=tuple((c, ctx) for c, ctx in prefill), decode=tuple(decode))


def spread_contexts(context: int, batch: int) -> tuple[int, ...]:
    """``batch`` decode contexts spread evenly from ``context // 8`` to ``context`` (a single
    sequence: just ``context``)."""
    if batch == 1:
        return (context,)
    lo = max(1, context // 8)
    return tuple(lo + (context - lo) * j // (batch - 1) for j in range(batch))


def _geometric(lo: int, hi: int, factor: int) -> list[int]:
    values = []
    v = lo
    while v <= hi:
        values.append(v)
        v *= factor
    return values


def make_grid(max_len: int, num_blocks: int, block_size: int, quick: bool = False,
              max_step_tokens: int = 8192) -> list[GridPoint]:
    """The calibration grid, every point fitting ``max_len`` and a pool of ``num_blocks`` blocks.

    ``quick`` gives a coarse grid (50-65 points) for CPUs and tests; it is denser around
    10-100k tokens of total decode context, where a CPU's caches run out.
    """
    step_cap = min(max_step_tokens, max_len)
    if quick:
        chunks = [c for c in (16, 64, 256, 1024, 2048) if c <= step_cap]
        contexts = sorted({0, max_len // 4})
        multi = [(4, 32), (4, 128), (8, 64)]  # (sequences, chunk)
        batches = [1, 4, 16, 64]
        decode_contexts = sorted({32, max_len // 8, max_len // 2, max_len - 1})
        # (decode batch, decode context, chunk, chunk context)
        # a chunk with prior context only beside the shorter decodes: the four beside decodes at
        # half the positions took the small model ~10 s of a quick grid (the prefill family
        # already moves the chunk's context on its own)
        mixed = [(b, c, p, pc) for b in (4, 32) for c in (max_len // 8, max_len // 2) for p in (32, 256)
                 for pc in (0, max_len // 4) if pc == 0 or c == max_len // 8]
        # denser around the cache cliff: more batch sizes at moderate contexts, and mixed steps there
        dense_decode = [(b, c) for b in (8, 12, 32, 48, 96) for c in (256, 512, 1024) if c < max_len]
        mixed += [(b, c, p, 0) for b in (16, 64) for c in (512, 1024) if c < max_len for p in (32, 256)]
    else:
        chunks = _geometric(16, step_cap, 2)
        contexts = [0, *_geometric(512, max_len, 4)]
        multi = [(s, c) for s in (2, 4, 8) for c in _geometric(32, step_cap // s, 4)]
        batches = _geometric(1, 256, 2)
        decode_contexts = sorted({*_geometric(16, max_len, 4), max_len - 1})
        mixed = [(b, c, p, pc) for b in (1, 8, 32, 128) for c in (256, 2048) for p in (64, 512, 2048)
                 for pc in (0, 2048)]
        dense_decode = []
    points = [GridPoint(prefill=((chunk, ctx),)) for chunk in chunks for ctx in contexts]
    for seqs, chunk in multi:
        points += [GridPoint(prefill=((chunk, ctx),) * seqs) for ctx in (0, min(contexts[-1], 512))]
    points += [GridPoint(decode=spread_contexts(ctx, batch)) for batch in batches for ctx in decode_contexts]
    points += [GridPoint(decode=spread_contexts(ctx, batch)) for batch, ctx in dense_decode]
    points += [GridPoint(prefill=((chunk, pctx),), decode=spread_contexts(ctx, batch))
               for batch, ctx, chunk, pctx in mixed]
    seen: set[GridPoint] = set()
    grid = []
    for p in points:
        if p not in seen and p.fits(max_len, num_blocks, block_size) and sum(c for c, _ in p.prefill) <= step_cap:
            seen.add(p)
            grid.append(p)
    return grid
