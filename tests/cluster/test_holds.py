"""Slots held for resubmitting tenants, booked in the shared ledger (real redis-server).

The dispatch cores here are :class:`ClusterCore` on a manual clock (the scheduler's time), with
their Redis links live; waits are on observable state, bounded, never sleeps.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from redis import asyncio as aioredis

from gateway.admission import BackendSlots
from gateway.cluster import ClusterAdmission, make_store
from gateway.cluster.dispatch import ClusterCore
from gateway.core import CoreOptions, Grant
from gateway.scheduler import Job, VTCScheduler

from ..gateway.conftest import wait_for
from ..scheduler.test_busy_lift import job, resubmitting
from .conftest import RedisServer

PREFIX = "{vtc}"


class Replica:
    def __init__(self, core: ClusterCore) -> None:
        self.core = core
        self.granted: list[Job] = []
        self.grants: dict[int, Grant] = {}
        self.clock = [0.0]

    def release(self, j: Job) -> None:
        self.core.release(j, self.grants.pop(id(j)))


@contextlib.asynccontextmanager
async def replica(server: RedisServer, name: str, hold_s: float = 0.05) -> AsyncIterator[Replica]:
    slots = BackendSlots("x", frozenset({"m"}), max_num_seqs=1, max_kv_tokens=10_000)
    r: Replica | None = None

    def on_grant(j: Job, g: Grant) -> None:
        assert r is not None
        r.granted.append(j)
        r.grants[id(j)] = g

    core = ClusterCore(
        ClusterAdmission([slots]),
        on_grant,
        CoreOptions(hold_s=hold_s),
        clock=lambda: r.clock[0] if r is not None else 0.0,
        on_hold=lambda _until: None,
    )
    r = Replica(core)
    for t in ("a", "b", "c"):
        core.set_tenant(t, 1.0)
    store = make_store(
        server.url, core, replica=name, prefix=PREFIX, sync_interval_s=0.01, lease_s=5.0
    )
    core.attach(store)
    await store.start()
    try:
        yield r
    finally:
        await store.close()


async def ledger(redis: aioredis.Redis) -> int:
    return int(await redis.hget(f"{PREFIX}:be:x", "s") or 0)


async def next_round_trip(r: Replica) -> None:
    stats = r.core.store.stats  # type: ignore[union-attr]
    rounds = stats.round_trips
    await wait_for(lambda: stats.round_trips > rounds)


async def flushed(r: Replica, tenant: str, redis: aioredis.Redis) -> None:
    """Wait until Redis has ``tenant``'s local counter."""
    want = r.core.counter("m", tenant)
    while True:
        raw = await redis.hget(f"{PREFIX}:c:m", tenant)
        if raw is not None and float(raw) == want:
            return
        await next_round_trip(r)


async def booked(r: Replica, n: int, redis: aioredis.Redis) -> None:
    """Wait until the shared ledger books ``n`` slots (a request granted alone reaches it with
    the replica's next round trip)."""
    while await ledger(redis) != n:
        await next_round_trip(r)


async def test_a_held_slot_is_booked_in_the_shared_ledger(redis_server: RedisServer) -> None:
    redis = aioredis.Redis.from_url(redis_server.url)
    async with replica(redis_server, "r1") as r:
        core = r.core
        b_job = job("b", 0.0)
        core.submit(b_job)
        core.pump("m")
        await wait_for(lambda: r.granted == [b_job])
        for _ in range(3):
            core.submit(job("a", 0.0))
        core.pump("m")  # the only slot is b's
        pool = core.pool("m")
        assert isinstance(pool, VTCScheduler)
        resubmitting(pool, "b", 0.0)
        pool.set_counter("a", 1000.0)  # a far ahead of b
        await flushed(r, "a", redis)
        r.clock[0] = 1.0
        r.release(b_job)  # b's next request is expected: the slot waits for it
        await wait_for(lambda: core.held() == 1)
        assert r.granted == [b_job] and core.holds_total == 1
        assert await ledger(redis) == 1  # held in the shared ledger too
        r.clock[0] = 1.01
        b_next = job("b", 1.01)
        core.submit(b_next)  # it came: the slot goes back to the order, which gives it to b
        core.pump("m")
        await wait_for(lambda: r.granted[-1] is b_next)
        assert core.held() == 0 and core.holds_used == 1
        r.clock[0] = 2.0
        r.release(b_next)
        await wait_for(lambda: core.held() == 1)  # expected again
        core.expire_holds(2.05)  # it did not come: the slot goes to a
        await wait_for(lambda: r.granted[-1].tenant == "a")
        assert core.held() == 0 and core.holds_total == 2 and core.holds_used == 1
        r.release(r.granted[-1])
        await wait_for(lambda: r.granted[-1] is not b_next and len(r.granted) == 4)
        assert await ledger(redis) == 1  # the next a runs: exactly one slot booked
    assert await ledger(redis) == 0  # the replica left: nothing stays booked
    await redis.aclose()


async def test_no_hold_past_a_tenant_waiting_at_another_replica(
    redis_server: RedisServer,
) -> None:
    """b precedes the head here (a), but c, waiting at another replica, precedes b: the
    shared order refuses b's hold and the slot goes to c."""
    redis = aioredis.Redis.from_url(redis_server.url)
    async with replica(redis_server, "r1") as r1, replica(redis_server, "r2") as r2:
        core = r1.core
        b_job = job("b", 0.0)
        core.submit(b_job)
        core.pump("m")
        await wait_for(lambda: r1.granted == [b_job])
        await booked(r1, 1, redis)  # b's slot (granted alone: with the next round trip)
        c_job = job("c", 0.0)
        r2.core.submit(c_job)  # c waits at r2 (lifted to b's 10 as it joins the backlog)
        r2.core.pump("m")
        await wait_for(lambda: r2.core.store._marked == {("m", "c")})  # type: ignore[union-attr]
        core.submit(job("a", 0.0))
        core.pump("m")
        pool = core.pool("m")
        assert isinstance(pool, VTCScheduler)
        resubmitting(pool, "b", 0.0)
        pool.set_counter("a", 1000.0)
        pool.set_counter("b", 500.0)
        await flushed(r1, "a", redis)
        await flushed(r1, "b", redis)
        assert float(await redis.hget(f"{PREFIX}:c:m", "c")) < 500.0
        r1.clock[0] = 1.0
        r1.release(b_job)
        assert pool.entitled("b", 1.0)  # locally b would go before a
        await wait_for(lambda: r2.granted == [c_job])
        assert core.held() == 0 and core.holds_total == 0 and r1.granted == [b_job]
        assert await ledger(redis) == 1  # c's slot only
    await redis.aclose()
