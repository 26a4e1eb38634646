"""The Llama-family decoder (Llama 2/3, Qwen2/2.5, Mistral) with a forward pass over a paged KV cache.

The architecture is a :class:`sim.models.ModelSpec`, described to transformers by
:func:`hf_config`; the forward pass is ours so that attention reads the paged cache. One
forward computes a flat list of tokens from many sequences at once: decodes (one token each)
and prefill chunks at any cache offset, as laid out by :class:`ForwardInputs`.

Parameters are stored fused (q|k|v in one matrix, gate|up in one) to keep the number of kernel
launches per step low; :meth:`Transformer.load_hf_state_dict` maps Hugging Face names onto them.

Every projection is a :class:`Linear`, which can pad a step's rows to a count whose kernel is
faster: on a CPU in float32, torch's matrix product (MKL) runs a few rows as that many
matrix-vector products, each reading the whole weight, and switches to a blocked kernel at 4.
Measured on this project's 2-core AVX-512 VM (torch 2.13.0+cpu, ``python
experiments/bench_gemm_rows.py --model small``): the small model's 32000 x 768 head takes 8.5,
18.6, 25.9 and 17.3 ms for 1, 2, 3 and 4 rows, so a decode step of 3 sequences cost more than
one of 4 (96 against 75 ms) and a step's cost was not monotone in its batch. Padded to 4, the
3-row step takes 73 ms (two runs of the benchmark: 0.76 and 0.73 of unpadded). Two rows are
padded too, a wash: the layers' own products are cheaper with 2 rows than with 4 and the
head's dearer, and padded 2-sequence steps came out 6% slower in one run, 6% faster in the
other; it keeps every step of 2 to 4 rows on one kernel.
Past 4 rows the kernel works in blocks of 3 rows up to 15 and switches to a wider kernel at
16: the head takes 2.1, 3.9, 5.5, 7.1-7.6 and 9.1-9.4 ms for 1, 4-6, 7-9, 10-12 and 13-15 rows
and 4.6 ms for 16 (``--pad-to 16 --rows 1,4,...,17,24,32 --context 256``, one run), and a
15-sequence decode step took 72.7 ms against 52.4 ms for 16. Padded to 16, steps of 7 to 15
sequences take 0.96 to 0.72 of unpadded (45-53 ms); 4 to 6 would take 1.16-1.22, so they are
left alone. Before this padding the cost model priced decode batches of 8-15 sequences 16-29%
low (median signed error, live steps of the mooncake and azure-conv validation cells), the
fit's one line through 4 and 16 sequences passing below the blocks in between; the padding
leaves a step function that the fit's ``pad_rows`` feature (:mod:`calibrate.fit`) follows.
A serving engine pads in the same spirit for its CUDA graphs' batch sizes.
:func:`default_pad_rows` says where it applies (float32 on a CPU, a model whose weights are
large enough for their reads to matter); elsewhere nothing is padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sim.models import ModelSpec


def hf_config(spec: ModelSpec) -> Any:
    """The transformers config (LlamaConfig / Qwen2Config / MistralConfig) of ``spec``."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common: dict[str, Any] = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=spec.rms_norm_eps,
        tie_word_embeddings=spec.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        hidden_act="silu",
    )
    if spec.family == "llama":
        if spec.qkv_bias:
            raise ValueError(f"{spec.name}: Llama has no q/k/v-only bias (attention_bias also biases o_proj)")
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    if spec.family == "qwen2":
        if not spec.qkv_bias:
            raise ValueError(f"{spec.name}: Qwen2 always has q/k/v bias; set qkv_bias=True")
        return Qwen2Config(**common, use_sliding_window=False)
    if spec.family == "mistral":
        if spec.qkv_bias:
            raise ValueError(f"{spec.name}: Mistral has no q/k/v bias")
        return MistralConfig(**common, sliding_window=None)
    raise ValueError(f"{spec.name}: unknown family {spec.family!r}; known: llama, qwen2, mistral")


@dataclass
class PrefillChunk:
    """One sequence's prefill chunk: rows ``[row, row + num_tokens)`` of the flat input.

    ``context_blocks`` (blocks,) and ``mask`` (num_tokens, start + num_tokens) are set when the
    chunk starts after cached tokens (``start > 0``); a chunk from offset 0 attends only to
    itself under a causal mask and reads no cache.
    """

    row: int
    num_tokens: int
    start: int
    context_blocks: Tensor | None = None
    mask: Tensor | None = None


