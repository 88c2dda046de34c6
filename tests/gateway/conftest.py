"""Fixtures: a simulated backend and a gateway in front of it, both in-process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from backends.sim.config import SimConfig
from backends.sim.server import SimServer
from gateway.config import parse_config
from gateway.server import STATE, GatewayState, create_app

MODEL = "sim-llama-3-8b"


@dataclass
class Stack:
    url: str  # gateway base URL
    sims: list[SimServer]  # backends, in config order
    app: web.Application

    @property
    def state(self) -> GatewayState:
        return self.app[STATE]


def tenants(*names_weights: tuple[str, float], max_queued: int = 1024) -> list[dict[str, Any]]:
    return [
        {"name": n, "weight": w, "api_keys": [f"key-{n}"], "max_queued": max_queued}
        for n, w in names_weights
    ]


@contextlib.asynccontextmanager
async def gateway_stack(
    *,
    gateway: dict[str, Any] | None = None,
    backend: dict[str, Any] | None = None,
    sim: dict[str, Any] | None = None,
    more_backends: Sequence[tuple[dict[str, Any], dict[str, Any]]] = (),
) -> AsyncIterator[Stack]:
    """Simulated backend(s) and a gateway in front. ``sim``/``backend`` configure the first
    backend (SimConfig fields / gateway backend entry); ``more_backends`` adds (sim, backend)
    pairs named sim1, sim2, ..."""
    specs = [(sim or {}, backend or {}), *more_backends]
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        entries = []
        for i, (sim_kw, backend_kw) in enumerate(specs):
            srv = await stack.enter_async_context(
                SimServer(SimConfig(port=0, **{"speed": 4.0, **sim_kw}))
            )
            servers.append(srv)
            entries.append({"name": "sim" if i == 0 else f"sim{i}", "url": srv.url, **backend_kw})
        raw: dict[str, Any] = {
            "backends": entries,
            "tenants": tenants(("a", 1), ("b", 1)),
            "limits": {"health_interval_s": 60},
        }
        raw.update(gateway or {})
        app = create_app(parse_config(raw))
        server = TestServer(app, handler_cancellation=True)
        await server.start_server()
        stack.push_async_callback(server.close)
        yield Stack(str(server.make_url("")).rstrip("/"), servers, app)


@contextlib.asynccontextmanager
async def gateway_output(
    *args: str, lines: int = 1, graceful: bool = False
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list[str]]]:
    """``python -m gateway serve --port 0 ARGS``; yields the process and the first ``lines``
    lines it printed. Killed after; with ``graceful`` it gets SIGTERM first (a ``--workers``
    parent then stops its workers), SIGKILL only after 30 s."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "--log-level",
        "WARNING",
        "serve",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        out = [(await asyncio.wait_for(proc.stdout.readline(), 60)).decode() for _ in range(lines)]
        yield proc, out
    finally:
        if proc.returncode is None:
            if graceful:
                proc.terminate()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 30)
            if proc.returncode is None:
                proc.kill()
        await proc.wait()


def url_of(line: str) -> str:
    """The base URL of a ``listening on URL`` line."""
    assert line.startswith("listening on http://"), line
    return line.split()[-1]


@contextlib.asynccontextmanager
async def gateway_process(*args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    """``python -m gateway serve --port 0 ARGS``; yields (process, base URL), kills it after."""
    async with gateway_output(*args) as (proc, out):
        yield proc, url_of(out[0])


async def wait_for(cond: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Wait until ``cond()`` holds, checking after every event-loop turn (bounded)."""
    deadline = time.monotonic() + limit_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def make_stack() -> Callable[..., contextlib.AbstractAsyncContextManager[Stack]]:
    return gateway_stack
