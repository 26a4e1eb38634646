"""A running vLLM server's engine settings, read from what it serves, as servesim's configs.

vLLM publishes its ``CacheConfig`` in ``/metrics`` as the Prometheus info gauge
``vllm:cache_config_info`` (one sample per engine, every field a label: ``num_gpu_blocks``,
``block_size``, ``enable_prefix_caching``, ...; vLLM: ``PrometheusStatLogger.log_metrics_info``
with ``CacheConfig.metrics_info``), and its ``max_model_len`` in each ``/v1/models`` entry.
Neither carries the scheduler's ``max_num_seqs`` or ``max_num_batched_tokens``: those are the
server's launch arguments (its log prints "Chunked prefill is enabled with
max_num_batched_tokens=N"), so the caller passes them, else vLLM's defaults are assumed.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from sim.config import KVConfig
from sim.policies.base import SchedulerConfig
from sim.policies.vllm import DEFAULT_MAX_NUM_BATCHED_TOKENS

CACHE_INFO = "vllm:cache_config_info"
DEFAULT_MAX_NUM_SEQS = 128
"""vLLM's ``max_num_seqs`` for its OpenAI server on CPU (``EngineArgs.get_batch_defaults``; 256 on
GPUs below 70 GB, 1024 on H100/H200 and larger)."""

# One sample line: name{labels} value [timestamp]. Label values are quoted with \\, \" and \n escapes.
_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class EngineSettings:
    """The engine settings that shape a vLLM server's steps, as read from it."""

    num_gpu_blocks: int
    block_size: int
    enable_prefix_caching: bool
    max_model_len: int | None = None
    cache_config: dict[str, str] = field(default_factory=dict)
    """Every label of ``vllm:cache_config_info`` as vLLM wrote it (the provenance)."""

    def __post_init__(self) -> None:
        if self.num_gpu_blocks < 1:
            raise ValueError(f"{CACHE_INFO}: num_gpu_blocks must be >= 1, got {self.num_gpu_blocks}")
        if self.block_size < 1:
            raise ValueError(f"{CACHE_INFO}: block_size must be >= 1, got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def caveats(self) -> list[str]:
        """What of this engine the ``vllm`` policy does not mirror, one sentence each (empty: nothing)."""
        notes = []
        if self.enable_prefix_caching:
            notes.append("vLLM has prefix caching on and the vllm policy models none: servesim bench's random "
                         "prompts share no prefix, but a request preempted by recompute may find its own blocks "
                         "still cached and recompute less than the policy says (serve with "
                         "--no-enable-prefix-caching to compare exactly)")
        return notes

    def kv_config(self) -> KVConfig:
        """servesim's KV capacity for this engine: vLLM's block count and size (the ``vllm``
        policy keeps vLLM's null block out of use)."""
        return KVConfig(num_blocks=self.num_gpu_blocks, block_size=self.block_size)

    def scheduler_config(self, *, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None,
                         order: str = "fcfs", long_prefill_token_threshold: int = 0,
                         watermark: float = 0.0) -> SchedulerConfig:
        """The ``vllm`` policy's config for this engine; the scheduler settings that ``/metrics``
        does not carry are the server's launch arguments (``None``: vLLM's CPU server defaults)."""
        return SchedulerConfig(
            policy="vllm", order=order,
            max_num_seqs=DEFAULT_MAX_NUM_SEQS if max_num_seqs is None else max_num_seqs,
            token_budget=DEFAULT_MAX_NUM_BATCHED_TOKENS if max_num_batched_tokens is None else max_num_batched_tokens,
            max_model_len=self.max_model_len, long_prefill_token_threshold=long_prefill_token_threshold,
            kv_watermark=watermark,
        )


def parse_labels(text: str) -> dict[str, str]:
    """``a="x",b="y"`` (Prometheus label syntax) as a dict."""
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if m is None:
            raise ValueError(f"bad Prometheus labels at {text[pos:pos + 40]!r}")
        labels[m.group(1)] = re.sub(r'\\[\\"n]', lambda e: _UNESCAPE[e.group(0)], m.group(2))
        pos = m.end()
    return labels


def cache_config_samples(metrics_text: str) -> list[dict[str, str]]:
    """The labels of every ``vllm:cache_config_info`` sample in a ``/metrics`` text."""
    samples = []
    for line in metrics_text.splitlines():
        if not line.startswith(CACHE_INFO):
            continue
        m = _SAMPLE.match(line.strip())
        if m is None or m.group("name") != CACHE_INFO:
            continue
        samples.append(parse_labels(m.group("labels") or ""))
    return samples


def _int_label(labels: dict[str, str], name: str) -> int:
    value = labels.get(name)
    if value is None or value == "None":
        raise ValueError(f"{CACHE_INFO} has no {name} (labels: {', '.join(sorted(labels)) or 'none'})")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{CACHE_INFO}: {name} must be an integer, got {value!r}") from None


def parse_metrics(metrics_text: str, max_model_len: int | None = None) -> EngineSettings:
    """The engine settings in a vLLM ``/metrics`` text. Several engines (data parallel) must
    agree on their cache settings; a text without ``vllm:cache_config_info`` is not vLLM's."""
    samples = cache_config_samples(metrics_text)
    if not samples:
        raise ValueError(f"no {CACHE_INFO} in the metrics: not a vLLM server, or one that does not "
                         "publish its cache config")
    first = {k: v for k, v in samples[0].items() if k != "engine"}
    for other in samples[1:]:
        if {k: v for k, v in other.items() if k != "engine"} != first:
            raise ValueError(f"{CACHE_INFO}: engines {samples[0].get('engine')} and {other.get('engine')} "
                             "have different cache settings")
    prefix = first.get("enable_prefix_caching")
    if prefix not in ("True", "False"):
        raise ValueError(f"{CACHE_INFO}: enable_prefix_caching must be True or False, got {prefix!r}")
    return EngineSettings(num_gpu_blocks=_int_label(first, "num_gpu_blocks"),
                          block_size=_int_label(first, "block_size"), enable_prefix_caching=prefix == "True",
                          max_model_len=max_model_len, cache_config=samples[0])


def parse_models(models_json: str, model: str | None = None) -> int | None:
    """``max_model_len`` of ``model`` (or the only model) in a ``/v1/models`` answer; ``None``
    when the server does not say (not every OpenAI-compatible server does)."""
    try:
        data = json.loads(models_json)["data"]
    except (ValueError, KeyError, TypeError):
        raise ValueError("/v1/models: not an OpenAI model list") from None
    cards = [c for c in data if model is None or c.get("id") == model]
    if not cards:
        raise ValueError(f"/v1/models lists no model {model!r}" if model else "/v1/models lists no model")
    if model is None and len(cards) > 1:
        ids = ", ".join(str(c.get("id")) for c in cards)
        raise ValueError(f"/v1/models lists several models ({ids}); name one")
    value = cards[0].get("max_model_len")
    return int(value) if value is not None else None


def _get(url: str, timeout_s: float) -> str:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode("utf-8")
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ValueError(f"{url}: cannot connect ({reason})") from None


def read_engine_settings(url: str, model: str | None = None, timeout_s: float = 10.0) -> EngineSettings:
    """A vLLM server's settings from its ``/metrics`` and ``/v1/models`` (``url`` is its base)."""
    base = url.rstrip("/")
    max_model_len = parse_models(_get(f"{base}/v1/models", timeout_s), model)
    return parse_metrics(_get(f"{base}/metrics", timeout_s), max_model_len)
