"""The engine protocol (see :mod:`gateway.engines`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args

#: ``backends[].kind``
EngineKind = Literal["vllm", "openai"]
ENGINE_KINDS: tuple[str, ...] = get_args(EngineKind)


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """The engine's own view of its load, read from its metrics page."""

    waiting: float  # requests it queues
    running: float  # requests in its running batch
    preemptions_total: float | None = None  # its preemption counter (None: not reported)
    kv_usage: float | None = None  # KV cache in use, 0-1 (None: not reported)
    block_size: int | None = None  # KV block size (None: not reported)


@dataclass(frozen=True, slots=True)
class KvCache:
    """The engine's KV cache: tokens requests can use, in blocks of ``block_size``."""

    tokens: int
    block_size: int


class Engine(Protocol):
    kind: str
    #: it serves a Prometheus page at ``/metrics`` worth reading (capacity, feedback)
    has_metrics: bool
    #: it counts prompt tokens at ``POST /tokenize``
    has_tokenize: bool
    #: it takes ``stream_options.continuous_usage_stats``
    continuous_usage: bool
    #: ``GET`` path that answers 200 while it serves
    health_path: str

    def kv_cache(self, metrics_text: str) -> KvCache | None:
        """Its KV cache, from its metrics page (None: not said)."""
        ...

    def load(self, metrics_text: str) -> EngineLoad | None:
        """Its load from its metrics page (None: the page does not say)."""
        ...
