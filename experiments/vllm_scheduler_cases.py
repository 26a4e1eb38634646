"""Record vLLM v1's own scheduling decisions on small scripted cases, for the ``vllm`` policy's tests.

Run with the Python of a virtual environment that has vLLM (not servesim's)::

    /work/vllm-venv/bin/python experiments/vllm_scheduler_cases.py [-o tests/data/vllm_scheduler_cases.json]

It drives ``vllm.v1.core.sched.scheduler.Scheduler`` directly: a ``VllmConfig`` for a tiny Llama
``config.json`` written to a temporary directory (no weights, no tokenizer), a ``KVCacheConfig``
of one full-attention group with the case's block count, then per step: the case's arrivals
added (``add_request``), ``schedule()``, and a fake ``ModelRunnerOutput`` with one sampled token
for every request whose cache then covers all its tokens (``update_from_output``). Recorded per
step: ``num_scheduled_tokens`` in the scheduler's order, the preempted and finished request ids,
and the free KV blocks after scheduling. The JSON holds each case's settings and requests with
vLLM's answers and version; ``tests/test_vllm_policy.py`` replays the cases through servesim's
``vllm`` policy and compares step by step (it runs without vLLM).

These are vLLM's internal APIs (the scheduler, ``SchedulerOutput``, ``ModelRunnerOutput``,
``KVCacheConfig``); a vLLM without them fails here with a message naming what is missing.
No servesim import: vLLM's environment need not have servesim installed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "vllm_scheduler_cases.json"
MAX_STEPS = 500
MAX_MODEL_LEN = 2048


def request(rid: int, step: int, prompt: int, output: int, priority: int = 0) -> dict:
    return {"id": rid, "arrival_step": step, "prompt_tokens": prompt, "output_tokens": output, "priority": priority}


def settings(*, block_size: int = 4, num_gpu_blocks: int = 64, max_num_batched_tokens: int = 16,
             max_num_seqs: int = 8, long_prefill_token_threshold: int = 0, watermark: float = 0.0,
             policy: str = "fcfs", max_model_len: int = MAX_MODEL_LEN) -> dict:
    return {"block_size": block_size, "num_gpu_blocks": num_gpu_blocks,
            "max_num_batched_tokens": max_num_batched_tokens, "max_num_seqs": max_num_seqs,
            "long_prefill_token_threshold": long_prefill_token_threshold, "watermark": watermark,
            "policy": policy, "max_model_len": max_model_len}


CASES: list[dict] = [
    {"name": "chunked_prefill_small_budget",
     "description": "three prompts under a 16-token budget: the first is chunked, the others take what is left",
     "settings": settings(max_num_batched_tokens=16),
     "requests": [request(0, 0, 30, 3), request(1, 0, 10, 4), request(2, 0, 5, 2)]},
    {"name": "max_num_seqs_cap",
     "description": "max_num_seqs 2: the third and fourth requests wait for a running slot",
     "settings": settings(max_num_batched_tokens=32, max_num_seqs=2),
     "requests": [request(0, 0, 6, 3), request(1, 0, 6, 5), request(2, 0, 6, 2), request(3, 0, 6, 4)]},
    {"name": "preempt_last_running_fcfs",
     "description": "8 usable blocks for three growing sequences: the last running request is preempted "
                    "and later recomputes its prompt and outputs",
     "settings": settings(num_gpu_blocks=9, max_num_batched_tokens=32, max_num_seqs=4),
     "requests": [request(0, 0, 8, 10), request(1, 0, 8, 10), request(2, 1, 8, 10)]},
    {"name": "arrivals_mid_run_and_finish",
     "description": "requests arrive while others decode and finish, one of a single output token",
     "settings": settings(num_gpu_blocks=32, max_num_batched_tokens=12, max_num_seqs=4),
     "requests": [request(0, 0, 9, 4), request(1, 1, 14, 3), request(2, 3, 3, 1), request(3, 4, 20, 2),
                  request(4, 6, 5, 5)]},
    {"name": "long_prefill_threshold",
     "description": "long_prefill_token_threshold 8, lifted while a request is alone",
     "settings": settings(max_num_batched_tokens=32, long_prefill_token_threshold=8),
     "requests": [request(0, 0, 40, 2), request(1, 1, 20, 3), request(2, 2, 12, 2)]},
    {"name": "priority_preemption",
     "description": "priority policy: admission by priority, the lowest-priority latest-arrival request preempted",
     "settings": settings(num_gpu_blocks=10, max_num_batched_tokens=32, max_num_seqs=4, policy="priority"),
     "requests": [request(0, 0, 8, 8, 1), request(1, 0, 8, 8, 0), request(2, 1, 8, 6, 2), request(3, 2, 4, 6, 0)]},
    {"name": "watermark_admission",
     "description": "watermark 0.2 of 20 blocks: admission stops 4 blocks short while requests run",
     "settings": settings(num_gpu_blocks=20, max_num_batched_tokens=64, watermark=0.2),
     "requests": [request(0, 0, 16, 4), request(1, 0, 16, 4), request(2, 0, 16, 4), request(3, 0, 16, 4)]},
    {"name": "whole_sequence_gate",
     "description": "a waiting prompt is admitted only when blocks for all of it are free, not just its first chunk",
     "settings": settings(num_gpu_blocks=12, max_num_batched_tokens=8, max_num_seqs=4),
     "requests": [request(0, 0, 20, 6), request(1, 1, 30, 2), request(2, 2, 4, 3)]},
    {"name": "priority_self_preemption",
     "description": "the first running request is the lowest priority and preempts itself: vLLM's step is "
                    "empty and the next one schedules the other",
     "settings": settings(num_gpu_blocks=5, max_num_batched_tokens=64, max_num_seqs=4, policy="priority"),
     "requests": [request(0, 0, 7, 4, 1), request(1, 1, 7, 4, 0)]},
]


def random_case(seed: int, policy: str) -> dict:
    """A seeded mix: bursts of arrivals, lengths that make a small pool preempt, three priority
    classes, the long-prefill cap and a watermark on some seeds."""
    rng = random.Random(seed)
    block_size = rng.choice([4, 8])
    max_num_seqs = rng.randint(3, 8)
    rows, step = [], 0
    for rid in range(24):
        step += rng.choice([0, 0, 1, 2, 3])
        rows.append(request(rid, step, rng.randint(1, 60), rng.randint(1, 30), rng.randint(0, 2)))
    longest = max(r["prompt_tokens"] + r["output_tokens"] for r in rows)
    return {"name": f"random_{policy}_{seed}",
            "description": f"seeded random mix (seed {seed}): arrivals while running, a pool that preempts",
            "settings": settings(block_size=block_size, num_gpu_blocks=-(-longest // block_size) + rng.randint(2, 12),
                                 max_num_batched_tokens=rng.choice([16, 24, 32, 64]), max_num_seqs=max_num_seqs,
                                 long_prefill_token_threshold=rng.choice([0, 0, 8]),
                                 watermark=rng.choice([0.0, 0.0, 0.1]), policy=policy),
            "requests": rows}


CASES += [random_case(seed, policy) for seed, policy in ((1, "fcfs"), (2, "fcfs"), (3, "priority"), (4, "priority"))]


def fail(message: str) -> None:
    print(f"vllm_scheduler_cases: {message}", file=sys.stderr)
    raise SystemExit(2)


def import_vllm() -> dict:
    """The vLLM names this script relies on, or a clear failure naming the missing one."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    names = {}
    wanted = [
        ("vllm", "__version__"),
        ("vllm.config", "VllmConfig"), ("vllm.config", "ModelConfig"), ("vllm.config", "CacheConfig"),
        ("vllm.config", "SchedulerConfig"),
        ("vllm.v1.core.sched.scheduler", "Scheduler"),
        ("vllm.v1.kv_cache_interface", "KVCacheConfig"), ("vllm.v1.kv_cache_interface", "KVCacheGroupSpec"),
        ("vllm.v1.kv_cache_interface", "FullAttentionSpec"),
        ("vllm.v1.structured_output", "StructuredOutputManager"),
        ("vllm.v1.request", "Request"), ("vllm.v1.outputs", "ModelRunnerOutput"),
        ("vllm.sampling_params", "SamplingParams"),
    ]
    import importlib

    for module, attr in wanted:
        try:
            names[attr] = getattr(importlib.import_module(module), attr)
        except ImportError as e:
            fail(f"cannot import {module} ({e}); run this with the Python of an environment that has vLLM")
        except AttributeError:
            fail(f"this vLLM has no {module}.{attr}, which the script drives")
    return names


