"""``servesim serve``: the live engine behind the OpenAI-compatible HTTP API (aiohttp).

Two threads. The event loop takes HTTP requests, validates them, hands each to the engine as an
:class:`~runtime.engine.Arrival` on a queue, and streams the tokens back as they come. The
engine thread runs :meth:`LiveEngine.serve` - the scheduler loop on a wall clock - and after
every step posts the step's tokens to the event loop (``call_soon_threadsafe``), so a request
joins the running batch at the next step after it arrives, as in any continuous-batching server.

Endpoints (vLLM's shapes, so its benchmark client and others drive this server unchanged):

- ``POST /v1/completions`` - ``prompt`` as text or token ids (one prompt per request),
  ``max_tokens`` (default 16), ``stream`` (SSE, ``data: [DONE]`` at the end) with
  ``stream_options.include_usage`` / ``continuous_usage_stats``, ``ignore_eos``. Sampling is
  greedy; other sampling fields are accepted and ignored.
- ``GET /v1/models``, ``GET /health`` (503 once the engine has failed), ``GET /metrics``
  (Prometheus text under vLLM's metric names, plus ``servesim:`` ones where vLLM has none).
- ``POST /tokenize``, ``POST /detokenize`` (vLLM's; its benchmark client checks its prompt
  lengths with them).

A bad request gets HTTP 400 with an OpenAI-style error body naming the field, and changes
nothing for the requests already running. A client that goes away mid-stream has its request
cancelled: it stops at its next token.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from runtime.engine import Arrival, Cancel, EngineState, LiveEngine
from runtime.tokenizer import Tokenizer
from sim.request import Request

DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP side needs to know; the engine is built separately."""

    model_name: str
    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    num_host_blocks: int = 0
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (``CompletionServer.port`` says which)."""

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")


class BadRequest(Exception):
    """A client error: HTTP 400 with ``param`` naming the field."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> web.Response:
    """OpenAI's error body (vLLM's too)."""
    kind = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed"}.get(status, "InternalServerError")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code if code is not None else status}}
    return web.json_response(body, status=status)


@dataclass(frozen=True)
class Completion:
    """A validated ``/v1/completions`` body."""

    prompt_ids: list[int]
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    ignore_eos: bool


