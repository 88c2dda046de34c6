"""Any OpenAI-compatible server without vLLM's extras (``backends[].kind: openai``).

A hosted API, SGLang, TGI, another proxy: the gateway sends it the client's request as it is
(streaming, ``include_usage`` only) and learns nothing from it but the stream. Its capacity is
the config's (``max_num_seqs`` requests at once, ``max_kv_tokens`` if set); health is its model
list answering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import EngineLoad, KvCache


class OpenAIEngine:
    kind = "openai"
    has_metrics = False
    has_tokenize = False
    continuous_usage = False
    health_path = "/v1/models"

    def kv_cache(self, metrics_text: str) -> KvCache | None:
        return None

    def load(self, metrics_text: str) -> EngineLoad | None:
        return None
