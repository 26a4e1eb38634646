"""Calibration inside vLLM: its engine in process, driven through chosen step patterns and a
short live-like workload, every step kept with its shape and wall time.

Run by a python that has vLLM (servesim's own environment need not)::

    python -m calibrate.vllm_inproc --config CONFIG.json --out DIR

``CONFIG.json`` holds :class:`VllmEngineArgs` and :class:`InprocPlan` (``{"engine": ...,
"plan": ...}``); ``DIR`` receives ``steps.csv`` (the samples CSV of :mod:`calibrate.samples`,
origin ``grid`` for the patterns, ``live`` for the live-like workload) and ``engine.json``
(provenance: vLLM, torch and transformers versions, device, dtype, the model's config, the
engine settings that shape steps, the internals relied on, phase times). A failure writes
``error.txt`` (one message for people) and exits with status 2.

vLLM APIs relied on: ``LLMEngine.from_engine_args(EngineArgs(...), usage_context=
UsageContext.OPENAI_API_SERVER)`` (the server's defaults, e.g. ``max_num_batched_tokens`` 2048
and ``max_num_seqs`` 128 on CPU, not the ``LLM`` class's 4096 and 256) with
``VLLM_ENABLE_V1_MULTIPROCESSING=0`` (the engine core in this process,
``LLMEngine.engine_core.engine_core``), ``LLMEngine.add_request``
with a ``TokensPrompt``, ``LLMEngine.step`` and ``has_unfinished_requests``,
``LLMEngine.vllm_config`` for the settings, plus the step internals of
:mod:`calibrate.vllm_steps`. The engine's own scheduler decides every step; the patterns only
choose what is submitted when, and the recorder keeps what vLLM really ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from calibrate.host import cpu_device

DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class VllmEngineArgs:
    """The vLLM engine to calibrate; None leaves vLLM's default (read back into the provenance)."""

    model: str
    """A checkpoint directory (config.json, weights, tokenizer)."""
    dtype: str = "bfloat16"
    max_model_len: int | None = 4096
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int | None = None
    kv_cache_gib: int | None = None
    """KV cache memory (``kv_cache_memory_bytes``; ``VLLM_CPU_KVCACHE_SPACE`` on the CPU backend). Unset,
    vLLM reserves ``gpu_memory_utilization`` of the memory, on CPU too, and refuses to start when
    that much is not free (a shared machine): give it."""
    enable_prefix_caching: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a checkpoint directory")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs", "block_size", "kv_cache_gib"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or unset, got {value!r}")


