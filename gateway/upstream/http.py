"""Talking to backends: one small interface, the aiohttp implementation behind it.

:class:`Upstream` is what the relay needs from a backend: open a streaming POST and iterate its
SSE ``data:`` payloads, plus discovery (models, KV capacity) and health. Transport exceptions are
translated here, at the boundary, into the project's errors (:mod:`gateway.errors`):

* :class:`BackendUnreachable` (connect refused/timeout, 5xx before streaming): the request never
  ran; the caller may retry it on another backend;
* :class:`BackendRejected`: the backend answered 4xx before streaming (its own validation); the
  status and body are passed through to the client;
* :class:`StreamBroken`: the stream started and then failed (drop, stall past the read timeout,
  malformed event).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

from ..errors import BackendRejected, BackendUnreachable, StreamBroken


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    max_model_len: int | None


class UpstreamStream(Protocol):
    def batches(self) -> AsyncIterator[list[bytes]]:
        """Each SSE ``data:`` payload (bytes after ``data: ``) until ``[DONE]``, grouped by
        network read (each list non-empty)."""
        ...


class Upstream(Protocol):
    def open(self, url: str, path: str, body: bytes) -> Any:
        """``async with upstream.open(...) as stream``: a started stream (status 200)."""
        ...

    async def models(self, url: str) -> list[ModelInfo]: ...

    async def kv_capacity(self, url: str) -> int | None: ...

    async def healthy(self, url: str) -> bool: ...


_CACHE_INFO_RE = re.compile(r"^vllm:cache_config_info\{([^}]*)\}", re.M)
_LABEL_RE = re.compile(r'(\w+)="([^"]*)"')


class _AiohttpStream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.finished = False  # [DONE] was read

    async def batches(self) -> AsyncIterator[list[bytes]]:
        """Yield the ``data:`` payloads of each network read (a non-empty list) until
        ``[DONE]``.

        One ``readany`` per read, split into lines here: far cheaper than one ``readline`` per
        line, and a relay that writes each batch at once makes one client write per read.
        """
        content = self._resp.content
        rest = b""
        try:
            while True:
                data = await content.readany()
                if not data:
                    raise StreamBroken("backend closed the stream before [DONE]")
                if rest:
                    data = rest + data
                if b"\r" in data:  # CRLF or CR line ends: blank lines are skipped anyway
                    data = data.replace(b"\r", b"\n")
                end = data.rfind(b"\n")
                if end < 0:
                    rest = data
                    continue
                rest = data[end + 1 :]
                batch: list[bytes] = []
                for line in data[:end].split(b"\n"):
                    if line.startswith(b"data:"):
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            self.finished = True
                            if batch:
                                yield batch
                            return
                        batch.append(payload)
                    # blank separators, comments (": ping") and other fields are skipped
                if batch:
                    yield batch
        except TimeoutError as exc:
            raise StreamBroken("backend stalled: no data within the read timeout") from exc
        except aiohttp.ClientError as exc:
            raise StreamBroken(
                f"backend connection failed mid-stream: {exc.__class__.__name__}"
            ) from exc


class AiohttpUpstream:
    """The real transport: one shared :class:`aiohttp.ClientSession`."""

    def __init__(self, connect_timeout: float = 5.0, read_timeout: float = 300.0) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=max(connect_timeout, 2.0) * 2)
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, dict[str, str]] = {}  # backend URL -> headers to send

    def set_api_key(self, url: str, api_key: str | None) -> None:
        """Send ``Authorization: Bearer api_key`` to the backend at ``url`` (vLLM's
        ``--api-key``); the key is never logged."""
        if api_key:
            self._headers[url] = {"Authorization": f"Bearer {api_key}"}
        else:
            self._headers.pop(url, None)

    def auth_headers(self, url: str) -> dict[str, str]:
        return self._headers.get(url, {})

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session not started")
        return self._session

    @asynccontextmanager
    async def open(self, url: str, path: str, body: bytes) -> AsyncIterator[_AiohttpStream]:
        try:
            resp = await self.session.post(
                url + path,
                data=body,
                headers={"Content-Type": "application/json", **self._headers.get(url, {})},
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise BackendUnreachable(f"backend unreachable: {exc.__class__.__name__}") from exc
        stream: _AiohttpStream | None = None
        try:
            if resp.status != 200:
                await _raise_for_status(resp)
            stream = _AiohttpStream(resp)
            yield stream
        finally:
            if stream is not None and stream.finished and resp.content.is_eof():
                resp.release()  # complete: keep the connection for the next request
            else:
                # Closing (not releasing) the connection aborts the request inside vLLM.
                resp.close()

    async def models(self, url: str) -> list[ModelInfo]:
        async with self.session.get(
            url + "/v1/models", timeout=self._probe_timeout, headers=self._headers.get(url)
        ) as resp:
            resp.raise_for_status()
            data = await resp.json(content_type=None)
        out = []
        for m in data.get("data", []):
            if isinstance(m, dict) and isinstance(m.get("id"), str):
                mml = m.get("max_model_len")
                out.append(ModelInfo(m["id"], mml if isinstance(mml, int) else None))
        return out

    async def metrics_text(self, url: str) -> str:
        """The backend's Prometheus ``/metrics`` page."""
        async with self.session.get(url + "/metrics", timeout=self._probe_timeout) as resp:
            resp.raise_for_status()
            return await resp.text()

    async def kv_capacity(self, url: str) -> int | None:
        return parse_kv_capacity(await self.metrics_text(url))

    async def healthy(self, url: str) -> bool:
        try:
            async with self.session.get(url + "/health", timeout=self._probe_timeout) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False


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
    """``num_gpu_blocks * block_size`` from vLLM's ``vllm:cache_config_info`` labels."""
    m = _CACHE_INFO_RE.search(metrics_text)
    if m is None:
        return None
    labels = dict(_LABEL_RE.findall(m.group(1)))
    try:
        return int(labels["num_gpu_blocks"]) * int(labels["block_size"])
    except (KeyError, ValueError):
        return None


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    try:
        raw = await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise BackendUnreachable(
            f"backend answered {resp.status} and broke off", kind="error_before_stream"
        ) from exc
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if resp.status >= 500 or resp.status in (401, 403) or not isinstance(body, dict):
        # 401/403: the backend refuses the gateway's own credentials (backends[].api_key), not
        # the client's request: treat it as a failing backend, never pass it to the client
        raise BackendUnreachable(
            f"backend answered {resp.status} before streaming", kind="error_before_stream"
        )
    raise BackendRejected(resp.status, body)
