"""An idle cluster dispatches without a round trip: a replica whose view (from its last sync)
has nobody waiting for the model grants the request at once on a slot it leased (booked
through the order and the room rule), and the shared order hears it with the next round trip
(a forced claim: the lift, the charge, the booking adjusted to the request). The request is
charged once, and nothing stays booked but the leased slots.

The view's age limit is raised for the test (``view_s``): on a loaded machine a sync tick can
come late, and the request then goes the claim's way, which is correct but not what is tested.
"""

from __future__ import annotations

import httpx
import redis.asyncio as aioredis

from ..gateway.conftest import MODEL, tenants, wait_for
from .conftest import RedisServer
from .test_reload import until
from .test_replicas_tree import UNLIMITED, replicas


async def test_idle_requests_are_granted_alone_and_charged_once(
    redis_server: RedisServer,
) -> None:
    gw = {"tenants": tenants(("a", 2)), "scheduler": {"hold_ms": 0}}  # no holds: leases only
    async with replicas(redis_server, gw, seqs=8) as r:
        stores = [s.dispatcher.core.store for s in r.states]
        for store in stores:
            assert store is not None
            store.view_s = 60.0
        await wait_for(lambda: all(s is not None and s._view is not None for s in stores))
        body = {"model": MODEL, "prompt": "hello " * 10, "max_tokens": 8, "ignore_eos": True}
        async with httpx.AsyncClient(timeout=60, limits=UNLIMITED) as http:
            for i in range(10):  # one at a time: the cluster is idle at each arrival
                resp = await http.post(
                    f"{r.url(i)}/v1/completions",
                    json=body,
                    headers={"Authorization": "Bearer key-a"},
                )
                assert resp.status_code == 200
        # each replica's first request is claimed; the grant leases a slot for the next one
        assert [s.stats.alone for s in stores if s is not None] == [4, 4]
        await r.assert_clean()
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            # charged once: the shared counter is the service over the weight (a tenant alone
            # is never lifted), once the last flush reached Redis (with the next sync)
            service = sum(s.dispatcher.core.pool(MODEL).service("a") for s in r.states)

            async def shared() -> float:
                return float(await raw.hget(f"{{vtc}}:c:{MODEL}", "a") or 0)

            await until(shared, service / 2)
            # nothing booked but the slots each replica leased for its next requests
            leases = [s.leased().get("sim", (0, 0)) for s in stores if s is not None]
            assert [n for n, _ in leases] == [s.lease_slots for s in stores if s is not None]
            booked = await raw.hgetall("{vtc}:be:sim")
            seqs, kv = sum(n for n, _ in leases), sum(kv for _, kv in leases)
            assert booked == {b"s": str(seqs).encode(), b"k": str(kv).encode()}
        finally:
            await raw.aclose()
