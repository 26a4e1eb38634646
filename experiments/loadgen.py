"""The HTTP load generator behind ``servesim bench``: a workload's requests replayed against any
OpenAI-compatible server (vLLM, SGLang, TGI, TensorRT-LLM, llama.cpp, ``servesim serve``).

Each request is sent at its arrival time (asyncio, aiohttp), at most ``max_concurrency`` at
once when given, to ``/v1/completions`` with ``stream: true``. The prompt is a list of token
ids of exactly the request's length, drawn from ``default_rng([seed, id])`` over ``vocab_size``
ids, so that no two requests share a prefix; ``max_tokens`` is its output length and
``ignore_eos`` (vLLM's and SGLang's extension) keeps the length.

Every streamed chunk's arrival is recorded. The tokens a chunk carries come from the stream's
own counts (``stream_options.continuous_usage_stats``, vLLM's extension, else one per chunk);
the final ``usage`` is the length received, and a length that differs from the one asked for
is reported, not hidden. Times are as ``vllm bench serve`` takes them: from just before the
request is sent to each chunk, and to the end of the stream.

The results are the simulator's :class:`~sim.request.Request` objects (a failed request is
``Status.FAILED`` with its reason in ``reject_reason``), so that ``sim.metrics.summarize`` and
the run-directory writer take them unchanged. Failure kinds: ``http_<status>``, ``timeout``,
``connection`` (no response), ``stream_cut`` (the stream ended before ``[DONE]``),
``stream_error`` (an error object in the stream), ``bad_response`` (not SSE JSON),
``empty_stream`` (no token at all) and ``interrupted`` (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
from tqdm import tqdm

from sim.metrics import GapRecorder, TimeSeries
from sim.request import Request, Status

PROBE_TIMEOUT_S = 10.0
NOT_OBSERVED = -1
"""Written for ``batch_size`` and ``kv_blocks_used`` in a client's time series: only the server sees them."""


class BenchError(Exception):
    """The run cannot start (no server, wrong model); the message is for people."""


@dataclass(frozen=True)
class BenchConfig:
    url: str
    """Base URL, ``http://HOST:PORT`` (a trailing ``/v1`` is accepted)."""
    model: str | None = None
    """None: the first model the server lists."""
    timeout_s: float = 300.0
    """Per request, from sending it to the end of its stream."""
    max_concurrency: int | None = None
    seed: int = 0
    vocab_size: int = 4096
    """Prompt ids are drawn from 0..vocab_size-1 (keep it within the server's vocabulary)."""
    ignore_eos: bool = True
    token_times: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url must be http://HOST:PORT or https://HOST:PORT, got {self.url!r}")
        try:
            parts.port  # noqa: B018 - validates the port
        except ValueError:
            raise ValueError(f"url {self.url!r}: the port is not a number in 0..65535") from None
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {self.max_concurrency}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")

    @property
    def base_url(self) -> str:
        base = self.url.rstrip("/")
        return base[: -len("/v1")] if base.endswith("/v1") else base


@dataclass
class BenchResult:
    requests: list[Request]
    itl: GapRecorder
    series: TimeSeries
    model: str
    interrupted: bool = False
    errors: dict[int, str] = field(default_factory=dict)
    """Request id -> the server's or the transport's message, for failed requests."""

    def failed_reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.requests:
            if r.status is Status.FAILED:
                key = r.reject_reason or "unknown"
                out[key] = out.get(key, 0) + 1
        return dict(sorted(out.items()))

    def mismatches(self) -> list[Request]:
        """Finished requests that received a different number of tokens than they asked for."""
        return [r for r in self.requests if r.status is Status.FINISHED and r.num_generated != r.output_tokens]


def prompt_ids(seed: int, request_id: int, num_tokens: int, vocab_size: int) -> list[int]:
    """The request's prompt: its own random ids (the runtime's synthetic prompts use the same rule)."""
    return np.random.default_rng([seed, request_id]).integers(vocab_size, size=num_tokens).tolist()


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class _Tracker:
    """Requests in flight and waiting for a concurrency slot, as a time series."""

    series: TimeSeries
    clock: Callable[[], float]
    in_flight: int = 0
    waiting: int = 0

    def record(self) -> None:
        self.series.record(self.clock(), NOT_OBSERVED, self.waiting, self.in_flight, NOT_OBSERVED)