@dataclass
class DecodeGroup:
    """Decodes at rows ``[row, row + num_seqs)``, attending together over their block tables
    padded to the group's longest: ``blocks`` (num_seqs, width) padded with block 0, ``mask``
    (1, num_seqs, 1, width * block_size), True where a key is the sequence's own."""

    row: int
    num_seqs: int
    blocks: Tensor
    mask: Tensor


@dataclass
class ForwardInputs:
    """One step's flat input: decodes first (one token per sequence, in ``decode_groups``), then
    the prefill chunks. Built once per step by the runner, shared by every layer.
    """

    input_ids: Tensor  # (T,) int64
    positions: Tensor  # (T,) int64
    slot_mapping: Tensor  # (T,) int64: block * block_size + offset where each new K/V goes
    decode_groups: list[DecodeGroup]
    prefills: list[PrefillChunk]
    sample_rows: Tensor  # (S,) int64: rows whose output predicts the next token


PAD_MIN_HEAD_ELEMENTS = 1 << 22
"""A model is padded only when its vocabulary projection holds at least this many weights (4 M,
16 MiB in float32): then reading the weights once more per row is what a few-row step costs.
Measured with ``experiments/bench_gemm_rows.py --threads 1`` on the ``tiny`` model (a 4096 x 128
head, 0.5 M): a 3-sequence decode step took as long padded as not (3.60 / 3.59 ms) and a
2-sequence one 29% longer padded (3.33 / 2.58 ms); unpadded, its steps rise with the batch
(2.48, 2.58, 3.59, 3.87 ms for 1 to 4). ``small``'s head (32000 x 768, 24.6 M) is padded."""