def tiny_model_dir() -> str:
    """A tiny Llama config.json (no weights): vLLM's ModelConfig reads only the config."""
    from transformers import LlamaConfig

    d = tempfile.mkdtemp(prefix="vllm-cases-")
    LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=MAX_MODEL_LEN).save_pretrained(d)
    return d


def make_scheduler(v: dict, model_dir: str, s: dict):
    import torch

    model = v["ModelConfig"](model=model_dir, skip_tokenizer_init=True, max_model_len=s["max_model_len"],
                             dtype="float32")
    sched = v["SchedulerConfig"](max_num_batched_tokens=s["max_num_batched_tokens"], max_num_seqs=s["max_num_seqs"],
                                 max_model_len=s["max_model_len"], is_encoder_decoder=False,
                                 enable_chunked_prefill=True, policy=s["policy"],
                                 long_prefill_token_threshold=s["long_prefill_token_threshold"],
                                 watermark=s["watermark"])
    cache = v["CacheConfig"](block_size=s["block_size"], enable_prefix_caching=False)
    cache.num_gpu_blocks = s["num_gpu_blocks"]
    config = v["VllmConfig"](model_config=model, cache_config=cache, scheduler_config=sched)
    got = {"block_size": config.cache_config.block_size,
           "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
           "max_num_seqs": config.scheduler_config.max_num_seqs, "policy": config.scheduler_config.policy,
           "async_scheduling": bool(config.scheduler_config.async_scheduling),
           "enable_prefix_caching": bool(config.cache_config.enable_prefix_caching)}
    want = {k: s[k] for k in ("block_size", "max_num_batched_tokens", "max_num_seqs", "policy")}
    want |= {"async_scheduling": False, "enable_prefix_caching": False}
    if got != want:
        fail(f"vLLM changed the case's settings: asked {want}, got {got}")
    spec = v["FullAttentionSpec"](block_size=s["block_size"], num_kv_heads=2, head_size=16, dtype=torch.float32)
    kv_config = v["KVCacheConfig"](num_blocks=s["num_gpu_blocks"], kv_cache_tensors=[],
                                   kv_cache_groups=[v["KVCacheGroupSpec"](["model.layers.0.self_attn"], spec)])
    return v["Scheduler"](vllm_config=config, kv_cache_config=kv_config,
                          structured_output_manager=v["StructuredOutputManager"](config), block_size=s["block_size"])