@dataclass(frozen=True)
class InprocPlan:
    """What is submitted: lone prefills, decode batches, prefills joining a batch, prefix-cache
    hits (when caching is on), then Poisson arrivals at ``live_loads`` of an estimated
    saturation rate. Lengths beyond the engine's limits are left out."""

    quick: bool = True
    repeats: int = 3
    """Runs of each pattern (each run's steps are kept as separate samples)."""
    decode_tokens: int = 8
    """Output tokens of a decode batch's requests: decode steps per batch run, minus one."""
    max_batch_prompt_tokens: int = 8192
    """Decode batches whose prompts add up to more are left out (their prefill would dominate)."""
    live_requests: int = 24
    """Requests per live load."""
    live_loads: tuple[float, ...] = (0.5, 0.9)
    live_time_budget_s: float = 60.0
    """No further live load is started after this much wall time of the live phase."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens must be >= 2 (a decode step needs a first token), "
                             f"got {self.decode_tokens}")
        if self.live_requests < 0:
            raise ValueError(f"live_requests must be >= 0, got {self.live_requests}")
        if any(not (0 < x <= 4) for x in self.live_loads):
            raise ValueError(f"live_loads must be within (0, 4], got {self.live_loads}")
        if self.live_time_budget_s < 0:
            raise ValueError(f"live_time_budget_s must be >= 0, got {self.live_time_budget_s}")

    @classmethod
    def make(cls, quick: bool, seed: int = 0) -> InprocPlan:
        if quick:
            return cls(quick=True, repeats=2, seed=seed)
        return cls(quick=False, repeats=4, decode_tokens=16, max_batch_prompt_tokens=65536, live_requests=64,
                   live_loads=(0.5, 0.9, 1.5),
                   live_time_budget_s=300.0, seed=seed)

    def prefill_lengths(self, budget: int, max_prompt: int) -> list[int]:
        """Powers of two from 16 (every other one when quick) up to twice the token budget, so
        that prompts longer than the budget are chunked by the engine (a chunk after context)."""
        top = min(max_prompt, 2 * budget)
        lengths = [n for n in (2**k for k in range(4, 20)) if n <= top]
        lengths = lengths[::2] if self.quick else lengths
        if top not in lengths and top > (lengths[-1] if lengths else 0):
            lengths.append(top)
        return lengths

    def decode_batches(self, max_seqs: int) -> list[int]:
        sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max_seqs]
        return [b for b in sizes if b <= 64][::2] if self.quick else sizes

    def decode_contexts(self, max_prompt: int) -> list[int]:
        return [c for c in ((32, 512) if self.quick else (32, 256, 1024, 2048)) if c <= max_prompt]


class _Driver:
    """One in-process vLLM engine with a :class:`~calibrate.vllm_steps.StepRecorder` on its core."""

    def __init__(self, args: VllmEngineArgs, plan: InprocPlan) -> None:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if args.kv_cache_gib is not None:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(args.kv_cache_gib)
        import numpy as np
        import vllm
        from vllm import SamplingParams
        from vllm.engine.arg_utils import EngineArgs
        from vllm.inputs import TokensPrompt
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.llm_engine import LLMEngine

        from calibrate.vllm_steps import StepRecorder, VllmApiError

        self.version = getattr(vllm, "__version__", "?")
        self._sampling, self._prompt = SamplingParams, TokensPrompt
        kwargs: dict[str, Any] = {"model": args.model, "dtype": args.dtype, "seed": args.seed}
        for name in ("max_model_len", "max_num_batched_tokens", "max_num_seqs", "block_size",
                     "enable_prefix_caching"):
            if getattr(args, name) is not None:
                kwargs[name] = getattr(args, name)
        if args.kv_cache_gib is not None:  # the CPU backend reads it from VLLM_CPU_KVCACHE_SPACE too
            kwargs["kv_cache_memory_bytes"] = args.kv_cache_gib * 2**30
        t0 = time.perf_counter()
        # The OpenAI server's usage context: its defaults (max_num_batched_tokens, max_num_seqs)
        # differ from the LLM class's, and the server is what a profile will be validated against.
        self.engine = LLMEngine.from_engine_args(EngineArgs(**kwargs), usage_context=UsageContext.OPENAI_API_SERVER)
        self.startup_s = time.perf_counter() - t0
        client = getattr(self.engine, "engine_core", None)
        core = getattr(client, "engine_core", None)
        if core is None:
            raise VllmApiError(f"vLLM {self.version}: LLMEngine.engine_core.engine_core is missing: the engine "
                               "core is not in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0 had no effect)")
        self.core = core
        self.recorder = StepRecorder(core, self.version)
        config = self.engine.vllm_config
        self.budget = int(config.scheduler_config.max_num_batched_tokens)
        self.max_seqs = int(config.scheduler_config.max_num_seqs)
        self.max_len = int(config.model_config.max_model_len)
        self.block_size = int(config.cache_config.block_size)
        self.num_blocks = int(config.cache_config.num_gpu_blocks or 0)
        self.prefix_caching = bool(config.cache_config.enable_prefix_caching)
        self.vocab = int(config.model_config.get_vocab_size())
        self._rng = np.random.default_rng(plan.seed)
        self._next_id = 0

    def ids(self, n: int) -> list[int]:
        """``n`` random token ids (distinct prompts share no cached prefix by chance)."""
        return self._rng.integers(self.vocab, size=n).tolist()

    def submit(self, prompt: int | list[int], max_tokens: int) -> None:
        ids = self.ids(prompt) if isinstance(prompt, int) else prompt
        params = self._sampling(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        self.engine.add_request(f"cal-{self._next_id}", self._prompt(prompt_token_ids=ids), params)
        self._next_id += 1

    def step(self) -> None:
        self.engine.step()

    def busy(self) -> bool:
        return bool(self.engine.has_unfinished_requests())

    def drain(self) -> None:
        while self.busy():
            self.engine.step()

    def fits(self, seqs: int, tokens_each: int) -> bool:
        """``seqs`` sequences of ``tokens_each`` tokens at once, within the KV blocks and sequence cap."""
        return seqs <= self.max_seqs and seqs * math.ceil(tokens_each / self.block_size) <= self.num_blocks


def _patterns(d: _Driver, plan: InprocPlan) -> Iterator[tuple[str, Any]]:
    """(name, thunk) of every controlled pattern, one run each (the caller repeats them)."""
    max_prompt = d.max_len - plan.decode_tokens
    for p in plan.prefill_lengths(d.budget, d.max_len - 1):
        if d.fits(1, p + 1):
            yield f"prefill {p}", lambda p=p: _decode_batch(d, 1, p, 1)
    for b in plan.decode_batches(d.max_seqs):
        for c in plan.decode_contexts(max_prompt):
            if d.fits(b, c + plan.decode_tokens) and b * c <= plan.max_batch_prompt_tokens:
                yield f"decode {b} x {c}", lambda b=b, c=c: _decode_batch(d, b, c, plan.decode_tokens)
    joins = [p for p in (16, 128, 512) if p <= d.budget // 2]
    for b in [x for x in plan.decode_batches(d.max_seqs) if x <= d.budget // 4][-2:]:
        if d.fits(b + 1, 64 + 2 * len(joins) + 4) and joins:
            yield f"mixed {b} + {joins}", lambda b=b: _mixed(d, b, joins)
    if d.prefix_caching:
        for k in (1, 2, 4):
            if k * d.block_size + 64 < d.max_len and d.fits(1, k * d.block_size + 64):
                yield f"prefix hit {k} blocks", lambda k=k: _prefix_hit(d, k)


def _decode_batch(d: _Driver, seqs: int, context: int, tokens: int) -> None:
    for _ in range(seqs):
        d.submit(context, tokens)
    d.drain()


def _mixed(d: _Driver, seqs: int, joins: list[int]) -> None:
    """``seqs`` decoding requests; once their prefills are done, each join length arrives alone,
    one decode-only step apart, and is prefilled in a step with the decodes (it wants one token)."""
    for _ in range(seqs):
        d.submit(64, 2 * len(joins) + 4)
    for _ in range(math.ceil(seqs * 64 / d.budget) + 1):
        d.step()
    for p in joins:
        d.submit(p, 1)
        d.step()
        d.step()
    d.drain()


def _prefix_hit(d: _Driver, blocks: int) -> None:
    """A prompt, then one that shares its first ``blocks`` full blocks: a prefill after cached context."""
    shared = d.ids(blocks * d.block_size)
    d.submit(shared + d.ids(32), 1)
    d.drain()
    d.submit(shared + d.ids(64), 1)
    d.drain()


def _saturation_rps(d: _Driver, mean_prompt: float, mean_output: float) -> float:
    """A request rate the engine cannot exceed for long, from the grid's own steps: each request's
    prompt at the largest lone prefill's cost per token, and its outputs at the per-sequence cost
    of the largest decode batch measured (what a saturated engine runs)."""
    import statistics

    grid = [s for s in d.recorder.steps if s.phase == "grid"]
    prefills = [s for s in grid if s.shape.decode_seqs == 0 and s.shape.prefill_seqs == 1]
    decodes = [s for s in grid if s.shape.prefill_seqs == 0]
    if not prefills or not decodes:
        raise RuntimeError("the patterns measured no lone prefill or no decode step; cannot set the live rate")
    top = max(s.shape.prefill_tokens for s in prefills)
    per_token_s = statistics.median(s.step_s / top for s in prefills if s.shape.prefill_tokens == top)
    batch = max(s.shape.decode_seqs for s in decodes)
    per_seq_s = statistics.median(s.step_s for s in decodes if s.shape.decode_seqs == batch) / batch
    return 1.0 / (mean_prompt * per_token_s + mean_output * per_seq_s)


def _live(d: _Driver, plan: InprocPlan) -> list[dict]:
    """Poisson arrivals on the wall clock: a request is submitted once its time has come, the
    engine steps while it has work and sleeps until the next arrival when it has none."""
    import numpy as np

    if not plan.live_requests:
        return []
    rng = np.random.default_rng([plan.seed, 1])
    top_prompt = max(16, min(d.max_len // 2, 1024))
    top_output = max(8, min(d.max_len // 4, 64 if plan.quick else 128))
    rate = _saturation_rps(d, (16 + top_prompt) / 2, (8 + top_output) / 2)
    runs = []
    started = time.perf_counter()
    for load in plan.live_loads:
        if time.perf_counter() - started > plan.live_time_budget_s:
            break
        n = plan.live_requests
        arrivals = np.cumsum(rng.exponential(1.0 / (load * rate), size=n))
        prompts = rng.integers(16, top_prompt + 1, size=n)
        outputs = rng.integers(8, top_output + 1, size=n)
        d.recorder.phase = "live"
        before = len(d.recorder.steps)
        t0 = time.perf_counter()
        i = 0
        while i < n or d.busy():
            now = time.perf_counter() - t0
            while i < n and arrivals[i] <= now:
                d.submit(int(prompts[i]), int(outputs[i]))
                i += 1
            if d.busy():
                d.step()
            elif i < n:
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        d.recorder.phase = None
        runs.append({"load": load, "rate_rps": load * rate, "requests": n, "steps": len(d.recorder.steps) - before,
                     "wall_s": time.perf_counter() - t0})
    return runs


MODEL_CONFIG_KEYS = ("architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                     "max_position_embeddings", "tie_word_embeddings", "torch_dtype")


def provenance(d: _Driver) -> dict:
    """Versions, device, dtype, model config and the settings that shape steps, as the engine has them."""
    import torch
    import transformers
    from vllm.platforms import current_platform

    from calibrate.vllm_steps import API

    config = d.engine.vllm_config
    sched, cache, model = config.scheduler_config, config.cache_config, config.model_config
    if current_platform.is_cpu():
        device = cpu_device()
        threads: int | None = torch.get_num_threads()
    else:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else str(current_platform.device_name)
        threads = None
    hf = model.hf_config.to_dict()
    return {
        "engine": "vllm",
        "vllm_version": d.version,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python": sys.executable,
        "device": device,
        "device_type": str(current_platform.device_type),
        "torch_threads": threads,
        "dtype": str(model.dtype).removeprefix("torch."),
        "model": str(model.model),
        "model_config": {k: hf[k] for k in MODEL_CONFIG_KEYS if k in hf},
        "settings": {
            "max_num_batched_tokens": d.budget,
            "max_num_seqs": d.max_seqs,
            "max_model_len": d.max_len,
            "block_size": d.block_size,
            "num_gpu_blocks": d.num_blocks,
            "enable_prefix_caching": d.prefix_caching,
            "enable_chunked_prefill": getattr(sched, "enable_chunked_prefill", None),
            "long_prefill_token_threshold": getattr(sched, "long_prefill_token_threshold", None),
            "max_num_partial_prefills": getattr(sched, "max_num_partial_prefills", None),
            "async_scheduling": getattr(sched, "async_scheduling", None),
            "scheduling_policy": str(getattr(sched, "policy", None)),
            "kv_cache_dtype": str(getattr(cache, "cache_dtype", None)),
        },
        "api": list(API),
    }


def run(args: VllmEngineArgs, plan: InprocPlan, out: Path, log=sys.stderr) -> dict:
    """Start the engine, warm up, run the patterns ``plan.repeats`` times in a seeded shuffled
    order, then the live loads; write ``steps.csv`` and ``engine.json`` into ``out``."""
    import numpy as np

    from calibrate.samples import Sample, write_samples

    d = _Driver(args, plan)
    print(f"vLLM {d.version} started in {d.startup_s:.1f} s: max_num_batched_tokens {d.budget}, max_num_seqs "
          f"{d.max_seqs}, block_size {d.block_size}, {d.num_blocks} KV blocks", file=log, flush=True)
    patterns = list(_patterns(d, plan))
    t0 = time.perf_counter()
    # Warm-up, not kept: every prefill length (each a new shape for the compiled model) and the
    # largest decode batch; a quick plan skips the rest, whose shapes these cover.
    warm = ([x for x in patterns if x[0].startswith("prefill")]
            + [x for x in patterns if x[0].startswith("decode")][-1:])
    for _, thunk in warm if plan.quick else patterns:
        thunk()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rng = np.random.default_rng([plan.seed, 0])
    d.recorder.phase = "grid"
    for _ in range(plan.repeats):
        for k in rng.permutation(len(patterns)):
            patterns[k][1]()
    d.recorder.phase = None
    grid_s = time.perf_counter() - t0
    print(f"patterns: {len(patterns)} x {plan.repeats} runs, {len(d.recorder.steps)} steps in {grid_s:.1f} s",
          file=log, flush=True)
    t0 = time.perf_counter()
    live_runs = _live(d, plan)
    live_s = time.perf_counter() - t0
    samples = [Sample(s.shape, step_ms=s.step_s * 1000, step_ms_min=s.step_s * 1000, step_ms_max=s.step_s * 1000,
                      origin=s.phase) for s in d.recorder.steps]
    out.mkdir(parents=True, exist_ok=True)
    write_samples(out / "steps.csv", samples)
    info = provenance(d) | {
        "mode": "in-process",
        "plan": asdict(plan) | {"live_loads": list(plan.live_loads)},
        "patterns": [name for name, _ in patterns],
        "live_runs": live_runs,
        "phases_s": {"startup": d.startup_s, "warmup": warmup_s, "grid": grid_s, "live": live_s},
    }
    (out / "engine.json").write_text(json.dumps(info, indent=1) + "\n")
    print(f"live: {sum(r['steps'] for r in live_runs)} steps in {live_s:.1f} s; wrote {out}", file=log, flush=True)
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help='JSON: {"engine": VllmEngineArgs, "plan": InprocPlan}')
    p.add_argument("--out", required=True, type=Path)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    try:
        config = json.loads(Path(a.config).read_text())
        plan = config.get("plan", {})
        plan["live_loads"] = tuple(plan.get("live_loads", InprocPlan.live_loads))
        run(VllmEngineArgs(**config["engine"]), InprocPlan(**plan), a.out)
    except Exception as e:  # one message for the servesim process, which shows it to the user
        from calibrate.vllm_steps import VllmApiError

        kind = "" if isinstance(e, (VllmApiError, ValueError)) else f"{type(e).__name__}: "
        (a.out / "error.txt").write_text(f"{kind}{e}\n")
        if not isinstance(e, (VllmApiError, ValueError)):
            raise
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
