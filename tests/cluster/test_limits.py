"""Limits that count every replica's requests: ``max_queued`` and the ``rpm`` policy's limit.

Each replica reports with its sync how many requests of each tenant wait there (and, under
``rpm``, how many it admitted in the last minute); the sync's reply sums them over the
replicas, and a replica admits a request only while its own count and the others' stay below
the limit. The others' counts are a sync old at most: the tests wait until a replica's view
has them (what it would have after one sync interval) before they send to it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.cluster.dispatch import ADMITTED, QUEUED, SEP

from ..gateway.conftest import MODEL, tenants, wait_for
from .conftest import RedisServer
from .test_replicas_tree import UNLIMITED, replicas


async def post(http: httpx.AsyncClient, url: str, tenant: str, max_tokens: int = 8) -> int:
    body = {"model": MODEL, "prompt": "hello " * 10, "max_tokens": max_tokens, "ignore_eos": True}
    resp = await http.post(
        f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer key-{tenant}"}
    )
    return resp.status_code


async def test_max_queued_counts_the_queue_of_every_replica(redis_server: RedisServer) -> None:
    ts: list[dict[str, Any]] = tenants(("a", 1), ("z", 1))
    ts[0]["max_queued"] = 4
    async with replicas(redis_server, {"tenants": ts}, seqs=1) as r:
        store = r.states[1].dispatcher.core.store
        assert store is not None
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            # z holds the only slot for a while; three of a's requests queue at replica 0
            blocker = asyncio.create_task(post(http, r.url(1), "z", 400))
            await wait_for(lambda: r.running("z") == 1, limit_s=30)
            first = [asyncio.create_task(post(http, r.url(0), "a")) for _ in range(3)]
            await wait_for(lambda: store.tally_elsewhere(f"{QUEUED}a") == 3, limit_s=30)
            # replica 1 has none of a's queued, yet takes only one more: 3 + 1 = 4
            fourth = asyncio.create_task(post(http, r.url(1), "a"))
            await wait_for(lambda: r.queued("a") == 4, limit_s=30)
            assert await post(http, r.url(1), "a") == 429
            assert r.queued("a") == 4
            assert await asyncio.gather(blocker, fourth, *first) == [200] * 5
        await r.assert_clean()


async def test_the_rpm_limit_counts_what_every_replica_admitted(
    redis_server: RedisServer,
) -> None:
    gw = {"tenants": tenants(("a", 1)), "scheduler": {"policy": "rpm", "rpm_limit": 5}}
    async with replicas(redis_server, gw, seqs=4) as r:
        store = r.states[1].dispatcher.core.store
        assert store is not None
        async with httpx.AsyncClient(timeout=60, limits=UNLIMITED) as http:
            assert [await post(http, r.url(0), "a") for _ in range(3)] == [200] * 3
            await wait_for(lambda: store.tally_elsewhere(f"{ADMITTED}{MODEL}{SEP}a") == 3)
            # replica 1 admitted none in this minute, yet only two more: 3 + 2 = 5
            assert [await post(http, r.url(1), "a") for _ in range(3)] == [200, 200, 429]
            other = r.states[0].dispatcher.core.store
            assert other is not None  # and replica 0 hears of those two
            await wait_for(lambda: other.tally_elsewhere(f"{ADMITTED}{MODEL}{SEP}a") == 2)
            assert await post(http, r.url(0), "a") == 429
        await r.assert_clean()
