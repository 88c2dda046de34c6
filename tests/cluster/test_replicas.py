"""Two gateway replicas (in this process, each with its own dispatcher and Redis link) in front
of one simulated backend, sharing one Redis: live HTTP, order of dispatches across replicas.

Assertions are about the order of dispatches while tenants are backlogged, never durations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from aiohttp.test_utils import TestServer

from backends.sim.config import SimConfig
from backends.sim.server import SimServer
from gateway.config import parse_config
from gateway.dispatcher import Dispatcher
from gateway.scheduler import Job
from gateway.server import STATE, create_app

from ..gateway.conftest import MODEL, tenants, wait_for
from .conftest import RedisServer

PROMPT = "tell me a story " * 6
MAX_TOKENS = 16
SEQS = 2
UNLIMITED = httpx.Limits(max_connections=None, max_keepalive_connections=None)


@dataclass
class Replicas:
    urls: list[str]
    dispatchers: list[Dispatcher]
    order: list[str]  # tenants in dispatch order, across replicas


@contextlib.asynccontextmanager
async def replicas(
    redis: RedisServer | None,
    weights: tuple[tuple[str, float], ...],
    n: int = 2,
) -> AsyncIterator[Replicas]:
    """``n`` gateways on one simulated backend; shared through ``redis`` (None: each alone)."""
    async with contextlib.AsyncExitStack() as stack:
        sim = await stack.enter_async_context(SimServer(SimConfig(port=0, speed=20.0)))
        order: list[str] = []
        urls, dispatchers = [], []
        for i in range(n):
            raw: dict[str, Any] = {
                "backends": [
                    {"name": "sim", "url": sim.url, "max_num_seqs": SEQS, "max_kv_tokens": 4096}
                ],
                "tenants": tenants(*weights),
                "limits": {"health_interval_s": 60},
            }
            if redis is not None:
                raw["cluster"] = {"url": redis.url, "replica_id": f"r{i}"}
            app = create_app(parse_config(raw))
            server = TestServer(app, handler_cancellation=True)
            await server.start_server()
            stack.push_async_callback(server.close)
            d = app[STATE].dispatcher

            def record(job: Job) -> None:
                order.append(job.tenant)

            d.on_dispatch = record
            urls.append(str(server.make_url("")).rstrip("/"))
            dispatchers.append(d)
        yield Replicas(urls, dispatchers, order)


async def _send(http: httpx.AsyncClient, url: str, tenant: str) -> None:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer key-{tenant}"}
    async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        assert resp.status_code == 200
        async for _ in resp.aiter_lines():
            pass


async def _flood(r: Replicas, routes: dict[str, tuple[int, list[int]]]) -> list[str]:
    """Each tenant sends its number of requests at once through its replicas (round robin);
    returns the dispatch order while every tenant still had requests waiting."""
    async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
        tasks = [
            asyncio.create_task(_send(http, r.urls[reps[i % len(reps)]], tenant))
            for tenant, (count, reps) in routes.items()
            for i in range(count)
        ]
        total = len(tasks)
        await wait_for(
            lambda: sum(d.core.total_queued() for d in r.dispatchers) + len(r.order) == total
        )
        await asyncio.gather(*tasks)
    # the window in which all tenants were backlogged: up to the first tenant's last dispatch
    end = min(max(i for i, t in enumerate(r.order) if t == tenant) for tenant in routes)
    return r.order[SEQS * len(routes) : end + 1]


async def test_weights_hold_across_replicas(redis_server: RedisServer) -> None:
    """a (weight 1) only through replica 0, b (weight 4) only through replica 1, both flooding:
    b gets four dispatches for every one of a's, as in one gateway."""
    async with replicas(redis_server, (("a", 1), ("b", 4))) as r:
        window = await _flood(r, {"a": (50, [0]), "b": (200, [1])})
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{r.urls[0]}/metrics")).text
        assert 'vtc_cluster_shared{replica="r0"} 1.0' in text
        assert 'vtc_cluster_slots_held{backend="sim",replica="r0"} 0.0' in text  # none leaked
        assert 'vtc_cluster_fallbacks_total{replica="r0"} 0.0' in text
    ratio = window.count("a") / window.count("b")
    assert 0.25 * 0.9 <= ratio <= 0.25 * 1.1, (ratio, window)


async def test_without_sharing_each_replica_serves_its_own(redis_server: RedisServer) -> None:
    """The baseline: two independent gateways give a and b about the same, whatever weights."""
    async with replicas(None, (("a", 1), ("b", 4))) as r:
        window = await _flood(r, {"a": (60, [0]), "b": (60, [1])})
    ratio = window.count("a") / window.count("b")
    assert ratio > 0.6, (ratio, window)


async def test_three_tenants_split_across_replicas_get_a_third_each(
    redis_server: RedisServer,
) -> None:
    """a only on replica 0, b only on replica 1, c on both: each gets a third."""
    async with replicas(redis_server, (("a", 1), ("b", 1), ("c", 1))) as r:
        window = await _flood(r, {"a": (80, [0]), "b": (80, [1]), "c": (80, [0, 1])})
    for tenant in "abc":
        share = window.count(tenant) / len(window)
        assert abs(share - 1 / 3) <= 0.1 / 3, (tenant, share, window)


async def test_idle_tenant_arriving_at_another_replica_is_lifted(
    redis_server: RedisServer,
) -> None:
    """a floods replica 0 for a while; then n, never seen before, floods replica 1. n starts
    from a's counter (the lift), so the two alternate instead of n taking every slot until it
    has caught up with a's whole history."""
    async with replicas(redis_server, (("a", 1), ("n", 1))) as r:
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            flood_a = [asyncio.create_task(_send(http, r.urls[0], "a")) for _ in range(80)]
            await wait_for(lambda: len(r.order) >= 30)  # a has been served a good while
            flood_n = [asyncio.create_task(_send(http, r.urls[1], "n")) for _ in range(40)]
            await asyncio.gather(*flood_n)
            after = r.order[r.order.index("n") :]
            await asyncio.gather(*flood_a)
    first = after[:40]
    share_n = first.count("n") / len(first)
    assert 0.35 <= share_n <= 0.65, (share_n, r.order)  # lifted; without the lift: all n
