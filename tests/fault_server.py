"""A small OpenAI-style completions server on 127.0.0.1 that misbehaves on purpose, for the
load generator's fault tests. What a request gets is chosen by its prompt's length (the
client sends exactly the trace's length), so a trace of lengths is a script of faults:

- ``HTTP_500`` tokens: HTTP 500 with an error body;
- ``HANG``: headers never come (the client's timeout must fire);
- ``DROP``: the connection is closed before any response;
- ``CUT``: two tokens stream, then the connection is closed without ``[DONE]``;
- ``ERROR_EVENT``: one token, then an error object in the stream;
- ``GARBAGE``: a line that is not SSE;
- ``PAIRS``: tokens two per chunk, with vLLM's running usage counts;
- ``SHORT``: half the tokens asked for, then a normal end (a length mismatch);
- anything else: ``max_tokens`` tokens, one per chunk, ``TOKEN_GAP_S`` apart.

Run standalone with ``python tests/fault_server.py PORT`` (0: any port, printed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading

from aiohttp import web

HTTP_500, HANG, DROP, CUT, ERROR_EVENT, GARBAGE, PAIRS, SHORT = 11, 12, 13, 14, 15, 16, 17, 18
TOKEN_GAP_S = 0.002
HANG_S = 20.0
MODEL = "fault-model"
SERVED = web.AppKey("served", list)
"""One entry per normal completion streamed to its end (tests wait on it)."""


def _chunk(text: str, usage: int | None = None, finish: str | None = None) -> bytes:
    body: dict = {"id": "cmpl-f", "object": "text_completion", "model": MODEL,
                  "choices": [{"index": 0, "text": text, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = {"completion_tokens": usage}
    return f"data: {json.dumps(body)}\n\n".encode()


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


async def completions(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    n, max_tokens = len(body["prompt"]), body["max_tokens"]
    if n == HTTP_500:
        return web.json_response({"error": {"message": "injected failure", "code": 500}}, status=500)
    if n == HANG:
        await asyncio.sleep(HANG_S)
        return web.json_response({})
    if n == DROP:
        assert request.transport is not None
        request.transport.close()
        return web.Response()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if n == CUT:
        for _ in range(2):
            await resp.write(_chunk("x"))
        await asyncio.sleep(TOKEN_GAP_S)
        assert request.transport is not None
        request.transport.close()
        return resp
    if n == ERROR_EVENT:
        await resp.write(_chunk("x"))
        await resp.write(b'data: {"error": {"message": "injected stream error", "code": 500}}\n\n')
        return resp
    if n == GARBAGE:
        await resp.write(b"this is not server-sent events\n\n")
        return resp
    if n == PAIRS:
        sent = 0
        while sent < max_tokens:
            k = min(2, max_tokens - sent)
            sent += k
            await asyncio.sleep(TOKEN_GAP_S)
            await resp.write(_chunk("xy"[:k], usage=sent, finish="length" if sent == max_tokens else None))
    else:
        total = max(1, max_tokens // 2) if n == SHORT else max_tokens
        for i in range(total):
            await asyncio.sleep(TOKEN_GAP_S)
            await resp.write(_chunk("x", finish="length" if i == total - 1 else None))
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': {'completion_tokens': total}})}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    request.app[SERVED].append(n)
    return resp


def app() -> web.Application:
    a = web.Application()
    a[SERVED] = []
    a.router.add_get("/v1/models", models)
    a.router.add_post("/v1/completions", completions)
    return a


class FaultServer:
    """The server on its own thread and event loop; ``port`` once started."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._runner: web.AppRunner | None = None
        self.app = app()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self._ready.set()
        self._loop.run_forever()

    def __enter__(self) -> FaultServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def served(self) -> int:
        return len(self.app[SERVED])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


if __name__ == "__main__":
    with FaultServer(int(sys.argv[1]) if len(sys.argv) > 1 else 0) as server:
        print(server.url, flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
