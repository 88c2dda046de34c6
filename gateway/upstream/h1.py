"""The streaming POST on a lean HTTP/1.1 client: an asyncio protocol and httptools' parser.

The relay reads one upstream response per request, chunk by chunk, for the whole stream. A
general-purpose client pays per network read for its stream reader (a buffer, a waiter and a
read-timeout timer re-armed on every read) and per request for building a request object. Here
a read is parsed in C (httptools, llhttp) straight into a list the stream drains, one future
per wait, and one timer per stream that checks the read timeout lazily; the request is one
write of prebuilt header bytes and the body.

Used for ``http://`` backends when httptools is installed (``AiohttpUpstream(lean=None)``);
everything else (TLS backends, discovery, metrics, tokenize, health) stays on aiohttp. The same
errors as the aiohttp path: :class:`BackendUnreachable` before the stream, :class:`StreamBroken`
after; leaving the stream before ``[DONE]`` closes the connection (vLLM aborts the request);
a completed response returns its connection to a keep-alive pool.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httptools

from ..errors import BackendUnreachable, StreamBroken
from .sse import sse_batches

#: Body bytes buffered before reading from the backend pauses (the client is slower).
_HIGH_WATER = 64 * 1024
#: A response that sent ``[DONE]`` gets this long to end its message before its
#: connection is closed instead of pooled.
_TAIL_S = 5.0


class _Lost(Exception):
    """The connection closed (or broke) while a response was awaited or read."""

    def __init__(self, got_bytes: bool, cause: BaseException | None) -> None:
        super().__init__(cause.__class__.__name__ if cause is not None else "closed")
        self.got_bytes = got_bytes  # any response byte arrived before the loss


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a backend, carrying one response at a time."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, idle: list[_Conn], live: set[_Conn]
    ) -> None:
        self._loop = loop
        self._idle = idle  # the pool this connection returns to
        self._live = live  # every open connection of the client (closed on shutdown)
        self.gen = 0  # requests sent on this connection
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.keep_alive = False
        self.headers_done = False
        self.complete = False
        self.got_bytes = False
        self.buf: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.closed = False
        self.lost: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.activity = 0.0  # loop time of the last read, or of the start of the last wait
        self.release_on_complete = False
        self.rate_headers: dict[str, str] = {}  # x-ratelimit-*, retry-after* of the response

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._live.add(self)

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:  # bytes on an idle connection: it cannot be reused
            self.close()
            return
        self.activity = self._loop.time()
        self.got_bytes = True
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.lost = exc
            self.close()
            self._wake()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        if self.lost is None:
            self.lost = exc
        if self in self._idle:
            self._idle.remove(self)
        self._live.discard(self)
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        if name[:1] in b"xXrR":  # only rate-limit headers are kept (one test per header)
            low = name.lower()
            if low.startswith((b"x-ratelimit-", b"retry-after")):
                self.rate_headers[low.decode("latin-1")] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # (no longer known once complete)
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.buf.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        if self.release_on_complete:
            self.release()
        else:
            self._wake()

    # -- used by the stream --------------------------------------------------------------------
    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def start(self, request: bytes) -> None:
        """Send one request; the response is parsed from here on."""
        self.parser = httptools.HttpResponseParser(self)
        self.gen += 1
        self.status = 0
        self.headers_done = self.complete = self.got_bytes = self.release_on_complete = False
        if self.rate_headers:
            self.rate_headers = {}
        self.buf.clear()
        self.buffered = 0
        self.activity = self._loop.time()
        assert self.transport is not None
        self.transport.write(request)

    async def wait(self) -> None:
        """Until the next parser event or the loss of the connection."""
        if self.closed:
            raise _Lost(self.got_bytes, self.lost)
        fut = self._loop.create_future()
        self.waiter = fut
        self.activity = self._loop.time()
        await fut
        if self.closed and not self.buf and not self.complete:
            raise _Lost(self.got_bytes, self.lost)

    def take(self) -> bytes:
        """The body bytes read so far (b"" when none), resuming a paused read."""
        buf = self.buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self.buffered = 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    def stalled(self, now: float, limit: float) -> bool:
        return self.waiter is not None and now - self.activity >= limit

    def fail_waiter(self, exc: BaseException) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_exception(exc)

    def release(self) -> None:
        """Back to the pool if the response is complete and the connection reusable."""
        reusable = self.parser is not None and self.complete and self.keep_alive
        self.parser = None
        if reusable and not self.closed and not self.paused:
            self._idle.append(self)
        else:
            self.close()

    def close(self) -> None:
        self.parser = None
        if self.transport is not None and not self.closed:
            self.transport.close()  # closing aborts an unfinished request inside vLLM
        self.closed = True


class H1Stream:
    """A started response (status 200): its ``data:`` payloads, batched per read."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.finished = False  # [DONE] was read
        self.rate_headers = conn.rate_headers

    async def _read(self) -> bytes:
        """The next body bytes; b"" at the end of the response."""
        conn = self._conn
        try:
            while not conn.buf:
                if conn.complete:
                    return b""
                await conn.wait()
        except TimeoutError as exc:
            raise StreamBroken("backend stalled: no data within the read timeout") from exc
        except _Lost as exc:
            raise StreamBroken(f"backend connection failed mid-stream: {exc}") from exc
        return conn.take()

    def batches(self) -> AsyncIterator[list[bytes]]:
        """The ``data:`` payloads of each network read (as on the aiohttp path)."""
        return sse_batches(self._read, self)


