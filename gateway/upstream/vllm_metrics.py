"""Reading a vLLM ``/metrics`` page (Prometheus text format): the few values the gateway uses."""

from __future__ import annotations

import re

_CACHE_INFO_RE = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


def parse_gauge_sum(metrics_text: str, name: str) -> float | None:
    """Sum of a metric's samples over all label sets (None when it is absent)."""
    total = None
    prefix = name + "{"
    for line in metrics_text.splitlines():
        if line.startswith(prefix) or line.startswith(name + " "):
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            total = value if total is None else total + value
    return total


def parse_kv_capacity(metrics_text: str) -> int | None:
    """KV tokens requests can use, from vLLM's ``vllm:cache_config_info`` labels:
    ``(num_gpu_blocks - 1) * block_size`` (vLLM v1's block pool keeps one "null block" out of
    use; its ``kv_cache_size_tokens`` label counts it)."""
    m = _CACHE_INFO_RE.search(metrics_text)
    if m is None:
        return None
    labels = dict(_LABEL_RE.findall(m.group(1)))
    try:
        blocks = int(labels["num_gpu_blocks"])
        return max(1, blocks - 1) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None
