"""Splitting a streamed response body into SSE ``data:`` payloads, one network read at a time
(shared by both HTTP clients)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from ..errors import StreamBroken


class SseSplitter:
    """Feed each read's bytes; get that read's complete ``data:`` payloads. :attr:`done` turns
    true at ``data: [DONE]`` (payloads after it are never returned)."""

    __slots__ = ("_rest", "done")

    def __init__(self) -> None:
        self._rest = b""
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        if (  # the common read: exactly one whole event, "data: ...\n\n"
            not self._rest
            and data.startswith(b"data:")
            and data.find(b"\n") == len(data) - 2
            and data.endswith(b"\n\n")
            and b"\r" not in data
        ):
            payload = data[5:-2].strip()
            if payload == b"[DONE]":
                self.done = True
                return []
            return [payload]
        if self._rest:
            data = self._rest + data
        if b"\r" in data:  # CRLF or CR line ends: blank lines are skipped anyway
            data = data.replace(b"\r", b"\n")
        end = data.rfind(b"\n")
        if end < 0:
            self._rest = data
            return []
        self._rest = data[end + 1 :]
        batch: list[bytes] = []
        for line in data[:end].split(b"\n"):
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    break
                batch.append(payload)
            # blank separators, comments (": ping") and other fields are skipped
        return batch


class _Finishable(Protocol):
    finished: bool


async def sse_batches(
    read: Callable[[], Awaitable[bytes]], stream: _Finishable
) -> AsyncIterator[list[bytes]]:
    """The ``data:`` payloads of each read (a non-empty list) until ``[DONE]``, which sets
    ``stream.finished``. ``read`` returns the next body bytes, b"" at the end of the body, and
    raises :class:`StreamBroken` itself."""
    split = SseSplitter()
    while True:
        data = await read()
        if not data:
            raise StreamBroken("backend closed the stream before [DONE]")
        batch = split.feed(data)
        if split.done:
            stream.finished = True
            if batch:
                yield batch
            return
        if batch:
            yield batch
