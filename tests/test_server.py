"""`servesim serve`: the live engine behind the OpenAI completions API, on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import queue
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("aiohttp")

from runtime.engine import Arrival, EngineState
from runtime.server import BadRequest, ServerConfig, parse_completion, prometheus_text
from runtime.tokenizer import ByteTokenizer, load_tokenizer, write_wordlevel_tokenizer
from sim.request import Request, Status
from tests.serve_thread import ServerThread, tiny_engine

TIMEOUT_S = 60


@pytest.fixture(scope="module")
def wordlevel(tmp_path_factory) -> Path:
    """A word-level tokenizer over the tiny model's 4096 ids."""
    return write_wordlevel_tokenizer(tmp_path_factory.mktemp("tok"), 4096)


@pytest.fixture(scope="module")
def server(net, one_torch_thread, wordlevel):
    """One server for the module: tiny, continuous batching, a word-level tokenizer."""
    with ServerThread(tiny_engine(net), load_tokenizer(wordlevel), max_model_len=512) as s:
        yield s


def call(server, method: str, path: str, body: object = None, raw: bytes | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=TIMEOUT_S)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    out = resp.status, resp.read()
    conn.close()
    return out


def complete(server, body: dict) -> tuple[int, dict]:
    status, data = call(server, "POST", "/v1/completions", body)
    return status, json.loads(data)


def stream_events(server, body: dict) -> list[dict | str]:
    """Every SSE data payload of a streaming completion, parsed; ``[DONE]`` as the string."""
    status, data = call(server, "POST", "/v1/completions", body | {"stream": True})
    assert status == 200, data
    out: list[dict | str] = []
    for line in data.decode().split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_models_health_and_metrics(server):
    """/v1/models lists the model with its length, /health is 200, /metrics carries vLLM's names."""
    status, data = call(server, "GET", "/v1/models")
    card = json.loads(data)["data"][0]
    assert status == 200 and card["id"] == "tiny" and card["max_model_len"] == 512
    assert call(server, "GET", "/health")[0] == 200
    status, data = call(server, "GET", "/metrics")
    text = data.decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "servesim:kv_blocks_used"):
        assert f"\n{name}{{" in text
    assert 'vllm:cache_config_info{block_size="16",num_gpu_blocks="512"' in text
    assert 'servesim:kv_blocks_total{model_name="tiny"} 512.0' in text


def test_tokenize_and_detokenize(server):
    """/tokenize counts a text prompt's ids as the completions endpoint will; /detokenize inverts it."""
    status, data = call(server, "POST", "/tokenize", {"prompt": "t7 t8 t9"})
    assert status == 200 and json.loads(data)["tokens"] == [7, 8, 9] and json.loads(data)["count"] == 3
    status, data = call(server, "POST", "/detokenize", {"tokens": [7, 8, 9]})
    assert status == 200 and json.loads(data)["prompt"] == "t7 t8 t9"
    assert call(server, "POST", "/detokenize", {"tokens": [-1]})[0] == 400


def test_token_id_prompt_non_streaming(server):
    """A token-id prompt gets exactly max_tokens tokens, finish_reason length, exact usage."""
    status, body = complete(server, {"model": "tiny", "prompt": list(range(10, 50)), "max_tokens": 7,
                                     "ignore_eos": True})
    assert status == 200, body
    assert body["usage"] == {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47}
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["text"].split()) == 7  # word-level: one word per token


def test_text_prompt_streaming_with_usage(server):
    """A text prompt is tokenized by --tokenizer; the stream has one chunk per token, usage, [DONE]."""
    events = stream_events(server, {"prompt": "t5 t6 t7 t8", "max_tokens": 5, "ignore_eos": True,
                                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e["choices"]]
    assert len(chunks) == 5
    assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 4, 5]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["length"]
    final = events[-2]
    assert isinstance(final, dict) and final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}