def default_pad_rows(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> dict[int, int]:
    """Row counts a :class:`Linear` pads, and to what: 2 and 3 rows to 4 and 7 to 15 rows to 16
    for float32 on a CPU when the model's head holds :data:`PAD_MIN_HEAD_ELEMENTS` weights (see
    the module docstring), none elsewhere: a small model's products cost little per weight
    read, and bfloat16 on the CPU and CUDA's kernels run a few rows at about the cost of one."""
    large = spec.vocab_size * spec.hidden_size >= PAD_MIN_HEAD_ELEMENTS
    if not (large and device.type == "cpu" and dtype == torch.float32):
        return {}
    return {2: 4, 3: 4} | dict.fromkeys(range(7, 16), 16)


class Linear(nn.Linear):
    """``nn.Linear`` whose input of a row count in ``pad_rows`` is padded with zero rows to the
    count it maps to (the extra outputs dropped): each row's output is its own product, so only
    the kernel changes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.pad_rows: dict[int, int] = {}

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        padded_rows = self.pad_rows.get(rows)
        if padded_rows is not None:
            padded = torch.cat([x, x.new_zeros(padded_rows - rows, *x.shape[1:])])
            return F.linear(padded, self.weight, self.bias)[:rows]
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # As transformers does: normalise in float32, cast back, then scale.
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.qkv_proj = Linear(spec.hidden_size, (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim,
                               bias=spec.qkv_bias)
        self.o_proj = Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, inp: ForwardInputs) -> Tensor:
        """``x`` (T, hidden); ``kv`` this layer's cache (2, kv_heads, num_blocks, block_size, head_dim)."""
        t = x.shape[0]
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        qk = qkv[:, : (h + kvh) * d].view(t, h + kvh, d)
        qk = qk * cos + _rotate_half(qk) * sin  # rotary on q and k together: (T, H + KV, d)
        q, k = qk[:, :h], qk[:, h:]
        v = qkv[:, (h + kvh) * d:].view(t, kvh, d)
        slots = kv.view(2, kvh, -1, d)  # (2, KV, num_blocks * block_size, d)
        slots[0].index_copy_(1, inp.slot_mapping, k.transpose(0, 1))
        slots[1].index_copy_(1, inp.slot_mapping, v.transpose(0, 1))
        out = paged_attention(q, k, v, kv, inp)
        return self.o_proj(out.reshape(t, h * d))


def paged_attention(q: Tensor, k: Tensor, v: Tensor, kv: Tensor, inp: ForwardInputs) -> Tensor:
    """Attention of every new token over its own sequence. ``q`` (T, H, d), ``k``/``v`` (T, KV, d)
    are this step's (already written to ``kv``, the layer's cache); returns (T, H, d).

    Decodes run one batched call per group, over block tables padded to the group's longest
    (masked): one gather brings K and V of every block, contiguous per (kv head, sequence), and
    the query heads sharing a KV head attend together, so grouped-query attention repeats no K/V.
    Each prefill chunk is one call, reading the cache only when it has cached context.
    """
    _, kvh, num_blocks, block_size, d = kv.shape
    by_block = kv.view(2 * kvh, num_blocks, block_size, d)
    parts: list[Tensor] = []
    for g in inp.decode_groups:
        n, width = g.blocks.shape
        ctx = by_block.index_select(1, g.blocks.view(-1)).view(2, kvh, n, width * block_size, d)
        qg = q[g.row: g.row + n].view(n, kvh, -1, d).transpose(0, 1)  # (KV, D, group, d): KV as batch, D as heads
        o = F.scaled_dot_product_attention(qg, ctx[0], ctx[1], attn_mask=g.mask)
        parts.append(o.transpose(0, 1).reshape(n, -1, d))  # (D, H, d)
    for p in inp.prefills:
        rows = slice(p.row, p.row + p.num_tokens)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # (1, H, n, d)
        if p.context_blocks is None:
            kp, vp = k[rows].transpose(0, 1).unsqueeze(0), v[rows].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        else:
            n_ctx = p.start + p.num_tokens
            nb = p.context_blocks.shape[0]
            ctx = by_block.index_select(1, p.context_blocks).view(2, 1, kvh, nb * block_size, d)[..., :n_ctx, :]
            o = F.scaled_dot_product_attention(qp, ctx[0], ctx[1], attn_mask=p.mask, enable_gqa=True)
        parts.append(o[0].transpose(0, 1))  # (n, H, d)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.intermediate = spec.intermediate_size
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size, bias=False)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, inp: ForwardInputs) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, inp)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The decoder. ``forward`` gives hidden states (T, hidden); ``logits`` maps chosen rows to
    the vocabulary (the final norm is per row, so it is applied there). Build it with
    :func:`runtime.weights.load_model`: the constructor leaves the weights for a loader to fill."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        # Left uninitialised (every parameter is loaded); Embedding's own normal_ init costs a
        # second on the meta device the first time.
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size,
                                         _weight=torch.empty(spec.vocab_size, spec.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.pad_rows: dict[int, int] = {}
        """Row counts every projection pads, and to what (:meth:`pad_small_products`)."""
        self.tie_weights()
        self._inv_freq: Tensor | None = None  # float32 always, so not a buffer that .to(dtype) would cast

    def pad_small_products(self, pad_rows: dict[int, int]) -> None:
        """Set every projection's :attr:`Linear.pad_rows` (``{}``: no padding)."""
        for rows, padded_rows in pad_rows.items():
            if not 1 <= rows < padded_rows:
                raise ValueError(f"pad_rows must map a row count to a larger one, got {rows} -> {padded_rows}")
        for module in self.modules():
            if isinstance(module, Linear):
                module.pad_rows = dict(pad_rows)
        self.pad_rows = dict(pad_rows)

    def tie_weights(self) -> None:
        if self.spec.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin (T, 1, head_dim) for ``positions`` (T,)."""
        if self._inv_freq is None or self._inv_freq.device != positions.device:
            # As transformers' default RoPE: inv_freq and angles in float32, cast at the end.
            exponents = torch.arange(0, self.spec.head_dim, 2, dtype=torch.int64).float() / self.spec.head_dim
            self._inv_freq = (1.0 / (self.spec.rope_theta ** exponents)).to(positions.device)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, inp: ForwardInputs, kv_layers: list[Tensor]) -> Tensor:
        """Hidden states (T, hidden) of ``inp``'s tokens; writes their K/V into ``kv_layers``
        (one (2, kv_heads, num_blocks, block_size, head_dim) cache per layer)."""
        x = self.embed_tokens(inp.input_ids)
        cos, sin = self.rotary(inp.positions, x.dtype)
        for layer, kv in zip(self.decoder_layers(), kv_layers, strict=True):
            x = layer(x, cos, sin, kv, inp)
        return x

    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def logits(self, hidden: Tensor) -> Tensor:
        """(N, hidden) -> (N, vocab)."""
        return self.lm_head(self.norm(hidden))

    # -- Hugging Face parameter names ---------------------------------------------------------
    def load_hf_state_dict(self, state: dict[str, Tensor]) -> None:
        """Copy a state dict with Hugging Face names (``model.layers.0.self_attn.q_proj.weight``,
        ...) into the fused parameters. Missing or unexpected names and wrong shapes raise."""
        from runtime.weights import hf_param_shapes

        expected = hf_param_shapes(self.spec)
        # Older Llama checkpoints store RoPE's inv_freq buffers; they are recomputed, not loaded.
        given = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if self.spec.tie_embeddings:
            given.pop("lm_head.weight", None)  # a tied checkpoint may carry the copy
        missing = sorted(set(expected) - set(given))
        unexpected = sorted(set(given) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{self.spec.name}: state dict does not match the architecture; "
                             f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                             f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for name, shape in expected.items():
            if tuple(given[name].shape) != shape:
                raise ValueError(f"{self.spec.name}: {name} has shape {tuple(given[name].shape)}, expected {shape}")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(given["model.embed_tokens.weight"])
            self.norm.weight.copy_(given["model.norm.weight"])
            if not self.spec.tie_embeddings:
                self.lm_head.weight.copy_(given["lm_head.weight"])
            for i, layer in enumerate(self.decoder_layers()):
                p = f"model.layers.{i}."
                attn, mlp = layer.self_attn, layer.mlp
                attn.qkv_proj.weight.copy_(torch.cat([given[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
                if self.spec.qkv_bias:
                    attn.qkv_proj.bias.copy_(torch.cat([given[p + f"self_attn.{n}_proj.bias"] for n in "qkv"]))
                attn.o_proj.weight.copy_(given[p + "self_attn.o_proj.weight"])
                mlp.gate_up_proj.weight.copy_(torch.cat([given[p + "mlp.gate_proj.weight"],
                                                         given[p + "mlp.up_proj.weight"]]))
                mlp.down_proj.weight.copy_(given[p + "mlp.down_proj.weight"])
                layer.input_layernorm.weight.copy_(given[p + "input_layernorm.weight"])
                layer.post_attention_layernorm.weight.copy_(given[p + "post_attention_layernorm.weight"])

    def hf_state_dict(self) -> dict[str, Tensor]:
        """The parameters under Hugging Face names (views of ours, split where fused)."""
        s = self.spec
        h, kvh, d = s.num_heads, s.num_kv_heads, s.head_dim
        out: dict[str, Tensor] = {"model.embed_tokens.weight": self.embed_tokens.weight.detach(),
                                  "model.norm.weight": self.norm.weight.detach()}
        if not s.tie_embeddings:
            out["lm_head.weight"] = self.lm_head.weight.detach()
        for i, layer in enumerate(self.decoder_layers()):
            p = f"model.layers.{i}."
            attn = layer.self_attn
            sizes = [h * d, kvh * d, kvh * d]
            for n, w in zip("qkv", attn.qkv_proj.weight.detach().split(sizes), strict=True):
                out[p + f"self_attn.{n}_proj.weight"] = w
            if s.qkv_bias:
                for n, b in zip("qkv", attn.qkv_proj.bias.detach().split(sizes), strict=True):
                    out[p + f"self_attn.{n}_proj.bias"] = b
            out[p + "self_attn.o_proj.weight"] = attn.o_proj.weight.detach()
            gate, up = layer.mlp.gate_up_proj.weight.detach().split(s.intermediate_size)
            out[p + "mlp.gate_proj.weight"] = gate
            out[p + "mlp.up_proj.weight"] = up
            out[p + "mlp.down_proj.weight"] = layer.mlp.down_proj.weight.detach()
            out[p + "input_layernorm.weight"] = layer.input_layernorm.weight.detach()
            out[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.detach()
        return out
