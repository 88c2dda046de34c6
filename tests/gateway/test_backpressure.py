"""A slow reader: the gateway stops reading upstream instead of buffering without limit."""

from __future__ import annotations

import asyncio
import json
import socket

from .conftest import MODEL, gateway_stack, wait_for

MAX_TOKENS = 50_000  # ~7 MB of SSE: more than every socket buffer on the way can hold


async def _start_long_stream(
    url: str,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Start a MAX_TOKENS stream over a socket with a tiny receive buffer; return once the
    response status line has arrived (the caller decides when, if ever, to read on)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    body = json.dumps(
        {
            "model": MODEL,
            "prompt": "go",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
    ).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-a\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_slow_reader_gets_backpressure_not_unbounded_buffering() -> None:
    sim = {"speed": 0, "max_model_len": 60_000}
    async with gateway_stack(sim=sim) as stack:
        pool = stack.state.dispatcher.core.pool(MODEL)
        reader, writer = await _start_long_stream(stack.url)
        # Stop reading. The charge follows what the gateway has read from upstream: it must
        # stall far below the full answer.
        prompt = stack.state.counter.count_text("go")

        def out_tokens() -> float:
            return (pool.counter("a") - prompt) / 2

        last = -1.0
        while out_tokens() != last:
            last = out_tokens()
            await asyncio.sleep(0.5)  # sampling a rate, not synchronising
        assert 0 < last < MAX_TOKENS / 2, last
        # Reading again lets the stream run to its end.
        tail = b""
        while b"data: [DONE]\n\n" not in tail:  # (chunked encoding follows it)
            chunk = await asyncio.wait_for(reader.read(1 << 16), 60)
            assert chunk
            tail = (tail + chunk)[-128:]
        assert out_tokens() == MAX_TOKENS
        writer.close()


async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout() -> None:
    sim = {"speed": 0, "max_model_len": 60_000}
    gw = {"limits": {"client_write_timeout_s": 1, "health_interval_s": 60}}
    async with gateway_stack(sim=sim, gateway=gw) as stack:
        _, writer = await _start_long_stream(stack.url)
        # never read again: the slot must come back without the client's help
        await wait_for(lambda: stack.state.admission.in_flight() == 0, limit_s=60)
        assert stack.state.stats.outcomes[("a", "client_cancelled")] == 1
        await wait_for(lambda: stack.sims[0].core.num_running == 0)  # upstream aborted
        writer.close()
