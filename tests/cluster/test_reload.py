"""A reload of the tenant tree in cluster mode: the shared order learns where the replica's
waiting tenants sit now, and their groups' places move with them.

One replica (with its Redis link) in front of a simulated backend of one slot: tenant a1 runs
one long request and has a second waiting; the reload moves a1 from org-a to org-b. The shared
order (read straight from Redis) must then hold a1 under org-b, org-b under its tier's root,
and org-a nowhere in the backlog, with a1's demand counted under org-b.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from backends.sim.config import SimConfig
from backends.sim.server import SimServer
from gateway.config import parse_config
from gateway.reload import apply_config
from gateway.server import STATE, create_app

from ..gateway.conftest import MODEL, tenants, wait_for
from .conftest import RedisServer

SEP = "\x1f"


def tree(a1_in: str) -> list[dict[str, Any]]:
    orgs: dict[str, list[dict[str, Any]]] = {"org-a": [], "org-b": tenants(("b", 1))}
    orgs[a1_in] += tenants(("a1", 1))
    return [{"name": name, "tenants": kids} for name, kids in orgs.items() if kids]


async def until(read: Callable[[], Awaitable[Any]], want: Any, limit_s: float = 10.0) -> None:
    """Poll ``read()`` until it returns ``want`` (bounded)."""
    deadline = time.monotonic() + limit_s
    while (got := await read()) != want:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.005)


async def test_a_reload_moves_a_waiting_tenant_in_the_shared_order(
    redis_server: RedisServer,
) -> None:
    async with SimServer(SimConfig(port=0, speed=2.0, max_num_seqs=1)) as sim:

        def config(a1_in: str) -> Any:
            return parse_config(
                {
                    "backends": [{"name": "sim", "url": sim.url, "max_num_seqs": 1}],
                    "tenants": tree(a1_in),
                    "limits": {"health_interval_s": 60},
                    "cluster": {"url": redis_server.url, "replica_id": "r0"},
                }
            )

        app = create_app(config("org-a"))
        server = TestServer(app, handler_cancellation=True)
        await server.start_server()
        raw = aioredis.Redis.from_url(redis_server.url)
        state = app[STATE]
        core = state.dispatcher.core
        body = {"model": MODEL, "prompt": "go", "max_tokens": 3000, "ignore_eos": True}
        headers = {"Authorization": "Bearer key-a1"}
        p = f"{{vtc}}:bl:{MODEL}{SEP}"

        async def backlog(parent: str) -> set[bytes]:
            return set(await raw.zrange(p + parent, 0, -1))

        try:
            async with httpx.AsyncClient(base_url=str(server.make_url("")), timeout=60) as http:
                sends = [
                    asyncio.create_task(http.post("/v1/completions", json=body, headers=headers))
                    for _ in range(2)
                ]
                await wait_for(lambda: core.running.get("a1") == 1 and core.queued("a1") == 1)
                up = f"{{vtc}}:up:{MODEL}"
                await until(lambda: backlog("org-a"), {b"a1"})  # the mark reached Redis
                assert await raw.hget(up, "a1") == b"org-a"

                apply_config(state, config("org-b"))  # a1 moves to org-b

                await until(lambda: backlog("org-b"), {b"a1"})  # the registration moved it
                assert await raw.hget(up, "a1") == b"org-b"
                assert await backlog("~t0") == {b"org-b"}  # org-a left the backlog
                assert await backlog("org-a") == set()
                demand = await raw.hgetall(f"{{vtc}}:d:{MODEL}")
                assert demand == {b"a1": b"1", b"org-b": b"1", b"~t0": b"1"}
                for task in sends:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*sends, return_exceptions=True)
                await wait_for(lambda: state.admission.in_flight() == 0)
        finally:
            await raw.aclose()
            await server.close()