def test_streamed_text_equals_whole_text(server):
    """Greedy decoding: the streamed pieces join into the non-streaming text of the same prompt."""
    body = {"prompt": list(range(100, 130)), "max_tokens": 6, "ignore_eos": True}
    _, whole = complete(server, body)
    events = stream_events(server, body)
    streamed = "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])
    assert streamed == whole["choices"][0]["text"]


@pytest.mark.parametrize(("body", "param"), [
    ({"max_tokens": 4}, "prompt"),
    ({"prompt": [1] * 600, "max_tokens": 4}, "prompt"),
    ({"prompt": [1] * 500, "max_tokens": 20}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": -1}, "max_tokens"),
    ({"prompt": [1, 2], "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": [1, 2], "model": "gpt-9"}, "model"),
    ({"prompt": [1, 99999]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1, 2], [3, 4]]}, "prompt"),
    ({"prompt": [1, 2], "stream": "yes"}, "stream"),
    ({"prompt": [1, 2], "n": 3}, "n"),
])
def test_bad_request_is_400_naming_the_field(server, body, param):
    """Each kind of bad request gets HTTP 400 with an OpenAI error body naming the field."""
    status, err = complete(server, body)
    assert status == 400
    assert err["error"]["type"] == "BadRequestError" and err["error"]["param"] == param
    assert err["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_body_is_400(server, raw):
    """A body that is not a JSON object gets HTTP 400, not a traceback."""
    status, data = call(server, "POST", "/v1/completions", raw=raw)
    assert status == 400 and json.loads(data)["error"]["code"] == 400


def test_bad_requests_do_not_disturb_running_ones(server):
    """A stream in flight finishes exactly while bad requests arrive beside it."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server.port, timeout=TIMEOUT_S)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": list(range(64)), "max_tokens": 40, "stream": True, "ignore_eos": True}))
    resp = conn.getresponse()
    for _ in range(3):
        assert complete(server, {"prompt": [1], "max_tokens": 0})[0] == 400
    chunks = [line for line in resp.read().decode().split("\n") if line.startswith("data: {")]
    conn.close()
    assert len(chunks) == 40


def test_client_gone_mid_stream_is_cancelled(server):
    """A client that disconnects mid-stream frees its slot: counted as aborted, nothing left running."""
    sock = socket.create_connection(("127.0.0.1", server.server.port), timeout=TIMEOUT_S)
    body = json.dumps({"prompt": list(range(32)), "max_tokens": 400, "stream": True, "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    got = b""
    for _ in range(100):  # headers and the first chunk may come in separate reads
        got += sock.recv(4096)
        if b"data: " in got:
            break
    assert b"data: " in got
    sock.close()
    deadline = time.monotonic() + TIMEOUT_S
    text = ""
    while time.monotonic() < deadline:
        text = call(server, "GET", "/metrics")[1].decode()
        if 'servesim:requests_aborted_total{model_name="tiny"} 1.0' in text and \
                'vllm:num_requests_running{model_name="tiny"} 0.0' in text:
            break
        time.sleep(0.05)
    assert 'servesim:requests_aborted_total{model_name="tiny"} 1.0' in text
    assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in text
    assert complete(server, {"prompt": [5, 6], "max_tokens": 3})[0] == 200


def test_parse_completion_byte_fallback():
    """Without a tokenizer a text prompt is its UTF-8 bytes; defaults are OpenAI's (16 tokens)."""
    config = ServerConfig("m", max_model_len=64, vocab_size=300, block_size=16, num_kv_blocks=8)
    c = parse_completion({"prompt": "héllo"}, config, ByteTokenizer())
    assert c.prompt_ids == list("héllo".encode()) and c.max_tokens == 16 and not c.stream
    with pytest.raises(BadRequest, match="maximum context length is 64"):
        parse_completion({"prompt": "x" * 60}, config, ByteTokenizer())


def test_engine_serve_stops_at_a_stop_token(net, one_torch_thread):
    """LiveEngine.serve ends a request at a sampled stop id, and frees its KV blocks."""
    engine = tiny_engine(net)

    class Listener:
        def __init__(self) -> None:
            self.tokens: dict[int, list[int]] = {}
            self.finished: list[Request] = []
            self.state = EngineState()

        def on_rejected(self, request: Request) -> None:
            raise AssertionError(request.reject_reason)

        def on_step(self, end_s, tokens, finished, state) -> None:
            for rid, tok in tokens.items():
                self.tokens.setdefault(rid, []).append(tok)
            self.finished += finished
            self.state = state

    def serve(stop_ids: frozenset[int]) -> Listener:
        inbox: queue.Queue = queue.Queue()
        listener = Listener()
        inbox.put(Arrival(Request(0, 0.0, 20, 10), list(range(20)), stop_ids))
        t0 = engine.clock()
        import threading

        th = threading.Thread(target=engine.serve, args=(inbox, listener, t0))
        th.start()
        deadline = time.monotonic() + TIMEOUT_S
        while not listener.finished and time.monotonic() < deadline:
            time.sleep(0.01)
        inbox.put(None)
        th.join(TIMEOUT_S)
        return listener

    full = serve(frozenset())
    assert len(full.tokens[0]) == 10
    third = full.tokens[0][2]
    cut = serve(frozenset([third]))
    stop_at = full.tokens[0].index(third) + 1
    assert cut.tokens[0] == full.tokens[0][:stop_at]
    assert cut.finished[0].status is Status.FINISHED and cut.finished[0].num_generated == stop_at
    assert cut.state.kv_blocks_used == 0 and cut.state.num_running == 0


def test_prometheus_text_is_parseable():
    """Every sample line is NAME{labels} FLOAT, under a HELP and a TYPE line."""
    from runtime.server import Counters

    config = ServerConfig("m", max_model_len=64, vocab_size=300, block_size=16, num_kv_blocks=8)
    text = prometheus_text(config, EngineState(2, 1, 4, 0, 9), Counters())
    assert 'vllm:num_requests_running{model_name="m"} 2.0' in text
    assert 'vllm:kv_cache_usage_perc{model_name="m"} 0.5' in text
    for line in text.strip().split("\n"):
        if not line.startswith("#"):
            name_labels, value = line.rsplit(" ", 1)
            float(value)
            assert name_labels.endswith("}")


def test_serve_cli_starts_and_answers(tmp_path):
    """`servesim serve --port 0` prints its address, answers a completion, stops on SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-c", "from experiments.cli import main; main()", "serve",
                             "--model", "tiny", "--port", "0", "--threads", "1", "--kv-blocks", "256",
                             "--max-model-len", "1024"],
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        for _ in range(50):  # torch or transformers may warn first
            line = proc.stderr.readline()
            if "on http://127.0.0.1:" in line or not line:
                break
        assert "on http://127.0.0.1:" in line, line
        port = int(line.rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hi", "max_tokens": 3}))
        body = json.loads(conn.getresponse().read())
        assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    finally:
        proc.terminate()
        proc.wait(TIMEOUT_S)
    assert proc.returncode == 0


def test_serve_cli_refuses_a_pool_too_small():
    """A KV pool smaller than one max-length request is one clear error line, exit != 0."""
    out = subprocess.run([sys.executable, "-c", "from experiments.cli import main; main()", "serve", "--model",
                          "tiny", "--kv-blocks", "4", "--port", "0"], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr and "--kv-blocks" in out.stderr


def test_engine_failure_is_500_and_unhealthy(net, one_torch_thread):
    """When the engine thread dies, the waiting client gets HTTP 500 with the cause and /health turns 503."""
    engine = tiny_engine(net)

    def broken(batch):
        raise RuntimeError("device lost")

    engine.runner.execute = broken  # type: ignore[method-assign]
    with ServerThread(engine, ByteTokenizer()) as s:
        status, body = complete(s, {"prompt": [1, 2, 3], "max_tokens": 2})
        assert status == 500 and "device lost" in body["error"]["message"]
        assert call(s, "GET", "/health")[0] == 503
        assert complete(s, {"prompt": [1, 2, 3], "max_tokens": 2})[0] == 500