async def probe(session: aiohttp.ClientSession, config: BenchConfig) -> str:
    """The model to use, from ``GET /v1/models``; BenchError when the server is not there."""
    url = f"{config.base_url}/v1/models"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S)) as resp:
            if resp.status != 200:
                raise BenchError(f"{url} answered HTTP {resp.status}: is this an OpenAI-compatible server?")
            try:
                listing = await resp.json(content_type=None)
                names = [m["id"] for m in listing["data"]]
            except (ValueError, KeyError, TypeError):
                raise BenchError(f"{url} did not answer with a model list") from None
    except asyncio.TimeoutError:
        raise BenchError(f"{url}: no answer within {PROBE_TIMEOUT_S:g} s") from None
    except aiohttp.ClientConnectorError as e:
        why = e.os_error.strerror or str(e.os_error)
        raise BenchError(f"cannot reach {config.base_url}: {why.lower()}") from None
    except aiohttp.ClientError as e:
        raise BenchError(f"cannot reach {config.base_url}: {e or type(e).__name__}") from None
    if config.model is not None:
        if config.model not in names:
            raise BenchError(f"the server does not serve model {config.model!r}; it lists: {', '.join(names)}")
        return config.model
    if not names:
        raise BenchError(f"{url} lists no models")
    return names[0]


