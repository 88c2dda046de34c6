"""vLLM (``backends[].kind: vllm``, the default): its ``/metrics`` page (Prometheus text format)
gives the KV capacity (``vllm:cache_config_info``) and its load (queue, running batch,
preemptions, KV use); ``/tokenize`` counts prompts; ``/health`` answers while it serves; it
streams exact token counts on every chunk (``continuous_usage_stats``). The simulated backend
speaks the same.
"""

from __future__ import annotations

import re

from .base import EngineLoad, KvCache

#: Its metric names (vLLM 0.6 to 0.32).
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
PREEMPTIONS = "vllm:num_preemptions_total"

_CACHE_INFO_RE = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def _samples(metrics_text: str, name: str) -> list[float]:
    """The values of a metric's samples, one per label set."""
    prefix = name + "{"
    plain = name + " "
    out = []
    for line in metrics_text.splitlines():
        if line.startswith(prefix) or line.startswith(plain):
            try:
                out.append(float(line.rsplit(" ", 1)[1]))
            except (IndexError, ValueError):
                continue
    return out


def parse_gauge_sum(metrics_text: str, name: str) -> float | None:
    """Sum of a metric's samples over all label sets (None when it is absent)."""
    values = _samples(metrics_text, name)
    return sum(values) if values else None


def _cache_labels(metrics_text: str) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` (empty when absent)."""
    m = _CACHE_INFO_RE.search(metrics_text)
    return {} if m is None else dict(_LABEL_RE.findall(m.group(1)))


def parse_kv_capacity(metrics_text: str) -> int | None:
    """KV tokens requests can use, from vLLM's ``vllm:cache_config_info`` labels:
    ``(num_gpu_blocks - 1) * block_size`` (vLLM v1's block pool keeps one "null block" out of
    use; its ``kv_cache_size_tokens`` label counts it)."""
    labels = _cache_labels(metrics_text)
    try:
        blocks = int(labels["num_gpu_blocks"])
        return max(1, blocks - 1) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


def parse_block_size(metrics_text: str) -> int | None:
    """The KV block size from ``vllm:cache_config_info`` (None when absent)."""
    labels = _cache_labels(metrics_text)
    try:
        size = int(labels["block_size"])
    except (KeyError, ValueError):
        return None
    return size if size > 0 else None


#: Engine KV use, 0-1: the current name first, then the one vLLM used before 0.7.
KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_kv_usage(metrics_text: str) -> float | None:
    """The engine's KV-cache use (0-1; the largest over its label sets), or None."""
    for name in KV_USAGE_METRICS:
        values = _samples(metrics_text, name)
        if values:
            return max(values)
    return None


class VllmEngine:
    kind = "vllm"
    has_metrics = True
    has_tokenize = True
    continuous_usage = True
    health_path = "/health"

    def kv_cache(self, metrics_text: str) -> KvCache | None:
        tokens = parse_kv_capacity(metrics_text)
        block = parse_block_size(metrics_text)
        return None if tokens is None or block is None else KvCache(tokens, block)

    def load(self, metrics_text: str) -> EngineLoad | None:
        waiting = parse_gauge_sum(metrics_text, WAITING)
        running = parse_gauge_sum(metrics_text, RUNNING)
        if waiting is None or running is None:
            return None
        return EngineLoad(
            waiting=waiting,
            running=running,
            preemptions_total=parse_gauge_sum(metrics_text, PREEMPTIONS),
            kv_usage=parse_kv_usage(metrics_text),
            block_size=parse_block_size(metrics_text),
        )
