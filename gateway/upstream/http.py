"""The real transport: HTTP to OpenAI-compatible servers (vLLM) over one aiohttp session.

Implements :class:`~gateway.upstream.interface.Upstream`; aiohttp's exceptions are translated
here into :mod:`gateway.errors`' backend errors and never leave this module.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp

from ..errors import BackendRejected, BackendUnreachable, GatewayError, StreamBroken
from .interface import ModelInfo, UpstreamStream
from .sse import sse_batches

_TOKENIZE_TIMEOUT = aiohttp.ClientTimeout(total=10)

#: What a failed request raises inside aiohttp (connection, timeout, socket).
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class _AiohttpStream:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.finished = False  # [DONE] was read
        self.rate_headers = rate_headers(resp.headers.items())

    def batches(self) -> AsyncIterator[list[bytes]]:
        """Yield the ``data:`` payloads of each network read (a non-empty list) until
        ``[DONE]``.

        One ``readany`` per read, split into lines here: far cheaper than one ``readline`` per
        line, and a relay that writes each batch at once makes one client write per read.
        """
        return sse_batches(self._read, self)

    async def _read(self) -> bytes:
        try:
            return await self._resp.content.readany()
        except TimeoutError as exc:
            raise StreamBroken("backend stalled: no data within the read timeout") from exc
        except aiohttp.ClientError as exc:
            raise StreamBroken(
                f"backend connection failed mid-stream: {exc.__class__.__name__}"
            ) from exc


class AiohttpUpstream:
    """The real transport: one shared :class:`aiohttp.ClientSession`.

    ``api_keys`` maps a backend URL to the bearer token it expects (vLLM's ``--api-key``,
    ``backends[].api_key``); it is sent on ``/v1/*`` and ``/tokenize`` and never logged.

    ``lean``: stream from ``http://`` backends on :mod:`.h1` (httptools) instead of aiohttp's
    client; None (default) = when httptools is installed.
    """

    def __init__(
        self,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        api_keys: Mapping[str, str | None] | None = None,
        lean: bool | None = None,
    ) -> None:
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._probe_timeout = aiohttp.ClientTimeout(total=max(connect_timeout, 2.0) * 2)
        self._session: aiohttp.ClientSession | None = None
        self._headers: dict[str, dict[str, str]] = {  # backend URL -> headers to send
            url: {"Authorization": f"Bearer {key}"} for url, key in (api_keys or {}).items() if key
        }
        self._h1: Any = None
        if lean is not False:
            try:
                from .h1 import H1Client
            except ImportError:
                if lean:
                    raise
            else:
                self._h1 = H1Client(connect_timeout, read_timeout, self._headers, _status_error)

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._h1 is not None:
            self._h1.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session not started")
        return self._session

    def open(self, url: str, path: str, body: bytes) -> AbstractAsyncContextManager[UpstreamStream]:
        if self._h1 is not None and self._h1.supports(url):
            return self._h1.open(url, path, body)  # type: ignore[no-any-return]
        return self._open_aiohttp(url, path, body)

    @asynccontextmanager
    async def _open_aiohttp(
        self, url: str, path: str, body: bytes
    ) -> AsyncIterator[_AiohttpStream]:
        try:
            resp = await self.session.post(
                url + path,
                data=body,
                headers={"Content-Type": "application/json", **self._headers.get(url, {})},
            )
        except _TRANSPORT_ERRORS as exc:
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
        data = await self._get_json(url, "/v1/models")
        entries = data.get("data") if isinstance(data, dict) else None
        out = []
        for m in entries if isinstance(entries, list) else ():
            if isinstance(m, dict) and isinstance(m.get("id"), str):
                mml = m.get("max_model_len")
                out.append(ModelInfo(m["id"], mml if isinstance(mml, int) else None))
        return out

    async def metrics_text(self, url: str) -> str:
        try:
            async with self.session.get(url + "/metrics", timeout=self._probe_timeout) as resp:
                resp.raise_for_status()
                return await resp.text()
        except _TRANSPORT_ERRORS as exc:
            raise _probe_failed(exc) from exc

    async def tokenize(self, url: str, payload: dict[str, Any]) -> int | None:
        try:
            async with self.session.post(
                url + "/tokenize",
                json=payload,
                timeout=_TOKENIZE_TIMEOUT,
                headers=self._headers.get(url),
            ) as resp:
                if resp.status != 200:
                    return None
                data = await resp.json(content_type=None)
        except ValueError:
            return None
        except _TRANSPORT_ERRORS as exc:
            raise _probe_failed(exc) from exc
        count = data.get("count") if isinstance(data, dict) else None
        return count if isinstance(count, int) and count >= 0 else None

    async def _get_json(self, url: str, path: str) -> Any:
        try:
            async with self.session.get(
                url + path, timeout=self._probe_timeout, headers=self._headers.get(url)
            ) as resp:
                resp.raise_for_status()
                return await resp.json(content_type=None)
        except (*_TRANSPORT_ERRORS, ValueError) as exc:
            raise _probe_failed(exc) from exc

    async def healthy(self, url: str, path: str = "/health") -> bool:
        try:
            async with self.session.get(
                url + path, timeout=self._probe_timeout, headers=self._headers.get(url)
            ) as resp:
                return resp.status == 200
        except _TRANSPORT_ERRORS:
            return False


def _probe_failed(exc: BaseException) -> BackendUnreachable:
    """A discovery, metrics or tokenize request that failed, as the project's error."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return BackendUnreachable(f"backend answered {exc.status}", kind="error_before_stream")
    if isinstance(exc, ValueError):
        return BackendUnreachable("backend answered malformed JSON", kind="error_before_stream")
    return BackendUnreachable(f"backend unreachable: {exc.__class__.__name__}")


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    try:
        raw: bytes | None = await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        raw = None
    raise _status_error(resp.status, raw, rate_headers(resp.headers.items()))


def rate_headers(items: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The rate-limit headers of a response (``x-ratelimit-*``, ``retry-after``,
    ``retry-after-ms``), names in lower case."""
    out = {}
    for name, value in items:
        low = name.lower()
        if low.startswith(("x-ratelimit-", "retry-after")):
            out[low] = value
    return out


def _status_error(
    status: int, raw: bytes | None, headers: Mapping[str, str] | None = None
) -> GatewayError:
    """The error for a non-200 answer before streaming with body ``raw`` (None: the body
    broke off) and rate-limit ``headers``."""
    if raw is None:
        return BackendUnreachable(
            f"backend answered {status} and broke off", kind="error_before_stream"
        )
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if status >= 500 or status in (401, 403) or not isinstance(body, dict):
        # 401/403: the backend refuses the gateway's own credentials (backends[].api_key), not
        # the client's request: treat it as a failing backend, never pass it to the client
        return BackendUnreachable(
            f"backend answered {status} before streaming", kind="error_before_stream"
        )
    return BackendRejected(status, body, headers)
