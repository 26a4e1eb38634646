"""One engine step on the device: ``ModelRunner.execute(batch) -> {request_id: next_token}``.

A step copies swapped blocks (out to host, then in), lays every scheduled token of the batch
out flat - decodes first, then each prefill chunk - runs ONE forward pass that writes the new
K/V into the paged cache at the slots of each request's block table, and takes the greedy
argmax for every sequence whose cache is complete after the step (``ScheduledSeq.samples_token``).

Token ids are synthetic: a request's prompt is drawn from ``numpy.random.default_rng([seed,
request.id])`` (:func:`prompt_token_ids`), and its outputs are the tokens this runner sampled,
kept per request so that a prefill redone after a recompute preemption reads the real ones.

Standalone use (calibration drives steps this way)::

    blocks = BlockManager(num_blocks=256, block_size=16)
    runner = ModelRunner(load_model(get_model("tiny")), blocks)
    r = Request(id=0, arrival_s=0.0, prompt_tokens=100, output_tokens=50)
    blocks.allocate(r, 100)                          # the table the step writes into
    batch = Batch([ScheduledSeq(r, start=0, num_new_tokens=100)], block_size=16)
    tokens, step_s = runner.timed_execute(batch)     # {0: token}, device-synchronised seconds

The runner never changes a request (the policy's ``on_step_done`` does). A request whose
``num_tokens`` says it has outputs this runner never produced (a synthetic decode at a long
context) gets deterministic filler ids for them; the KV of positions no step wrote is whatever
the pool holds, which changes no timing.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from runtime.kvcache import KVCache
from runtime.model import DecodeGroup, ForwardInputs, PrefillChunk, Transformer
from sim.batch import Batch, ScheduledSeq
from sim.kv import BlockManager
from sim.request import Request

WARMUP_REQUEST_ID = 2**62  # a scratch request id no workload uses


def split_decodes(widths: list[int], min_saving: int, max_depth: int = 2) -> list[tuple[int, int]]:
    """Contiguous groups ``[lo, hi)`` of decodes sorted by ``widths`` (blocks each attends to):
    a group is split in two where that saves the most padded blocks, when it saves at least
    ``min_saving`` of them (the price of one more attention call), at most ``max_depth`` times deep."""

    def split(lo: int, hi: int, depth: int) -> list[tuple[int, int]]:
        full = (hi - lo) * widths[hi - 1]
        saving, at = 0, lo
        for i in range(lo + 1, hi):
            s = full - (i - lo) * widths[i - 1] - (hi - i) * widths[hi - 1]
            if s > saving:
                saving, at = s, i
        if depth == 0 or saving < max(min_saving, 1):
            return [(lo, hi)]
        return split(lo, at, depth - 1) + split(at, hi, depth - 1)

    return split(0, len(widths), max_depth) if widths else []


def prompt_token_ids(seed: int, request_id: int, num_tokens: int, vocab_size: int) -> list[int]:
    """The synthetic prompt of a request: the same for every engine given the same seed."""
    return np.random.default_rng([seed, request_id]).integers(vocab_size, size=num_tokens).tolist()


class ModelRunner:
    """Executes batches of one model against a KV pool shaped like ``blocks`` (a BlockManager)."""

    def __init__(self, model: Transformer, blocks: BlockManager, seed: int = 0) -> None:
        self.model = model
        self.blocks = blocks
        self.seed = seed
        self.block_size = blocks.block_size
        self.device = model.device
        self.cache = KVCache(model.spec, blocks.num_blocks, blocks.block_size, blocks.num_host_blocks,
                             dtype=model.dtype, device=self.device)
        self.outputs: dict[int, list[int]] = {}
        """Every token sampled for each request id, in order."""
        # Padded KV blocks a split of the decode batch must save to pay for one more attention
        # call per layer: a call costs little next to blocks on CPU, much on CUDA.
        self.min_split_blocks = 64 if self.device.type == "cpu" else 1024
        self._tokens: dict[int, list[int]] = {}  # prompt + sampled ids of requests still running

    # -- public ------------------------------------------------------------------------------
    def execute(self, batch: Batch) -> dict[int, int]:
        """Run one step; returns the greedy next token of every sequence that samples one."""
        with torch.inference_mode():
            self.cache.swap_out(batch.swap_out_blocks)
            self.cache.swap_in(batch.swap_in_blocks)
            if not batch.seqs:
                return {}
            inp, sampling = self._prepare(batch.seqs)
            hidden = self.model(inp, self.cache.layers)
            next_ids = self.model.logits(hidden[inp.sample_rows]).argmax(dim=-1).tolist()
        out: dict[int, int] = {}
        for r, tok in zip(sampling, next_ids, strict=True):
            self._record(r, tok)
            out[r.id] = tok
        return out

    def timed_execute(self, batch: Batch) -> tuple[dict[int, int], float]:
        """``execute`` and its wall time: input preparation, forward and sampling, with the
        device synchronised before and after."""
        self.synchronize()
        t0 = time.perf_counter()
        out = self.execute(batch)
        self.synchronize()
        return out, time.perf_counter() - t0

    def warmup(self, prompt_tokens: int = 64) -> None:
        """One prefill and one decode of a scratch request, so that lazy initialisation (kernel
        selection, allocator growth) is not timed in the first real step. Leaves the block
        manager as it found it."""
        n = min(prompt_tokens, self.blocks.num_free * self.block_size - 1)
        if n < 1:
            return
        r = Request(WARMUP_REQUEST_ID, 0.0, n, 2)
        self.blocks.allocate(r, n + 1)
        try:
            self.execute(Batch([ScheduledSeq(r, 0, n)], block_size=self.block_size))
            r.num_computed_tokens, r.num_generated = n, 1
            self.execute(Batch([ScheduledSeq(r, n, 1)], block_size=self.block_size))
            self.synchronize()
        finally:
            self.blocks.free(r)
            self.release(r.id)

    def forward_logits(self, batch: Batch) -> dict[int, Tensor]:
        """Like ``execute`` but returns the logits (num_new_tokens, vocab) of every scheduled
        token, float32 on CPU, and samples nothing (for tests against transformers)."""
        with torch.inference_mode():
            inp, _ = self._prepare(batch.seqs)
            hidden = self.model(inp, self.cache.layers)
            out: dict[int, Tensor] = {}
            for s, rows in zip(*self._rows(batch.seqs), strict=True):
                out[s.request.id] = self.model.logits(hidden[rows]).float().cpu()
        return out

    def token_ids(self, request: Request) -> list[int]:
        """The ids of ``request``'s ``num_tokens`` tokens: prompt, then the outputs sampled so far."""
        return list(self._ids(request)[: request.num_tokens])

    def set_prompt(self, request_id: int, token_ids: list[int]) -> None:
        """Give a request real prompt ids (a server's client sent them) instead of synthetic ones;
        call it before the request's first step."""
        self._tokens[request_id] = list(token_ids)

    def release(self, request_id: int) -> None:
        """Forget a request's tokens and outputs (calibration reuses fake requests)."""
        self._tokens.pop(request_id, None)
        self.outputs.pop(request_id, None)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- internals ---------------------------------------------------------------------------
    def _ids(self, r: Request) -> list[int]:
        ids = self._tokens.get(r.id)
        if ids is None:
            ids = prompt_token_ids(self.seed, r.id, r.prompt_tokens, self.model.spec.vocab_size)
            self._tokens[r.id] = ids
        if len(ids) < r.num_tokens:  # outputs this runner did not sample (a synthetic request)
            rng = np.random.default_rng([self.seed, r.id, len(ids)])
            ids.extend(rng.integers(self.model.spec.vocab_size, size=r.num_tokens - len(ids)).tolist())
        return ids

    def _record(self, r: Request, token: int) -> None:
        ids = self._tokens.get(r.id)
        if ids is not None and len(ids) == r.num_tokens:  # not a repeat of a step already taken
            ids.append(token)
            self.outputs.setdefault(r.id, []).append(token)
        if r.num_generated + 1 >= r.output_tokens:  # this was the last token
            self._tokens.pop(r.id, None)

    def _split(self, seqs: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[ScheduledSeq]]:
        """Single-token steps (decodes, whatever their offset) batch together, shortest context
        first so that groups of similar length are contiguous; the rest are chunks."""
        decodes = sorted((s for s in seqs if s.num_new_tokens == 1), key=lambda s: s.start // self.block_size)
        prefills = [s for s in seqs if s.num_new_tokens != 1]
        return decodes, prefills

    def _rows(self, seqs: list[ScheduledSeq]) -> tuple[list[ScheduledSeq], list[slice]]:
        decodes, prefills = self._split(seqs)
        rows = [slice(i, i + 1) for i in range(len(decodes))]
        row = len(decodes)
        for s in prefills:
            rows.append(slice(row, row + s.num_new_tokens))
            row += s.num_new_tokens
        return decodes + prefills, rows

    def _table(self, s: ScheduledSeq) -> list[int]:
        table = self.blocks.tables.get(s.request.id, [])
        end = s.start + s.num_new_tokens
        if len(table) * self.block_size < end:
            raise RuntimeError(f"request {s.request.id}: its block table holds {len(table) * self.block_size} "
                               f"tokens, the step writes up to {end} (allocate blocks before executing)")
        if end > s.request.num_tokens:
            raise RuntimeError(f"request {s.request.id}: step computes up to token {end}, "
                               f"the request has {s.request.num_tokens}")
        return table

    def _prepare(self, seqs: list[ScheduledSeq]) -> tuple[ForwardInputs, list[Request]]:
        """The flat step input and, in row order, the requests that sample a token."""
        bs, dev = self.block_size, self.device
        decodes, prefills = self._split(seqs)
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampling: list[Request] = []
        decode_tables: list[list[int]] = []
        for i, s in enumerate(decodes):
            r, p = s.request, s.start
            table = self._table(s)
            ids.append(self._ids(r)[p])
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            decode_tables.append(table[: p // bs + 1])
            if s.samples_token:
                sample_rows.append(i)
                sampling.append(r)
        chunk_rows: list[tuple[int, ScheduledSeq, list[int]]] = []
        row = len(decodes)
        for s in prefills:
            r, start, n = s.request, s.start, s.num_new_tokens
            table = self._table(s)
            ids.extend(self._ids(r)[start: start + n])
            pos = np.arange(start, start + n)
            positions.extend(pos.tolist())
            slots.extend((np.asarray(table)[pos // bs] * bs + pos % bs).tolist())
            chunk_rows.append((row, s, table))
            row += n
            if s.samples_token:
                sample_rows.append(row - 1)
                sampling.append(r)
        num = len(ids)
        flat = torch.tensor(ids + positions + slots + sample_rows, dtype=torch.int64).to(dev, non_blocking=True)
        input_ids, pos_t, slot_t, rows_t = flat.split([num, num, num, len(sample_rows)])

        groups: list[DecodeGroup] = []
        for lo, hi in split_decodes([len(t) for t in decode_tables], self.min_split_blocks):
            width = len(decode_tables[hi - 1])
            padded = [t + [0] * (width - len(t)) for t in decode_tables[lo:hi]]
            blocks = torch.tensor(padded, dtype=torch.int64).to(dev, non_blocking=True)
            # (1, n, 1, width * block_size): a key is visible up to the decode's own position.
            keys = torch.arange(width * bs, device=dev)
            mask = (keys[None, :] <= pos_t[lo:hi, None]).view(1, hi - lo, 1, -1)
            groups.append(DecodeGroup(row=lo, num_seqs=hi - lo, blocks=blocks, mask=mask))
        chunks: list[PrefillChunk] = []
        for row0, s, table in chunk_rows:
            chunk = PrefillChunk(row=row0, num_tokens=s.num_new_tokens, start=s.start)
            if s.start > 0:
                end = s.start + s.num_new_tokens
                chunk.context_blocks = torch.tensor(table[: -(-end // bs)], dtype=torch.int64).to(dev)
                # (n, start + n) causal mask shifted by the cached context.
                keys = torch.arange(end, device=dev)
                chunk.mask = keys[None, :] <= pos_t[row0: row0 + s.num_new_tokens, None]
            chunks.append(chunk)
        inp = ForwardInputs(input_ids=input_ids, positions=pos_t, slot_mapping=slot_t, decode_groups=groups,
                            prefills=chunks, sample_rows=rows_t)
        return inp, sampling