async def _send(session: aiohttp.ClientSession, config: BenchConfig, model: str, r: Request,
                clock: Callable[[], float]) -> tuple[list[tuple[float, int]], int | None]:
    """Stream one completion: (chunk arrival time, tokens in it) for each chunk that carried
    tokens, and the completion tokens the final usage reports (None if none). Sets
    ``r.arrival_s`` to the send time. Raises _Failure."""
    payload = {
        "model": model, "prompt": prompt_ids(config.seed, r.id, r.prompt_tokens, config.vocab_size),
        "max_tokens": r.output_tokens, "stream": True, "ignore_eos": config.ignore_eos, "temperature": 0.0,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    chunks: list[tuple[float, int]] = []
    counted = 0  # tokens attributed to chunks so far
    usage: int | None = None
    done = finished = False
    got_bytes = False
    r.arrival_s = clock()
    try:
        async with session.post(f"{config.base_url}/v1/completions", json=payload,
                                timeout=aiohttp.ClientTimeout(total=config.timeout_s)) as resp:
            got_bytes = True
            if resp.status != 200:
                text = await resp.text()
                raise _Failure(f"http_{resp.status}", _error_message(text) or f"HTTP {resp.status}")
            async for raw in resp.content:
                line = raw.strip()
                if not line or line.startswith(b":"):
                    continue  # SSE keep-alive comments
                if not line.startswith(b"data:"):
                    raise _Failure("bad_response", f"not an SSE data line: {line[:80]!r}")
                data = line[5:].strip()
                if data == b"[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data)
                except json.JSONDecodeError:
                    raise _Failure("bad_response", f"not JSON: {data[:80]!r}") from None
                if not isinstance(chunk, dict):
                    raise _Failure("bad_response", f"not a JSON object: {data[:80]!r}")
                if "error" in chunk:
                    raise _Failure("stream_error", _error_message(json.dumps(chunk)) or "error in stream")
                t = clock()
                reported = (chunk.get("usage") or {}).get("completion_tokens")
                choices = chunk.get("choices") or []
                if choices:
                    # The stream's running count says how many tokens this chunk brought (several
                    # when a server batches them); without it, one per chunk.
                    k = max(0, reported - counted) if isinstance(reported, int) else 1
                    if k:
                        chunks.append((t, k))
                        counted += k
                    finished = finished or choices[0].get("finish_reason") is not None
                if isinstance(reported, int):
                    usage = reported
    except asyncio.TimeoutError:
        raise _Failure("timeout", f"no complete answer within {config.timeout_s:g} s") from None
    except aiohttp.ClientPayloadError as e:
        raise _Failure("stream_cut", f"the stream broke off: {e}") from None
    except aiohttp.ClientError as e:
        raise _Failure("stream_cut" if got_bytes else "connection", str(e) or type(e).__name__) from None
    if not (done or finished):
        raise _Failure("stream_cut", f"the stream ended after {counted} tokens without [DONE]")
    if not chunks:
        raise _Failure("empty_stream", "the stream ended without a token")
    return chunks, usage


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
        err = body.get("error", body) if isinstance(body, dict) else body
        message = err.get("message") if isinstance(err, dict) else err
        return str(message)[:300]
    except (json.JSONDecodeError, AttributeError):
        return text.strip()[:300]


def _account(r: Request, chunks: list[tuple[float, int]], usage: int | None, end_s: float,
             keep_times: bool) -> list[float]:
    """Fill ``r`` from its stream; returns its inter-token gaps (a chunk of k tokens gives one
    gap and k - 1 zeros). Tokens the final usage counts beyond the chunks' are put at the last chunk."""
    if usage is not None and usage > sum(k for _, k in chunks) and chunks:
        t, k = chunks[-1]
        chunks[-1] = (t, k + usage - sum(k for _, k in chunks))
    if keep_times:
        r.token_times_s = []
    gaps: list[float] = []
    prev: float | None = None
    for t, k in chunks:
        r.record_tokens([t] * k)
        if prev is not None:
            gaps.append(t - prev)
        gaps.extend([0.0] * (k - 1))
        prev = t
    if usage is not None and usage < r.num_generated:
        r.num_generated = usage  # the server's own count wins over chunks that carried none
    r.finish_s = end_s
    return gaps


async def _run(config: BenchConfig, requests: Sequence[Request], stop: asyncio.Event,
               connector_limit: int) -> BenchResult:
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    itl = GapRecorder()
    tracker = _Tracker(TimeSeries(), clock)
    errors: dict[int, str] = {}
    sem = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
    connector = aiohttp.TCPConnector(limit=connector_limit)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        model = await probe(session, config)
        bar = tqdm(total=len(requests), disable=not config.progress, unit="req", desc="bench")
        t0 = time.perf_counter()  # the trace's time 0 is after the probe

        async def one(r: Request) -> None:
            tracker.waiting += 1
            tracker.record()
            if sem is not None:
                await sem.acquire()
            tracker.waiting -= 1
            tracker.in_flight += 1
            tracker.record()
            r.status = Status.RUNNING
            try:
                chunks, usage = await _send(session, config, model, r, clock)
                gaps = _account(r, chunks, usage, clock(), config.token_times)
                r.status = Status.FINISHED
                for g in gaps:
                    itl.add(g)
            except _Failure as f:
                r.status, r.reject_reason = Status.FAILED, f.kind
                errors[r.id] = str(f)
            except asyncio.CancelledError:
                r.status, r.reject_reason = Status.FAILED, "interrupted"
                errors[r.id] = "interrupted before the end of its stream"
            finally:
                if sem is not None:
                    sem.release()
                tracker.in_flight -= 1
                tracker.record()
                bar.update(1)
                failed = len(errors)
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)

        tasks: list[asyncio.Task] = []
        stopper = asyncio.ensure_future(stop.wait())
        for r in sorted(requests, key=lambda r: (r.arrival_s, r.id)):
            delay = r.arrival_s - clock()
            if delay > 0:
                await asyncio.wait([stopper], timeout=delay)
            if stop.is_set():
                break
            tasks.append(asyncio.ensure_future(one(r)))
        if tasks:
            pending = {*tasks}
            while pending and not stop.is_set():
                _, pending = await asyncio.wait(pending | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopper)
            for task in pending:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        stopper.cancel()
    bar.close()
    return BenchResult(list(requests), itl, tracker.series, model, interrupted=stop.is_set(), errors=errors)


def run_bench(config: BenchConfig, requests: Sequence[Request]) -> BenchResult:
    """Replay ``requests`` (fresh, arrival times from 0) against the server; Ctrl-C (SIGINT)
    stops sending, cancels what is in flight and returns what finished. Raises BenchError
    before sending anything when the server cannot be used."""

    async def main() -> BenchResult:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handled = True
        try:
            loop.add_signal_handler(signal.SIGINT, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread
            handled = False
        try:
            # Connections: as many as may be in flight (vLLM's client does the same).
            return await _run(config, requests, stop, config.max_concurrency or 0)
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGINT)

    return asyncio.run(main())