def vllm_id(rid: int) -> str:
    # Zero-padded so that vLLM's string comparison of request ids (a priority-heap tie-break)
    # orders them as servesim's integer ids.
    return f"{rid:04d}"


def run_case(v: dict, model_dir: str, case: dict) -> list[dict]:
    scheduler = make_scheduler(v, model_dir, case["settings"])
    pending = sorted(case["requests"], key=lambda r: (r["arrival_step"], r["id"]))
    unfinished = {vllm_id(r["id"]) for r in pending}
    steps = []
    for k in range(MAX_STEPS):
        while pending and pending[0]["arrival_step"] <= k:
            r = pending.pop(0)
            params = v["SamplingParams"](max_tokens=r["output_tokens"], ignore_eos=True)
            scheduler.add_request(v["Request"](vllm_id(r["id"]), list(range(1, r["prompt_tokens"] + 1)), params, None,
                                               arrival_time=float(r["arrival_step"]), priority=r["priority"]))
        out = scheduler.schedule()
        scheduled = [[int(rid), int(n)] for rid, n in out.num_scheduled_tokens.items()]
        record = {"step": k, "scheduled": scheduled, "preempted": sorted(int(x) for x in out.preempted_req_ids),
                  "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(), "finished": []}
        if scheduled:
            ids = list(out.num_scheduled_tokens)
            sampled = []
            for rid in ids:
                req = scheduler.requests[rid]
                # After schedule() vLLM has advanced num_computed_tokens; a request whose cache
                # now covers every token samples one (a prefill chunk samples none).
                sampled.append([7] if req.num_computed_tokens >= req.num_tokens else [])
            output = v["ModelRunnerOutput"](req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                            sampled_token_ids=sampled)
            for outs in scheduler.update_from_output(out, output).values():
                for o in outs.outputs:
                    if o.finish_reason is not None:
                        record["finished"].append(int(o.request_id))
                        unfinished.discard(o.request_id)
            record["finished"].sort()
        steps.append(record)
        if not unfinished and not pending:
            return steps
        if not scheduled and not pending and not record["preempted"]:
            fail(f"case {case['name']}: vLLM scheduled nothing at step {k} with requests unfinished")
    fail(f"case {case['name']}: not finished after {MAX_STEPS} steps")
    return steps


def dump(doc: dict) -> str:
    """The cases as JSON with one line per case header and per step (diffs read step by step)."""
    cases = []
    for case in doc["cases"]:
        head = json.dumps({k: v for k, v in case.items() if k != "steps"})[:-1]
        steps = ",\n".join("  " + json.dumps(step) for step in case["steps"])
        cases.append(f'{head}, "steps": [\n{steps}\n ]}}')
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"})[:-1]
    return head + ', "cases": [\n' + ",\n".join(cases) + "\n]}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    v = import_vllm()
    model_dir = tiny_model_dir()
    cases = []
    for case in CASES:
        steps = run_case(v, model_dir, case)
        cases.append(case | {"steps": steps})
        print(f"{case['name']}: {len(steps)} steps, "
              f"{sum(len(s['preempted']) for s in steps)} preemptions", file=sys.stderr)
    doc = {"vllm_version": v["__version__"],
           "source": "vllm.v1.core.sched.scheduler.Scheduler driven by experiments/vllm_scheduler_cases.py",
           "null_blocks": 1, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(doc))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