class H1Client:
    """Keep-alive connections per backend address and the streaming POST over them."""

    def __init__(
        self,
        connect_timeout: float,
        read_timeout: float,
        headers: Mapping[str, Mapping[str, str]],
        status_error: Callable[[int, bytes | None, Mapping[str, str]], Exception],
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._headers = headers  # backend URL -> extra headers (Authorization)
        self._status_error = status_error  # (status, body or None) -> the error to raise
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._heads: dict[tuple[str, str], tuple[tuple[str, int], bytes]] = {}
        self._live: set[_Conn] = set()

    @staticmethod
    def supports(url: str) -> bool:
        return url.startswith("http://")

    def _head(self, url: str, path: str) -> tuple[tuple[str, int], bytes]:
        """(address, request head up to the Content-Length value), built once per URL."""
        key = (url, path)
        cached = self._heads.get(key)
        if cached is None:
            parts = urlsplit(url + path)
            host = parts.hostname or "localhost"
            port = parts.port or 80
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            lines = [
                f"POST {target} HTTP/1.1",
                f"Host: {parts.netloc}",
                "Content-Type: application/json",
                "Accept: */*",
                *(f"{k}: {v}" for k, v in self._headers.get(url, {}).items()),
                "Content-Length: ",
            ]
            cached = ((host, port), "\r\n".join(lines).encode("latin-1"))
            self._heads[key] = cached
        return cached

    async def _connect(self, addr: tuple[str, int]) -> _Conn:
        loop = asyncio.get_running_loop()
        idle = self._idle.setdefault(addr, [])
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(lambda: _Conn(loop, idle, self._live), *addr)
        except (OSError, TimeoutError) as exc:
            raise BackendUnreachable(f"backend unreachable: {exc.__class__.__name__}") from exc
        return conn

    def _stall_check(self, conn: _Conn, timer: list[asyncio.TimerHandle]) -> None:
        """The stream's one read-timeout timer: fail a wait idle past the limit, else re-arm
        at the earliest moment the limit can be reached."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        if conn.stalled(now, self._read_timeout):
            conn.fail_waiter(TimeoutError())
            return
        due = max(conn.activity + self._read_timeout, now + 0.001)
        timer[0] = loop.call_at(due, self._stall_check, conn, timer)

    @asynccontextmanager
    async def open(self, url: str, path: str, body: bytes) -> AsyncIterator[H1Stream]:
        addr, head = self._head(url, path)
        request = b"%b%d\r\n\r\n%b" % (head, len(body), body)
        loop = asyncio.get_running_loop()
        conn: _Conn | None = None
        timer: list[asyncio.TimerHandle] = []
        stream: H1Stream | None = None
        try:
            idle = self._idle.get(addr)
            for reused in (True, False):  # a pooled connection the backend closed: retry fresh
                if reused:
                    if not idle:
                        continue
                    conn = idle.pop()
                else:
                    conn = await self._connect(addr)
                conn.start(request)
                if not timer:
                    timer.append(
                        loop.call_at(
                            loop.time() + self._read_timeout, self._stall_check, conn, timer
                        )
                    )
                try:
                    while not conn.headers_done:
                        await conn.wait()
                    break
                except _Lost as exc:
                    if reused and not exc.got_bytes:
                        timer[0].cancel()
                        timer.clear()
                        continue
                    raise BackendUnreachable(f"backend unreachable: {exc}") from exc
                except TimeoutError as exc:
                    raise BackendUnreachable("backend unreachable: TimeoutError") from exc
            assert conn is not None
            if conn.status != 200:
                raise self._status_error(conn.status, await _error_body(conn), conn.rate_headers)
            stream = H1Stream(conn)
            yield stream
        finally:
            if timer:
                timer[0].cancel()
            if conn is not None:
                _settle(conn, stream, loop)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in list(idle):
                conn.close()
            idle.clear()
        for conn in list(self._live):
            conn.close()
        self._live.clear()


async def _error_body(conn: _Conn) -> bytes | None:
    """A refused request's answer (None: lost or too slow)."""
    try:
        while not conn.complete:
            await conn.wait()
        return conn.take()
    except (_Lost, TimeoutError):
        return None


def _settle(conn: _Conn, stream: H1Stream | None, loop: asyncio.AbstractEventLoop) -> None:
    """The connection after its request: back to the pool when its message ended, pooled
    once it ends when the stream was read to ``[DONE]``, else closed."""
    if stream is not None and stream.finished and not conn.complete:
        if conn.closed:
            conn.close()
        else:  # [DONE] read, the message's end still to come: pool it then
            conn.release_on_complete = True
            loop.call_later(_TAIL_S, _close_unless_complete, conn, conn.gen)
    elif conn.complete and (stream is None or stream.finished or conn.status != 200):
        conn.release()
    else:
        conn.close()


def _close_unless_complete(conn: _Conn, gen: int) -> None:
    if conn.gen == gen and not conn.complete:
        conn.release_on_complete = False
        conn.close()