def _flag(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return value


def parse_completion(body: Any, config: ServerConfig, tokenizer: Tokenizer) -> Completion:
    """Check a request body against the model; every problem names its field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != config.model_name:
        raise BadRequest(f"the model '{model}' does not exist; this server serves '{config.model_name}'",
                         "model", "model_not_found")
    if "prompt" not in body or body["prompt"] is None:
        raise BadRequest("'prompt' is required (text or a list of token ids)", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        if len(prompt) != 1:
            raise BadRequest(f"one prompt per request is supported, got {len(prompt)}", "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
        bad = next((t for t in ids if not 0 <= t < config.vocab_size), None)
        if bad is not None:
            raise BadRequest(f"token id {bad} is out of the vocabulary (0..{config.vocab_size - 1})", "prompt")
    else:
        raise BadRequest("'prompt' must be a string or a list of token ids", "prompt")
    if not ids:
        raise BadRequest("the prompt is empty", "prompt")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
        raise BadRequest(f"'max_tokens' must be an integer, got {json.dumps(max_tokens)}", "max_tokens")
    if max_tokens < 1:
        raise BadRequest(f"'max_tokens' must be at least 1, got {max_tokens}", "max_tokens")
    if len(ids) + max_tokens > config.max_model_len:
        raise BadRequest(
            f"This model's maximum context length is {config.max_model_len} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion).",
            "prompt" if len(ids) >= config.max_model_len else "max_tokens")
    n = body.get("n", 1)
    if n != 1:
        raise BadRequest(f"'n' must be 1 (one completion per request), got {json.dumps(n)}", "n")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    return Completion(ids, max_tokens, _flag(body, "stream"), _flag(options, "include_usage"),
                      _flag(options, "continuous_usage_stats"), _flag(body, "ignore_eos"))


@dataclass
class _Stream:
    """The event loop's view of one request in the engine."""

    request: Request
    max_tokens: int
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    """("token", id) ... then ("done", finish_reason) | ("rejected", reason) | ("error", message)."""


@dataclass
class Counters:
    """Monotonic counters for /metrics (event-loop thread only)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: {"length": 0, "stop": 0, "abort": 0})


class EngineBridge:
    """Runs a :class:`LiveEngine` on its own thread and connects it to one asyncio loop."""

    def __init__(self, engine: LiveEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self.inbox: queue.Queue[Arrival | Cancel | None] = queue.Queue()
        self.streams: dict[int, _Stream] = {}
        self.state = EngineState()
        self.counters = Counters()
        self.error: str | None = None
        self._ids = itertools.count()  # this server's request ids
        self._t0 = engine.clock()
        self._thread = threading.Thread(target=self._run, name="servesim-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout_s: float = 30.0) -> None:
        self.inbox.put(None)
        self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, c: Completion, stop_ids: frozenset[int]) -> _Stream:
        """Queue a request for the engine (event-loop thread)."""
        r = Request(next(self._ids), self.engine.clock() - self._t0, len(c.prompt_ids), c.max_tokens)
        stream = _Stream(r, c.max_tokens)
        self.streams[r.id] = stream
        self.counters.prompt_tokens += len(c.prompt_ids)
        self.inbox.put(Arrival(r, c.prompt_ids, stop_ids))
        return stream

    def cancel(self, stream: _Stream) -> None:
        if self.streams.pop(stream.request.id, None) is not None:
            self.counters.finished["abort"] += 1
            self.inbox.put(Cancel(stream.request.id))

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine.serve(self.inbox, self, self._t0)
        except Exception as e:  # the engine is gone: every waiting client must hear it
            self.error = f"engine failed: {type(e).__name__}: {e}"
            self.loop.call_soon_threadsafe(self._fail_all)

    def on_rejected(self, request: Request) -> None:
        self.loop.call_soon_threadsafe(self._post, request.id, ("rejected", request.reject_reason or "rejected"))

    def on_step(self, end_s: float, tokens: dict[int, int], finished: list[Request], state: EngineState) -> None:
        done = [(r.id, r.num_generated) for r in finished]
        self.loop.call_soon_threadsafe(self._deliver, dict(tokens), done, state)

    # -- event-loop thread -----------------------------------------------------------------------
    def _post(self, request_id: int, event: tuple[str, Any]) -> None:
        stream = self.streams.pop(request_id, None) if event[0] != "token" else self.streams.get(request_id)
        if stream is not None:
            stream.events.put_nowait(event)

    def _deliver(self, tokens: dict[int, int], done: list[tuple[int, int]], state: EngineState) -> None:
        self.state = state
        for request_id, tok in tokens.items():
            if request_id in self.streams:
                self.counters.generation_tokens += 1
                self.streams[request_id].events.put_nowait(("token", tok))
        for request_id, generated in done:
            stream = self.streams.get(request_id)
            if stream is not None:
                reason = "length" if generated >= stream.max_tokens else "stop"
                self.counters.finished[reason] += 1
                self._post(request_id, ("done", reason))

    def _fail_all(self) -> None:
        for request_id in list(self.streams):
            self._post(request_id, ("error", self.error or "engine failed"))


class CompletionServer:
    """The aiohttp application around an :class:`EngineBridge`."""

    def __init__(self, engine: LiveEngine, tokenizer: Tokenizer, config: ServerConfig) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.config = config
        self.bridge: EngineBridge | None = None
        self.port: int | None = None
        self.created = int(time.time())
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        return app

    async def start(self) -> int:
        """Start the engine thread and listen; returns the bound port."""
        self.bridge = EngineBridge(self.engine, asyncio.get_running_loop())
        self.bridge.start()
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self.bridge is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.bridge.close)

    # -- handlers ----------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        bridge = self.bridge
        if bridge is None or not bridge.alive:
            return error_response(503, bridge.error if bridge and bridge.error else "engine not running")
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        c = self.config
        card = {"id": c.model_name, "object": "model", "created": self.created, "owned_by": "servesim",
                "root": c.model_name, "parent": None, "max_model_len": c.max_model_len}
        return web.json_response({"object": "list", "data": [card]})

    async def _json_body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None

    async def tokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
            if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
                raise BadRequest("'prompt' must be a string", "prompt")
        except BadRequest as e:
            return error_response(400, str(e), e.param)
        ids = self.tokenizer.encode(body["prompt"])
        return web.json_response({"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids})

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = await self._json_body(request)
            ids = body.get("tokens") if isinstance(body, dict) else None
            if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < self.config.vocab_size
                                                    for t in ids):
                raise BadRequest(f"'tokens' must be a list of ids in 0..{self.config.vocab_size - 1}", "tokens")
        except BadRequest as e:
            return error_response(400, str(e), e.param)
        return web.json_response({"prompt": self.tokenizer.decode(ids)})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        assert self.bridge is not None
        try:
            c = parse_completion(await self._json_body(request), self.config, self.tokenizer)
        except BadRequest as e:
            return error_response(400, str(e), e.param, e.code)
        if not self.bridge.alive:
            return error_response(500, self.bridge.error or "engine not running")
        eos = self.tokenizer.eos_token_id
        stream = self.bridge.submit(c, frozenset() if c.ignore_eos or eos is None else frozenset([eos]))
        try:
            kind, value = await stream.events.get()
            if kind == "rejected":
                return error_response(400, f"the request can never run on this engine: {value}", "prompt")
            if kind == "error":
                return error_response(500, value)
            if c.stream:
                return await self._stream(request, c, stream, value)
            return await self._whole(c, stream, value)
        finally:
            self.bridge.cancel(stream)  # no-op once finished; a client gone mid-way frees its slot

    def _head(self, cmpl_id: str) -> dict[str, Any]:
        return {"id": cmpl_id, "object": "text_completion", "created": int(time.time()),
                "model": self.config.model_name}

    def _usage(self, c: Completion, generated: int) -> dict[str, int]:
        n = len(c.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": generated, "total_tokens": n + generated}

    def _text(self, prev: int | None, tok: int) -> str:
        """The text one token adds (decoded after the one before, so that spaces come out right)."""
        if prev is None:
            return self.tokenizer.decode([tok])
        return self.tokenizer.decode([prev, tok])[len(self.tokenizer.decode([prev])):]

    async def _whole(self, c: Completion, stream: _Stream, first: int) -> web.Response:
        ids = [first]
        while True:
            kind, value = await stream.events.get()
            if kind == "token":
                ids.append(value)
            elif kind == "done":
                break
            else:
                return error_response(500, value)
        choice = {"index": 0, "text": self.tokenizer.decode(ids), "logprobs": None, "finish_reason": value,
                  "stop_reason": None}
        body = self._head(f"cmpl-{uuid.uuid4().hex}") | {"choices": [choice], "usage": self._usage(c, len(ids))}
        return web.json_response(body)

    async def _stream(self, request: web.Request, c: Completion, stream: _Stream, first: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        head = self._head(f"cmpl-{uuid.uuid4().hex}")
        prev: int | None = None
        tok: int | None = first
        generated = 0
        finish: str | None = None
        while tok is not None:
            kind, value = await stream.events.get()  # the next event says whether ``tok`` is the last
            if kind == "error":
                await resp.write(f"data: {json.dumps({'error': {'message': value, 'code': 500}})}\n\n".encode())
                return resp
            generated += 1
            finish = value if kind == "done" else None
            choice = {"index": 0, "text": self._text(prev, tok), "logprobs": None, "finish_reason": finish,
                      "stop_reason": None}
            chunk = head | {"choices": [choice]}
            if c.continuous_usage:
                chunk["usage"] = self._usage(c, generated)
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            prev, tok = tok, (value if kind == "token" else None)
        if c.include_usage:
            await resp.write(f"data: {json.dumps(head | {'choices': [], 'usage': self._usage(c, generated)})}\n\n"
                             .encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def metrics(self, request: web.Request) -> web.Response:
        assert self.bridge is not None
        return web.Response(text=prometheus_text(self.config, self.bridge.state, self.bridge.counters),
                            content_type="text/plain", charset="utf-8")


def prometheus_text(config: ServerConfig, state: EngineState, counters: Counters) -> str:
    """The exposition format; vLLM's names where vLLM has the metric."""
    label = f'model_name="{config.model_name}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{{{labels}}} {float(value)!r}")

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           [(label, state.num_running)])
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [(label, state.num_waiting)])
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.",
           [(label, state.kv_blocks_used / config.num_kv_blocks)])
    info = (f'block_size="{config.block_size}",num_gpu_blocks="{config.num_kv_blocks}",'
            f'num_cpu_blocks="{config.num_host_blocks}",enable_prefix_caching="False"')
    metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig.", [(info, 1)])
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.",
           [(label, counters.prompt_tokens)])
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
           [(label, counters.generation_tokens)])
    metric("vllm:request_success_total", "counter", "Count of successfully processed requests.",
           [(f'{label},finished_reason="{k}"', v) for k, v in counters.finished.items() if k != "abort"])
    metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.",
           [(label, state.num_preemptions)])
    metric("servesim:kv_blocks_used", "gauge", "KV blocks in use.", [(label, state.kv_blocks_used)])
    metric("servesim:kv_blocks_total", "gauge", "KV blocks in the device pool.", [(label, config.num_kv_blocks)])
    metric("servesim:kv_block_size", "gauge", "Tokens per KV block.", [(label, config.block_size)])
    metric("servesim:requests_aborted_total", "counter", "Requests whose client went away before the end.",
           [(label, counters.finished["abort"])])
    metric("servesim:engine_steps_total", "counter", "Engine steps run.", [(label, state.steps)])
    return "\n".join(lines) + "\n"
