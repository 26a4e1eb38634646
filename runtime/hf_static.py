"""A static-batching reference engine on transformers' own ``generate``.

Requests are batched as the ``static`` policy does (wait for ``batch_size`` requests or until
the oldest has waited ``max_wait_s``), left-padded to the longest prompt and run to completion
by one ``generate`` call with ``max_new_tokens = min_new_tokens =`` the longest output (EOS
cannot stop it early). Prompt ids are the same synthetic ones the servesim runner uses.

Per-token times come from a streamer: ``generate`` hands each step's tokens to
``streamer.put`` (after the prompt), so the k-th put is the time every sequence's k-th output
token exists. A request finishes at its own last token, as in the simulator's ``static``
policy; its slot keeps computing padding until the whole batch returns.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm
from transformers import GenerationConfig
from transformers.generation.streamers import BaseStreamer

from runtime.engine import LiveResult
from runtime.runner import prompt_token_ids
from sim.batch import StepShape, chunk_attention
from sim.engine import ReplicaStats
from sim.kv import blocks_for
from sim.request import Request, Status

PAD_ID = 0


class _StepClock(BaseStreamer):
    """Calls ``on_step(tokens)`` at every generated token step (the first put is the prompt)."""

    def __init__(self, on_step: Callable[[torch.Tensor], None]) -> None:
        self.on_step = on_step
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.on_step(value)

    def end(self) -> None:
        pass


class HFStaticEngine:
    """Serve requests with padded fixed batches on a transformers ``*ForCausalLM``."""

    def __init__(self, hf_model: Any, batch_size: int = 16, max_wait_s: float = 1.0, seed: int = 0,
                 block_size: int = 16, progress: bool = False,
                 clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.model = hf_model
        self.batch_size = batch_size
        self.max_wait_s = max_wait_s
        self.seed = seed
        self.block_size = block_size  # only to report KV use in the time series
        self.progress = progress
        self.clock = clock
        self.sleep = sleep
        self.vocab_size = hf_model.config.vocab_size
        self.device = hf_model.device

    def run(self, requests: Sequence[Request], token_times: bool = False, warmup: bool = True) -> LiveResult:
        """Serve ``requests`` (sorted by arrival) until every one finished; ``warmup`` runs a
        small untimed ``generate`` first."""
        if any(b.arrival_s < a.arrival_s for a, b in itertools.pairwise(requests)):
            raise ValueError("requests must be sorted by arrival_s")
        if token_times:
            for r in requests:
                r.token_times_s = []
        if warmup:
            self._warmup()
        stats = ReplicaStats()
        step_log: list[tuple[StepShape, float]] = []
        outputs: dict[int, list[int]] = {}
        pending = list(reversed(requests))
        queue: list[Request] = []
        bar = tqdm(total=len(requests), disable=not self.progress, unit="req", desc="hf-static")
        t0 = self.clock()

        def now() -> float:
            return self.clock() - t0

        while pending or queue:
            t = now()
            while pending and pending[-1].arrival_s <= t:
                queue.append(pending.pop())
            wake_s = queue[0].arrival_s + self.max_wait_s if queue else None
            if wake_s is not None and (len(queue) >= self.batch_size or t >= wake_s):
                batch, queue = queue[: self.batch_size], queue[self.batch_size:]
                stats.timeseries.record(t, len(batch), len(queue), len(batch), 0)

                def waiting(at: float, queue: list[Request] = queue) -> int:
                    return len(queue) + sum(1 for r in pending if r.arrival_s <= at)

                self._generate(batch, t, now, waiting, stats, step_log, outputs)
                bar.update(len(batch))
                continue
            targets = [x for x in (wake_s, pending[-1].arrival_s if pending else None) if x is not None]
            stats.timeseries.record(t, 0, len(queue), 0, 0)
            self.sleep(max(0.0, min(targets) - now()))
        bar.close()
        return LiveResult(requests=list(requests), replicas=[stats], num_preemptions=0, step_log=step_log,
                          outputs=outputs)

    def _warmup(self) -> None:
        ids = torch.tensor([prompt_token_ids(self.seed, 2**62, 16, self.vocab_size)], device=self.device)
        config = GenerationConfig(max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=PAD_ID,
                                  eos_token_id=None)
        with torch.inference_mode():
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)

    def _generate(self, batch: list[Request], start_s: float, now: Callable[[], float],
                  waiting: Callable[[float], int], stats: ReplicaStats,
                  step_log: list[tuple[StepShape, float]], outputs: dict[int, list[int]]) -> None:
        pad_len = max(r.prompt_tokens for r in batch)
        new_tokens = max(r.output_tokens for r in batch)
        ids = torch.full((len(batch), pad_len), PAD_ID, dtype=torch.int64)
        mask = torch.zeros((len(batch), pad_len), dtype=torch.int64)
        for i, r in enumerate(batch):
            prompt = prompt_token_ids(self.seed, r.id, r.prompt_tokens, self.vocab_size)
            ids[i, pad_len - r.prompt_tokens:] = torch.tensor(prompt)
            mask[i, pad_len - r.prompt_tokens:] = 1
            r.status = Status.RUNNING
            r.first_scheduled_s = start_s
            outputs[r.id] = []
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  num_beams=1, pad_token_id=PAD_ID, eos_token_id=None)
        steps_done, last_s = 0, start_s

        def on_step(tokens: torch.Tensor) -> None:
            nonlocal steps_done, last_s
            t = now()
            k = steps_done
            gaps = 0
            for r, tok in zip(batch, tokens.tolist(), strict=True):
                if r.num_generated >= r.output_tokens:
                    continue  # padding: the slot waits for the batch
                if r.last_token_s is not None:
                    gaps += 1
                r.record_token(t)
                outputs[r.id].append(tok)
                if r.is_done:
                    r.status = Status.FINISHED
                    r.finish_s = t
            if gaps:
                stats.itl.add(t - last_s, gaps)
            n = len(batch)
            if k == 0:
                shape = StepShape(prefill_tokens=n * pad_len, prefill_seqs=n,
                                  prefill_attention_tokens=n * chunk_attention(pad_len, 0))
            else:
                shape = StepShape(decode_seqs=n, decode_context_tokens=n * (pad_len + k - 1))
            step_log.append((shape, t - last_s))
            stats.steps += 1
            stats.busy_s += t - last_s
            active = sum(not r.is_done for r in batch)
            stats.timeseries.record(t, n, waiting(t), active, n * blocks_for(pad_len + k + 1, self.block_size))
            steps_done, last_s = k + 1, t

        with torch.inference_mode():
            self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                generation_config=config, streamer=_StepClock(on_step))
