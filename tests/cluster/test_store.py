"""The shared state against a real redis-server: lift, claim order, capacity, leases, faults."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
from redis import asyncio as aioredis

from gateway.cluster.rule import Candidate, ClaimResult, Node, Place, flat
from gateway.cluster.store import ClusterStore, ClusterUnavailable

from ..gateway.conftest import wait_for
from .conftest import RedisServer

M = "m"
ONE_SLOT = [Candidate("b0", 1, 10_000)]


class FakeLocal:
    """The replica side: counters, who waits here, wake-ups received."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str], float] = {}
        self.waiting_set: set[tuple[str, str]] = set()
        self.queued: dict[str, int] = {}  # requests waiting per waiting tenant (default 1)
        self.wakes: list[str] = []
        self.ticks = 0

    def counter(self, model: str, tenant: str) -> float:
        return self.counters.get((model, tenant), 0.0)

    def set_counter(self, model: str, tenant: str, value: float) -> None:
        self.counters[(model, tenant)] = value

    def waiting(self, model: str, tenant: str) -> int:
        if (model, tenant) not in self.waiting_set:
            return 0
        return self.queued.get(tenant, 1)

    def busy(self, model: str, tenant: str) -> bool:
        return False

    def place(self, model: str, tenant: str, credit: bool = True) -> Place:
        return flat(tenant)

    def groups(self, model: str, tenant: str) -> tuple[str, ...]:
        return ()

    def runs(self) -> dict[str, int]:
        return {}

    def kv(self) -> dict[str, int]:
        return {}

    def watched(self) -> tuple[list[str], list[str]]:
        return [], []

    def wake(self, message: str) -> None:
        self.wakes.append(message)

    def tick(self) -> None:
        self.ticks += 1

    def charge(self, tenant: str, units: float) -> None:
        self.counters[(M, tenant)] = self.counter(M, tenant) + units


@contextlib.asynccontextmanager
async def replica(
    server: RedisServer,
    name: str,
    lease_s: float = 5.0,
    sync_s: float = 0.01,
    socket_timeout_s: float = 0.5,
) -> AsyncIterator[tuple[ClusterStore, FakeLocal]]:
    local = FakeLocal()
    timeout = socket_timeout_s
    store = ClusterStore(
        aioredis.Redis.from_url(server.url, socket_timeout=timeout, socket_connect_timeout=timeout),
        aioredis.Redis.from_url(server.url, socket_connect_timeout=timeout),
        local,
        replica=name,
        sync_interval_s=sync_s,
        lease_s=lease_s,
    )
    await store.start()
    try:
        yield store, local
    finally:
        await store.close()


async def arrive(store: ClusterStore, local: FakeLocal, tenant: str) -> None:
    """The tenant starts waiting here; returns once Redis has it in the backlog."""
    local.waiting_set.add((M, tenant))
    store.touch(M, tenant)
    rounds = store.stats.round_trips
    await wait_for(lambda: store.stats.round_trips > rounds and not store._dirty)
    await _settled(store)


async def _settled(store: ClusterStore) -> None:
    """Wait until what the store has sent has come back: two round trips after it was sent,
    whichever batch was in flight then (sent is not yet applied here)."""
    rounds = store.stats.round_trips
    await wait_for(lambda: store.stats.round_trips > rounds + 1)


async def served(store: ClusterStore, local: FakeLocal, tenant: str, units: float) -> None:
    """``units`` more charged locally; returns once a sync flushed them."""
    local.charge(tenant, units)
    target = local.counter(M, tenant)
    await wait_for(lambda: store._sent.get((M, tenant)) == target)
    await _settled(store)


async def claim(
    store: ClusterStore,
    tenant: str,
    cands: list[Candidate] = ONE_SLOT,
    extra: float = 0.0,
    n: int = 1,
) -> ClaimResult:
    """Claim for ``n`` requests like the dispatcher: each granted one's local pop charges
    ``extra`` at once."""
    local = store.local
    assert isinstance(local, FakeLocal)
    seen: list[ClaimResult] = []

    def on_result(res: ClaimResult) -> None:
        seen.append(res)
        local.charge(tenant, extra * len(res.backends))

    # the claimed requests and, while it is marked waiting, one more: it stays in the backlog
    waiting = n + local.waiting(M, tenant)
    res = await store.claim(M, tenant, [(extra, 100)] * n, waiting, cands, on_result)
    assert seen == [res]
    return res


