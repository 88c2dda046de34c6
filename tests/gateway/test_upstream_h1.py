"""The lean streaming client (gateway/upstream/h1.py) against the simulated backend: the same
payloads as the aiohttp path, keep-alive reuse, abort on early exit, stale pooled connections,
errors before the stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backends.sim.config import SimConfig
from backends.sim.faults import parse_fault
from backends.sim.server import SimServer
from gateway.errors import BackendRejected, BackendUnreachable, StreamBroken
from gateway.upstream.http import AiohttpUpstream

from .conftest import wait_for


def _body(model: str, max_tokens: int = 6, **extra: Any) -> bytes:
    return json.dumps(
        {
            "model": model,
            "prompt": "hello there",
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "seed": 7,
            **extra,
        }
    ).encode()


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig(port=0, speed=4.0)) as srv:
        yield srv


async def _upstream(lean: bool, read_timeout: float = 30.0) -> AiohttpUpstream:
    up = AiohttpUpstream(connect_timeout=5.0, read_timeout=read_timeout, lean=lean)
    await up.start()
    return up


async def _payloads(up: AiohttpUpstream, url: str, body: bytes) -> list[bytes]:
    out: list[bytes] = []
    async with up.open(url, "/v1/completions", body) as stream:
        async for batch in stream.batches():
            out.extend(batch)
    return out


def _stable(payload: bytes) -> bytes:
    """A payload without its per-request id and timestamp."""
    obj = json.loads(payload)
    obj.pop("id", None)
    obj.pop("created", None)
    return json.dumps(obj).encode()


async def test_lean_and_aiohttp_paths_yield_the_same_payloads(sim: SimServer) -> None:
    lean, plain = await _upstream(True), await _upstream(False)
    try:
        model = (await plain.models(sim.url))[0].id
        a = await _payloads(lean, sim.url, _body(model, 12))
        b = await _payloads(plain, sim.url, _body(model, 12))
    finally:
        await lean.close()
        await plain.close()
    assert len(a) == 13  # 12 tokens, then the usage-only chunk
    assert [_stable(p) for p in a] == [_stable(p) for p in b]


async def test_completed_streams_reuse_one_connection(sim: SimServer) -> None:
    up = await _upstream(True)
    try:
        model = (await up.models(sim.url))[0].id
        h1 = up._h1
        for _ in range(4):
            assert len(await _payloads(up, sim.url, _body(model))) == 7
            # [DONE] may come before the end of the chunked message: pooled once it arrives
            await wait_for(lambda: sum(len(v) for v in h1._idle.values()) == 1)
        assert len(h1._live) == 1
    finally:
        await up.close()
    assert not h1._live


async def test_leaving_before_done_closes_the_connection_and_aborts_the_request(
    sim: SimServer,
) -> None:
    up = await _upstream(True)
    try:
        model = (await up.models(sim.url))[0].id
        async with up.open(sim.url, "/v1/completions", _body(model, 5000)) as stream:
            async for _ in stream.batches():
                assert sim.core.num_running == 1
                break
        assert not any(up._h1._idle.values())
        await wait_for(lambda: sim.core.num_running == 0)
    finally:
        await up.close()


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def test_a_pooled_connection_the_backend_closed_is_replaced() -> None:
    """A backend that closes a kept-alive connection as the next request arrives (its idle
    timeout racing the request): the request goes out again on a fresh connection."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for n in (1, 2):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if n == 2:  # the second request on this connection: gone without an answer
                    return
                served.append(n)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n"
                    + _chunk(b'data: {"n":%d}\n\n' % len(served))
                    + _chunk(b"data: [DONE]\n\n")
                    + b"0\r\n\r\n"
                )
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client closed the connection
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    up = await _upstream(True)
    try:
        assert await _payloads(up, url, b"{}") == [b'{"n":1}']
        await wait_for(lambda: sum(len(v) for v in up._h1._idle.values()) == 1)
        assert await _payloads(up, url, b"{}") == [b'{"n":2}']  # retried once, fresh
        assert served == [1, 1]
    finally:
        await up.close()
        server.close()
        await server.wait_closed()


async def test_errors_before_the_stream_are_the_projects_own(sim: SimServer) -> None:
    up = await _upstream(True)
    try:
        with pytest.raises(BackendRejected) as rejected:
            await _payloads(up, sim.url, _body("no-such-model"))
        assert rejected.value.status == 404
        # the connection that carried the error answer is reused
        model = (await up.models(sim.url))[0].id
        assert len(await _payloads(up, sim.url, _body(model))) == 7
        with pytest.raises(BackendUnreachable):
            await _payloads(up, "http://127.0.0.1:9", _body(model))
    finally:
        await up.close()


async def test_a_stalled_stream_fails_after_the_read_timeout() -> None:
    stall = SimConfig(port=0, speed=4.0, faults=(parse_fault("stall_mid;after=2"),))
    async with SimServer(stall) as srv:
        up = await _upstream(True, read_timeout=0.3)
        try:
            model = (await up.models(srv.url))[0].id
            got: list[bytes] = []
            with pytest.raises(StreamBroken, match="stalled"):
                async with up.open(srv.url, "/v1/completions", _body(model, 32)) as stream:
                    async for batch in stream.batches():
                        got.extend(batch)
            assert 1 <= len(got) <= 3
        finally:
            await up.close()
