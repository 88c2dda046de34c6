"""Shared helpers for the simulator tests: in-process servers on free ports, bounded waits."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from backends.sim.config import SimConfig
from backends.sim.server import SimServer


async def wait_until(cond: Callable[[], bool], limit: float = 5.0, what: str = "") -> None:
    """Wait for ``cond()`` on engine state, re-checking every 5 ms; fail after ``limit`` s."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit}s waiting for {what or cond}")
        await asyncio.sleep(0.005)


def sim_config(**kw: Any) -> SimConfig:
    """A fast test config: free port, h100 profile, 20x speed unless overridden."""
    base: dict[str, Any] = {"port": 0, "speed": 20.0, "max_model_len": 2048}
    base.update(kw)
    return SimConfig(**base)


@pytest.fixture
async def srv() -> AsyncIterator[SimServer]:
    async with SimServer(sim_config()) as server:
        yield server


@pytest.fixture
async def http(srv: SimServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=srv.url, timeout=10.0) as client:
        yield client


def parse_sse(raw: str) -> list[Any]:
    """Split an SSE body into events: parsed JSON objects, or the literal ``"[DONE]"``."""
    events: list[Any] = []
    assert raw.endswith("\n\n"), raw[-50:]
    for block in raw.split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return events