async def test_claim_goes_to_the_globally_smallest_counter(redis_server: RedisServer) -> None:
    async with replica(redis_server, "r1") as (s1, l1), replica(redis_server, "r2") as (s2, l2):
        await arrive(s1, l1, "a")
        await arrive(s2, l2, "b")
        await served(s1, l1, "a", 50.0)  # a has been served more
        refused = await claim(s1, "a")
        assert (refused.status, refused.lower) == ("order", 1)
        granted = await claim(s2, "b", extra=10.0)
        assert (granted.status, granted.backend) == ("ok", "b0")
        assert granted.counter == 10.0 and l2.counter(M, "b") == 10.0
        assert (await claim(s2, "b")).status == "full"  # one slot, held by b
        s2.release("b0", 100)
        await wait_for(lambda: "b:b0" in l2.wakes)  # b comes first: r2 hears that a slot freed
        await served(s2, l2, "b", 100.0)  # b's output, charged locally, flushed by a sync
        assert (await claim(s1, "a")).status == "ok"  # 50 < 110 now


async def test_a_release_wakes_the_replicas_of_the_tenants_first_for_the_room(
    redis_server: RedisServer,
) -> None:
    """A freed slot wakes the replicas where the tenants first in the order wait, as many
    tenants as their demand takes to fill the backend's room, not every replica."""
    two = [Candidate("b0", 2, 10_000)]
    async with replica(redis_server, "r1") as (s1, l1), replica(redis_server, "r2") as (s2, l2):
        await arrive(s1, l1, "a")
        await arrive(s2, l2, "b")
        await served(s1, l1, "a", 50.0)
        assert (await claim(s2, "b", two, extra=1.0, n=2)).backends == ("b0", "b0")
        assert (await claim(s1, "a", two)).status == "full"  # a waits behind b, b once more
        s2.release("b0", 100)  # room 1: b's next request takes it
        await wait_for(lambda: "b:b0" in l2.wakes)
        s2.release("b0", 100)  # room 2: b's request, then a
        await wait_for(lambda: l2.wakes.count("b:b0") == 2 and "b:b0" in l1.wakes)
        l2.waiting_set.discard((M, "b"))
        s2.touch(M, "b")  # b leaves the backlog: a wake-up for every replica, sent after both
        await wait_for(lambda: "m:m" in l1.wakes)
        assert l1.wakes.count("b:b0") == 1  # r1 heard only the release whose room reached a


async def test_one_claim_grants_several_while_the_tenant_keeps_its_place(
    redis_server: RedisServer,
) -> None:
    """One round trip claims slots for a tenant's next requests; each is granted only while
    the tenant, charged for the ones before, has the smallest counter of the backlog."""
    four = [Candidate("b0", 4, 1000)]
    async with replica(redis_server, "r1") as (s1, l1), replica(redis_server, "r2") as (s2, l2):
        await arrive(s1, l1, "a")
        await arrive(s2, l2, "b")
        await served(s2, l2, "b", 50.0)
        l1.charge("a", 5.0)  # not flushed yet: the claim carries it
        res = await claim(s1, "a", four, extra=20.0, n=4)
        # a at 5 -> 25 -> 45 -> 65: the fourth would pass b (50), so it is refused
        assert (res.status, res.backends) == ("order", ("b0", "b0", "b0"))
        assert res.counter == 65.0 and l1.counter(M, "a") == 65.0
        assert s1.held["b0"] == [3, 300]
        assert (await claim(s2, "b", four)).status == "ok"  # b is the smallest now
        assert (await claim(s2, "b", four)).status == "full"  # 4 of 4 booked
        for _ in range(3):
            s1.release("b0", 100)
        await _settled(s1)
        # 65 > 50, but 3 slots are free: the first fits beside b's next (spare room), the
        # second would not be a's turn
        res = await claim(s1, "a", four, extra=20.0, n=2)
        assert (res.status, res.backends) == ("order", ("b0",))


async def test_spare_capacity_is_not_held_back(redis_server: RedisServer) -> None:
    """With room for the lower tenant's request as well, a higher counter is not refused."""
    async with replica(redis_server, "r1") as (s1, l1), replica(redis_server, "r2") as (s2, l2):
        await arrive(s1, l1, "a")
        await arrive(s2, l2, "b")
        await served(s1, l1, "a", 50.0)
        two = [Candidate("b0", 2, 10_000)]
        assert (await claim(s1, "a", two)).status == "ok"
        assert (await claim(s1, "a", two)).status == "order"  # the last slot is b's


