"""What a replica sends to Redis, and when: the round trips the common paths must not cost.

* On an idle cluster a closed-loop client (each request sent when the last one ended, its next
  one expected: a *hold*) costs no round trip of its own after its first request: each request
  is granted on a leased slot, the slot it frees is kept leased, its expected next request needs
  no hold claim (a leased slot will take it), and what the shared order must hear (the forced
  claim, a new lease) waits for the next sync tick instead of going out at once.
* On a full backend, requests that join a queue whose head's claim was just refused send no
  claim of their own: the same claim would be refused again, and what could change the answer
  (a release, a change in the order) wakes the replica.

Operations are observed where the store queues them (``ClusterStore._push``): each one carries
whether it may wait for the tick (``lazy``). The view's age limit is raised (``view_s``) so that
a late tick on a loaded machine does not send a request the claim's way.
"""

from __future__ import annotations

import asyncio

import httpx

from gateway.cluster.store import ClusterStore

from ..gateway.conftest import MODEL, tenants, wait_for
from .conftest import RedisServer
from .test_replicas_tree import UNLIMITED, replicas

BODY = {"model": MODEL, "prompt": "hello " * 10, "max_tokens": 8, "ignore_eos": True}


def recorded(store: ClusterStore) -> list[tuple[str, bool]]:
    """From now on, (script, lazy) of every operation ``store`` queues."""
    out: list[tuple[str, bool]] = []
    push = store._push

    def record(op):  # type: ignore[no-untyped-def]
        out.append((op.script, op.lazy))
        push(op)

    store._push = record  # type: ignore[method-assign]
    return out


async def post(http: httpx.AsyncClient, url: str, tenant: str, **body: object) -> int:
    resp = await http.post(
        f"{url}/v1/completions",
        json={**BODY, **body},
        headers={"Authorization": f"Bearer key-{tenant}"},
    )
    return resp.status_code


async def test_a_closed_loop_client_on_an_idle_cluster_sends_nothing_at_once(
    redis_server: RedisServer,
) -> None:
    gw = {"tenants": tenants(("a", 2)), "scheduler": {"hold_ms": 1000}}  # holds on
    async with replicas(redis_server, gw, seqs=8) as r:
        store = r.states[0].dispatcher.core.store
        assert store is not None
        store.view_s = 60.0
        await wait_for(lambda: store._view is not None)
        async with httpx.AsyncClient(timeout=60, limits=UNLIMITED) as http:
            assert await post(http, r.url(0), "a") == 200  # claimed; leases a slot
            pushed = recorded(store)
            for _ in range(8):  # back to back: the next one is expected when each ends
                assert await post(http, r.url(0), "a") == 200
        assert store.stats.alone == 8
        # no release, no hold claim, no claim: only lazy news (forced claims, leases)
        assert pushed and all(lazy for _, lazy in pushed), pushed
        await r.assert_clean()


async def test_arrivals_behind_a_refused_claim_send_no_claim(redis_server: RedisServer) -> None:
    gw = {"tenants": tenants(("a", 1), ("b", 1)), "scheduler": {"hold_ms": 0}}
    async with replicas(redis_server, gw, seqs=1) as r:
        core = r.states[0].dispatcher.core
        store = core.store
        assert store is not None
        core.full_retry_ticks = 10**6  # no retries on the tick (in case a wake-up was lost)
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            # a takes the only slot (from replica 1) for a while
            long = asyncio.create_task(post(http, r.url(1), "a", max_tokens=600))
            await wait_for(lambda: r.running("a") == 1, limit_s=30)
            first = asyncio.create_task(post(http, r.url(0), "b"))
            await wait_for(lambda: r.queued("b") == 1, limit_s=30)
            # b's claim went out and was refused: no room
            await wait_for(lambda: MODEL in core._full, limit_s=30)
            pushed = recorded(store)
            more = [asyncio.create_task(post(http, r.url(0), "b")) for _ in range(5)]
            await wait_for(lambda: r.queued("b") == 6, limit_s=30)
            claims = [script for script, _ in pushed if script == "claim"]
            assert r.running("a") == 1 and claims == []
            assert await asyncio.gather(long, first, *more) == [200] * 7
        await r.assert_clean()
