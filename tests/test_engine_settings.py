"""Reading a vLLM server's engine settings from its /metrics and /v1/models.

``tests/data/vllm-server/`` holds both as captured from a real vLLM 0.32.0 CPU server (the
``small`` checkpoint, ``--max-model-len 2048 --max-num-seqs 64``, 1 GiB of KV cache).
"""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from experiments.engine_settings import (
    DEFAULT_MAX_NUM_SEQS,
    parse_labels,
    parse_metrics,
    parse_models,
    read_engine_settings,
)
from sim.kv import BlockManager
from sim.policies import make_policy

DATA = Path(__file__).resolve().parent / "data" / "vllm-server"
METRICS = (DATA / "metrics.txt").read_text()
MODELS = (DATA / "v1-models.json").read_text()


def test_captured_metrics_give_the_servers_cache_settings():
    """The captured /metrics gives vLLM's block count, its CPU block size 128 and prefix caching on."""
    s = parse_metrics(METRICS, parse_models(MODELS))
    assert (s.num_gpu_blocks, s.block_size, s.enable_prefix_caching, s.max_model_len) == (682, 128, True, 2048)
    assert s.cache_config["kv_cache_memory_bytes"] == "1073741824"  # the 1 GiB it was given
    assert int(s.cache_config["kv_cache_size_tokens"]) == s.num_gpu_blocks * s.block_size
    assert len(s.caveats()) == 1 and "prefix caching" in s.caveats()[0]
    off = parse_metrics(METRICS.replace('enable_prefix_caching="True"', 'enable_prefix_caching="False"'))
    assert not off.enable_prefix_caching and off.caveats() == []


def test_settings_become_the_vllm_policys_configs():
    """The settings build the KV capacity and the vllm policy's config, scheduler knobs from the caller."""
    s = parse_metrics(METRICS, parse_models(MODELS, "small"))
    kv = s.kv_config()
    assert (kv.num_blocks, kv.block_size) == (682, 128)
    sched = s.scheduler_config(max_num_seqs=64, max_num_batched_tokens=1024)
    assert (sched.policy, sched.max_num_seqs, sched.token_budget, sched.max_model_len) == ("vllm", 64, 1024, 2048)
    default = s.scheduler_config()
    assert (default.max_num_seqs, default.token_budget) == (DEFAULT_MAX_NUM_SEQS, 2048)
    policy = make_policy(sched, BlockManager(kv.num_blocks or 1, kv.block_size))
    assert policy.kv.num_blocks == 682


def test_label_values_are_unescaped():
    """Prometheus label values keep escaped quotes, backslashes and newlines, and commas inside quotes."""
    assert parse_labels(r'a="x,y",b="say \"hi\"",c="back\\slash",d="two\nlines"') == {
        "a": "x,y", "b": 'say "hi"', "c": "back\\slash", "d": "two\nlines"}


def test_not_a_vllm_server_is_a_clear_error():
    """Metrics without vllm:cache_config_info, or without one of its fields, say what is missing."""
    with pytest.raises(ValueError, match="no vllm:cache_config_info"):
        parse_metrics("# servesim\nvllm:num_requests_running 0\n")
    with pytest.raises(ValueError, match="no num_gpu_blocks"):
        parse_metrics('vllm:cache_config_info{block_size="16",enable_prefix_caching="False"} 1.0\n')
    with pytest.raises(ValueError, match="num_gpu_blocks must be an integer"):
        parse_metrics('vllm:cache_config_info{block_size="16",num_gpu_blocks="many",'
                      'enable_prefix_caching="False"} 1.0\n')


def test_engines_that_disagree_are_refused():
    """Data-parallel engines with different cache settings cannot be mirrored by one policy."""
    text = ('vllm:cache_config_info{block_size="16",engine="0",enable_prefix_caching="False",num_gpu_blocks="10"} 1\n'
            'vllm:cache_config_info{block_size="16",engine="1",enable_prefix_caching="False",num_gpu_blocks="12"} 1\n')
    with pytest.raises(ValueError, match="different cache settings"):
        parse_metrics(text)


def test_models_list_needs_a_name_when_several():
    """/v1/models with several models needs the one meant; a server without max_model_len gives None."""
    two = '{"data": [{"id": "a", "max_model_len": 10}, {"id": "b"}]}'
    with pytest.raises(ValueError, match="several models"):
        parse_models(two)
    assert parse_models(two, "a") == 10 and parse_models(two, "b") is None
    with pytest.raises(ValueError, match="no model 'c'"):
        parse_models(two, "c")


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = {"/metrics": METRICS, "/v1/models": MODELS}.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.end_headers()
        if body is not None:
            self.wfile.write(body.encode())

    def log_message(self, *args):
        pass


def test_read_from_a_server_over_http():
    """The settings are read from a server's /metrics and /v1/models; a closed port is one clear error."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        s = read_engine_settings(url)
        assert (s.num_gpu_blocks, s.block_size, s.max_model_len) == (682, 128, 2048)
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(ValueError, match="cannot connect"):
        read_engine_settings(url, timeout_s=2)
