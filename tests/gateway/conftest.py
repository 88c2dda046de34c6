"""Fixtures: a simulated backend and a gateway in front of it, both in-process on port 0."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
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
    sim_url: str
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
) -> AsyncIterator[Stack]:
    sim_cfg = SimConfig(port=0, **{"speed": 4.0, **(sim or {})})
    async with SimServer(sim_cfg) as srv:
        raw: dict[str, Any] = {
            "backends": [{"name": "sim", "url": str(srv.url), **(backend or {})}],
            "tenants": tenants(("a", 1), ("b", 1)),
            "limits": {"health_interval_s": 60},
        }
        raw.update(gateway or {})
        app = create_app(parse_config(raw))
        server = TestServer(app, handler_cancellation=True)
        await server.start_server()
        try:
            yield Stack(str(server.make_url("")).rstrip("/"), str(srv.url), app)
        finally:
            await server.close()


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
