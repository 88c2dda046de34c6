"""What the gateway needs to know about the engine behind a backend, one module per kind.

The transport (:mod:`gateway.upstream`) moves bytes to any OpenAI-compatible server; an
:class:`Engine` says what else a kind of server offers and how to read it:

* **discovery**: its KV capacity from its metrics page, if it has one;
* **health**: which ``GET`` path answers 200 while it serves;
* **feedback**: its own view of its load (queue, running requests, preemptions, KV use), read
  from its metrics page for admission feedback (:class:`EngineLoad`);
* **prompt counting**: whether it counts prompt tokens for the gateway (``/tokenize``);
* **the request body**: whether it takes ``stream_options.continuous_usage_stats`` (exact
  counts on every chunk; without them the gateway counts the tokens of each delta's text).

Kinds (``backends[].kind``):

* ``vllm`` (:mod:`.vllm`, the default; the simulated backend is one): all of the above;
* ``openai`` (:mod:`.openai`): any OpenAI-compatible server (a hosted API, SGLang, TGI, a
  proxy): no metrics, no ``/tokenize``, health from ``/v1/models``; its capacity comes from the
  config (``max_num_seqs``, ``max_kv_tokens``).

A new engine is one module here with an :class:`Engine` and one line in :data:`ENGINES`.
"""

from __future__ import annotations

from .base import ENGINE_KINDS, Engine, EngineKind, EngineLoad, KvCache
from .openai import OpenAIEngine
from .vllm import VllmEngine

ENGINES: dict[str, Engine] = {"vllm": VllmEngine(), "openai": OpenAIEngine()}


def engine_for(kind: str) -> Engine:
    """The :class:`Engine` of ``kind`` (one of :data:`ENGINE_KINDS`)."""
    try:
        return ENGINES[kind]
    except KeyError:
        raise ValueError(
            f"unknown backend kind {kind!r}; expected one of {', '.join(ENGINE_KINDS)}"
        ) from None


__all__ = [
    "ENGINES",
    "ENGINE_KINDS",
    "Engine",
    "EngineKind",
    "EngineLoad",
    "KvCache",
    "engine_for",
]