async def test_a_tenant_further_back_leaves_room_for_all_that_wait_ahead(
    redis_server: RedisServer,
) -> None:
    """Slots freed at once go first to the tenants ahead in the order, for every request
    they have waiting (as their replicas last said), whichever replica asks first; the room
    beyond that is taken (work-conserving)."""
    eight = [Candidate("b0", 8, 100_000)]
    async with replica(redis_server, "r1") as (s1, l1), replica(redis_server, "r2") as (s2, l2):
        await arrive(s1, l1, "a")
        l2.queued["b"] = 3
        await arrive(s2, l2, "b")  # b waits with 3 requests
        await served(s1, l1, "a", 50.0)  # a is behind b in the order
        got = [(await claim(s1, "a", eight)).status for _ in range(6)]
        assert got == ["ok"] * 5 + ["order"]  # 8 slots: 5 for a, 3 kept for b
        res = await claim(s2, "b", eight, n=3)
        assert (res.status, len(res.backends)) == ("ok", 3)
        assert (await claim(s1, "a", eight)).status == "full"


async def test_lift_both_cases(redis_server: RedisServer) -> None:
    async with replica(redis_server, "r1") as (s1, l1), replica(redis_server, "r2") as (s2, l2):
        await arrive(s1, l1, "a")
        await served(s1, l1, "a", 500.0)
        # others backlogged: lifted to the smallest of them
        await arrive(s2, l2, "new")
        assert l2.counter(M, "new") == 500.0
        # nobody backlogged: lifted to the counter of the tenant that left last
        l1.waiting_set.clear()
        l2.waiting_set.clear()
        l1.charge("a", 300.0)
        s1.touch(M, "a")
        s2.touch(M, "new")
        await wait_for(lambda: l1.ticks > 2 and l2.ticks > 2 and not s1._dirty and not s2._dirty)
        await arrive(s2, l2, "late")
        assert l2.counter(M, "late") in (500.0, 800.0)  # whichever of a, new left last


async def test_dead_replica_slots_return_within_the_lease(redis_server: RedisServer) -> None:
    async with replica(redis_server, "r1", lease_s=0.3) as (s1, l1):
        async with replica(redis_server, "r2", lease_s=0.3) as (s2, l2):
            await arrive(s2, l2, "b")
            assert (await claim(s2, "b")).status == "ok"
            # r2 dies without a word: its writer stops renewing the lease
            for task in s2._tasks:
                task.cancel()
            await arrive(s1, l1, "a")
            assert (await claim(s1, "a")).status == "full"
            start = time.monotonic()
            while (await claim(s1, "a")).status != "ok":
                assert time.monotonic() - start < 5
            assert time.monotonic() - start < 2.0  # reaped after ~0.3 s
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            be = await raw.hgetall("{vtc}:be:b0")
            assert be == {b"s": b"1", b"k": b"100"}  # r1's slot only: nothing leaked, none < 0
            # b's place in the queue went too
            assert await raw.zscore("{vtc}:bl:m\x1f~t0", "b") is None
        finally:
            await raw.aclose()


class TeamLocal(FakeLocal):
    """Every tenant in one group ``g``: a claim's path and its flushes cover two levels."""

    def place(self, model: str, tenant: str, credit: bool = True) -> Place:
        return Place((Node("g"), Node(tenant)))

    def groups(self, model: str, tenant: str) -> tuple[str, ...]:
        return ("g",)


async def test_a_grant_given_back_unused_leaves_no_charge(redis_server: RedisServer) -> None:
    """A claim's script charges its grants; the reply lowers the local counters by as much,
    for the local pop to add it back. A grant given back instead (its job is no longer the
    head here: another tenant came first meanwhile) was never served: the next round trips
    must take the charge out of the shared counters at every level of the path, the group's
    too, and the local counters must agree with them (a replica whose counters stayed a grant
    below the shared ones would ask for the wrong tenant forever)."""
    async with replica(redis_server, "r1") as (s1, l1):
        team = TeamLocal()
        team.waiting_set = l1.waiting_set
        s1.local = team
        await arrive(s1, team, "a")
        res = await s1.claim(M, "a", [(30.0, 100)], 2, ONE_SLOT)
        assert res.backends == ("b0",)
        s1.release("b0", 100)  # given back: no local pop charges it
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:

            async def shared() -> dict[str, str]:
                return await raw.hgetall("{vtc}:c:m")

            deadline = time.monotonic() + 5
            while (c := await shared()) != {"g": "0", "a": "0"}:
                assert time.monotonic() < deadline, c
                await _settled(s1)
            assert (team.counter(M, "g"), team.counter(M, "a")) == (0.0, 0.0)
        finally:
            await raw.aclose()


async def test_release_never_drives_capacity_negative(redis_server: RedisServer) -> None:
    async with replica(redis_server, "r1") as (s1, l1):
        await arrive(s1, l1, "a")
        assert (await claim(s1, "a")).status == "ok"
        s1.release("b0", 100)
        s1.release("b0", 100)  # a double release must not free someone else's slot
        await wait_for(lambda: not s1._ops)
        await wait_for(lambda: l1.ticks > 1)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await raw.hgetall("{vtc}:be:b0") == {b"s": b"0", b"k": b"0"}
        finally:
            await raw.aclose()


