"""The transport seam: everything the gateway asks of a backend, as one protocol.

The pipeline (:mod:`gateway.server.proxy`) streams through :meth:`Upstream.open`; the backend
pool (:mod:`gateway.backend_pool`) discovers models, checks health, reads the backend's metrics
page and asks it to count prompt tokens (what a kind of engine offers, and how to read its
metrics, is :mod:`gateway.engines`'s business). Two implementations:
:class:`~gateway.upstream.http.AiohttpUpstream` (the real one) and
:class:`~gateway.upstream.fake.FakeUpstream` (in-process, for tests).

Errors are translated at this boundary: an implementation raises only the backend errors of
:mod:`gateway.errors`, never its client library's:

* :class:`~gateway.errors.BackendUnreachable`: the backend did not take the request (no
  connection: ``kind="unreachable"``; an error status or a broken answer before streaming:
  ``kind="error_before_stream"``); it never ran, another backend may take it;
* :class:`~gateway.errors.BackendRejected`: the backend answered 4xx before streaming (its own
  validation); the status and body are passed through to the client;
* :class:`~gateway.errors.StreamBroken`: the stream started, then failed (dropped, stalled past
  the read timeout).

Backends are addressed by base URL (``backends[].url``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """One entry of a backend's ``GET /v1/models``."""

    id: str
    max_model_len: int | None


class UpstreamStream(Protocol):
    @property
    def rate_headers(self) -> Mapping[str, str]:
        """The response's rate-limit headers (``x-ratelimit-*``, ``retry-after``), lower
        case."""
        ...

    def batches(self) -> AsyncIterator[list[bytes]]:
        """Each SSE ``data:`` payload (bytes after ``data: ``) until ``[DONE]``, grouped by
        network read (each list non-empty). Raises :class:`~gateway.errors.StreamBroken`."""
        ...


class Upstream(Protocol):
    async def start(self) -> None:
        """Open connection pools; called once before any other method."""

    async def close(self) -> None:
        """Close everything :meth:`start` opened."""

    def open(self, url: str, path: str, body: bytes) -> AbstractAsyncContextManager[UpstreamStream]:
        """``async with upstream.open(url, path, body) as stream``: POST ``body`` (JSON asking
        to stream) and return the started stream (status 200). Leaving the block before
        ``[DONE]`` aborts the request on the backend (its KV cache is freed)."""
        ...

    async def models(self, url: str) -> list[ModelInfo]:
        """The served models (``GET /v1/models``)."""
        ...

    async def metrics_text(self, url: str) -> str:
        """The backend's Prometheus page (``GET /metrics``)."""
        ...

    async def tokenize(self, url: str, payload: dict[str, Any]) -> int | None:
        """Prompt tokens as the backend counts them (``POST /tokenize`` with ``{model,
        messages | prompt}``); None when it answers without a count."""
        ...

    async def healthy(self, url: str, path: str = "/health") -> bool:
        """Whether ``GET path`` answers 200; never raises."""
        ...