async def test_redis_down_then_restarted_empty(redis_server: RedisServer) -> None:
    async with replica(redis_server, "r1") as (s1, l1):
        await arrive(s1, l1, "a")
        assert (await claim(s1, "a", extra=40.0)).status == "ok"
        l1.charge("a", 60.0)
        await wait_for(lambda: s1._sent.get((M, "a")) == 100.0)
        redis_server.stop()
        with pytest.raises(ClusterUnavailable):
            await claim(s1, "a")
        await wait_for(lambda: not s1.up)
        assert s1.stats.fallbacks == 1
        l1.charge("a", 25.0)  # served locally during the outage
        redis_server.start()  # empty: no counters, no ledger
        await wait_for(lambda: s1.up, limit_s=15)
        await wait_for(lambda: s1._sent.get((M, "a")) == 125.0)
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert float(await raw.hget("{vtc}:c:m", "a")) == 125.0  # position kept, not reset
            assert await raw.hgetall("{vtc}:be:b0") == {b"s": b"1", b"k": b"100"}  # slot re-held
            assert await raw.zscore("{vtc}:bl:m\x1f~t0", "a") == 125.0  # still waiting here
        finally:
            await raw.aclose()
        assert s1.stats.fallbacks == 1


async def test_one_slow_round_trip_is_not_an_outage(redis_server: RedisServer) -> None:
    """Redis stalls (CLIENT PAUSE) longer than one socket timeout but shorter than two: the
    round trip in flight fails, the registration sent at once gets through, no fallback. A
    stall past two timeouts is an outage."""
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        async with replica(redis_server, "r1", socket_timeout_s=1.0) as (s1, l1):
            await arrive(s1, l1, "a")
            await raw.execute_command("CLIENT", "PAUSE", 1400, "ALL")  # ms
            with pytest.raises(ClusterUnavailable):
                await claim(s1, "a")  # its outcome is unknown: the dispatcher asks again
            assert s1.up and s1.stats.fallbacks == 0
            await wait_for(lambda: not s1._register_due)
            assert (await claim(s1, "a")).status == "ok"
            assert await raw.hgetall("{vtc}:be:b0") == {b"s": b"1", b"k": b"100"}
            assert s1.up and s1.stats.fallbacks == 0
            await raw.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            await wait_for(lambda: not s1.up)
            assert s1.stats.fallbacks == 1
            await wait_for(lambda: s1.up, limit_s=15)
            assert await raw.hgetall("{vtc}:be:b0") == {b"s": b"1", b"k": b"100"}
    finally:
        await raw.aclose()


class DeafPubSub:
    """A pub/sub connection whose reads lose the task's cancellation, as redis-py's blocking
    read can (a cancel soon after subscribing left the task in a new read, forever)."""

    def __init__(self) -> None:
        self.reads = 0

    async def __aenter__(self) -> DeafPubSub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def subscribe(self, *channels: str) -> None:
        return None

    async def _read(self, timeout_s: float) -> None:
        self.reads += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            await asyncio.sleep(timeout_s)
        except asyncio.CancelledError:  # lost: the read goes on until its end
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    async def get_message(self, timeout: float | None = 0.0, **_: object) -> None:  # noqa: ASYNC109
        await self._read(3600.0 if timeout is None else timeout)

    async def listen(self) -> AsyncIterator[dict[str, object]]:
        while True:
            await self._read(3600.0)
            yield {"type": "ping"}


class DeafListener:
    def __init__(self) -> None:
        self.ps = DeafPubSub()

    def pubsub(self) -> DeafPubSub:
        return self.ps

    async def aclose(self) -> None:
        return None


async def test_close_returns_though_a_pubsub_read_loses_its_cancellation(
    redis_server: RedisServer,
) -> None:
    """A replica stops (SIGTERM, or its supervisor gone) even when the wake-up listener's
    read ignores the cancellation: close() used to wait for that read forever."""
    listener = DeafListener()
    store = ClusterStore(
        aioredis.Redis.from_url(redis_server.url, socket_timeout=1, socket_connect_timeout=1),
        listener,  # type: ignore[arg-type]
        FakeLocal(),
        replica="r1",
    )
    await store.start()
    await wait_for(lambda: listener.ps.reads > 0)
    closing = asyncio.ensure_future(store.close())
    done, _ = await asyncio.wait({closing}, timeout=10)
    assert done, "close() still waits for the wake-up listener"
    await closing
