"""Two gateway replicas sharing one Redis, with nested tenants (organisations and teams) and
priority tiers: the single-gateway guarantees of ``tests/gateway/test_e2e_hierarchy.py`` and
``tests/gateway/test_e2e_tiers.py`` must hold when a team's or a tier's requests arrive at
another replica than those they compete with.

Each replica (in this process, with its own dispatcher and Redis link) sees only what it
dispatched: service is summed over the replicas' ledgers, and what waits is read from every
replica's queues at each dispatch, whichever replica made it. Assertions are about shares of
service between completion counts and about who is dispatched while whom waits, never about
durations.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from backends.sim.config import SimConfig
from backends.sim.server import SimServer
from gateway.config import parse_config
from gateway.scheduler import Job
from gateway.server import STATE, GatewayState, create_app

from ..gateway.conftest import MODEL, tenants, wait_for
from ..gateway.test_e2e_hierarchy import ORGS, SPEED, Clients, service_shares, within
from .conftest import RedisServer

UNLIMITED = httpx.Limits(max_connections=None, max_keepalive_connections=None)


@dataclass
class Replicas:
    """``n`` gateways in front of one simulated backend. Routes name replicas by index modulo
    ``n``, so a test written for two runs unchanged against one (every route to replica 0)."""

    urls: list[str]
    states: list[GatewayState]
    shared: bool  # whether they share one fair order through Redis
    order: list[tuple[int, str]] = field(default_factory=list)  # (replica, tenant) dispatched
    #: called with (replica, job) at each dispatch, after ``order`` is appended to
    observe: Callable[[int, Job], None] | None = None

    def url(self, replica: int) -> str:
        return self.urls[replica % len(self.urls)]

    def queued(self, *tenants: str) -> int:
        """Requests of ``tenants`` waiting, all replicas together."""
        return sum(s.dispatcher.core.queued(t) for s in self.states for t in tenants)

    def running(self, tenant: str) -> int:
        return sum(s.dispatcher.core.running.get(tenant, 0) for s in self.states)

    def service(self, tenant: str) -> float:
        """The tenant's service in every replica's ledger (each counts what it dispatched)."""
        return sum(s.dispatcher.core.pool(MODEL).service(tenant) for s in self.states)

    def settled(self) -> bool:
        """Nothing running, held (or expected: a hold claim may still be in flight) or queued
        at any replica."""
        return all(
            s.admission.in_flight() == 0
            and s.dispatcher.core.held() == 0
            and s.dispatcher.core.next_hold_expiry() is None
            and s.dispatcher.core.total_queued() == 0
            for s in self.states
        )

    async def assert_clean(self) -> None:
        """Once settled: no group still counts a request as running and, when shared, every
        replica stayed in the shared order and holds no slot in its ledger."""
        await wait_for(self.settled)
        for s in self.states:
            assert not any(s.dispatcher.core.group_running.values()), s.dispatcher.core
        if not self.shared:
            return
        async with httpx.AsyncClient() as http:
            for i, url in enumerate(self.urls):
                text = (await http.get(f"{url}/metrics")).text
                assert f'vtc_cluster_shared{{replica="r{i}"}} 1.0' in text
                assert f'vtc_cluster_fallbacks_total{{replica="r{i}"}} 0.0' in text
                labels = f'{{backend="sim",replica="r{i}"}} '
                held = [
                    x for x in text.splitlines() if x.startswith("vtc_cluster_slots_held" + labels)
                ]
                leased = [
                    x
                    for x in text.splitlines()
                    if x.startswith("vtc_cluster_slots_leased" + labels)
                ]
                # none but the slots leased for requests to come (an idle replica keeps one)
                assert [x.split()[-1] for x in held] == [x.split()[-1] for x in leased]


@contextlib.asynccontextmanager
async def replicas(
    redis: RedisServer | None,
    gateway: dict[str, Any],
    *,
    seqs: int,
    sim: dict[str, Any] | None = None,
    n: int = 2,
    backend: dict[str, Any] | None = None,
) -> AsyncIterator[Replicas]:
    """``n`` gateways configured with ``gateway`` (tenants, scheduler section...) in front of
    one simulated backend of ``seqs`` batch slots (``sim``: more SimConfig fields), sharing one
    fair order through ``redis`` (None: each alone, no ``cluster`` section); ``backend``: more
    fields of the backend's config entry."""
    async with contextlib.AsyncExitStack() as stack:
        sim_kw = {"speed": 4.0, **(sim or {})}
        sim_url = (await stack.enter_async_context(SimServer(SimConfig(port=0, **sim_kw)))).url
        r = Replicas([], [], shared=redis is not None)
        for i in range(n):
            raw: dict[str, Any] = {
                "backends": [
                    {"name": "sim", "url": sim_url, "max_num_seqs": seqs, **(backend or {})}
                ],
                "limits": {"health_interval_s": 60},
                **gateway,
            }
            if redis is not None:
                raw["cluster"] = {"url": redis.url, "replica_id": f"r{i}"}
            app = create_app(parse_config(raw))
            server = TestServer(app, handler_cancellation=True)
            await server.start_server()
            stack.push_async_callback(server.close)

            def record(job: Job, replica: int = i) -> None:
                r.order.append((replica, job.tenant))
                if r.observe is not None:
                    r.observe(replica, job)

            app[STATE].dispatcher.on_dispatch = record
            r.urls.append(str(server.make_url("")).rstrip("/"))
            r.states.append(app[STATE])
        yield r


# -- organisations and teams ---------------------------------------------------------------------

SLOTS = 8
CLIENTS = 8  # per team: more than any team's share of the 8 slots


def start_orgs(clients: Clients, r: Replicas) -> None:
    """The organisations' clients: a1's through replica 0 only, a2's through replica 1 only,
    b's through both (alternate clients)."""
    clients.start("a1", CLIENTS, [r.url(0)])
    clients.start("a2", CLIENTS, [r.url(1)])
    clients.start("b", CLIENTS, [r.url(0), r.url(1)])


async def test_orgs_and_teams_share_3_8_3_8_2_8_with_org_a_split_across_replicas(
    redis_server: RedisServer,
) -> None:
    """Org A (weight 3) has teams a1 and a2 (1:1), org B (weight 1) has team b. a1's clients
    send only through replica 0, a2's only through replica 1, b's through both (alternate
    clients), so neither replica alone sees org A's whole demand: the org's share must still
    be 3/4 and split 1:1 (3/8, 3/8, 2/8). When a2 stops, its part stays in org A: a1 3/4, b
    1/4, although a1 and a2 never met at one replica (flat weights 3/2, 3/2, 1 would give the
    first split too, but 3/5, 2/5 after the stop)."""
    gw = {"tenants": ORGS, "scheduler": {"hold_ms": 1000}}
    async with replicas(redis_server, gw, seqs=SLOTS, sim={"speed": SPEED}) as r:
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            clients = Clients(http)
            try:
                async with asyncio.timeout(100):  # within pytest's timeout, with a trace
                    start_orgs(clients, r)
                    teams = ["a1", "a2", "b"]
                    all3 = await service_shares(r.service, clients, teams, 3 * SLOTS, 16 * SLOTS)
                    await clients.stop("a2")  # team a2 goes idle
                    two = await service_shares(
                        r.service, clients, teams[::2], 3 * SLOTS, 16 * SLOTS
                    )
            finally:
                for team in list(clients.tasks):
                    await clients.stop(team)
        await r.assert_clean()
    assert within(all3, {"a1": 3 / 8, "a2": 3 / 8, "b": 2 / 8}), all3
    assert within(two, {"a1": 3 / 4, "b": 1 / 4}), two


async def test_the_tree_shares_come_back_after_redis_restarts_empty(
    redis_server: RedisServer,
) -> None:
    """The organisations of the test above under load while Redis stops (each replica serves
    its own queues in its local order) and comes back empty (the replicas re-register and
    rebuild the counters from what they last knew): once both share the order again, the
    shares are 3/8, 3/8, 2/8 again, within 10 %, and every slot is accounted for."""
    gw = {"tenants": ORGS, "scheduler": {"hold_ms": 1000}}

    def shared(up: bool) -> Callable[[], bool]:
        return lambda: all(s.dispatcher.core.store.up is up for s in r.states)  # type: ignore[union-attr]

    async with replicas(redis_server, gw, seqs=SLOTS, sim={"speed": SPEED}) as r:
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            clients = Clients(http)
            try:
                async with asyncio.timeout(100):  # within pytest's timeout, with a trace
                    start_orgs(clients, r)
                    await clients.until(3 * SLOTS)
                    redis_server.stop()
                    await wait_for(shared(False), limit_s=30)
                    await clients.until(2 * SLOTS)  # served in the local orders meanwhile
                    redis_server.start()  # empty
                    await wait_for(shared(True), limit_s=30)
                    teams = ["a1", "a2", "b"]
                    after = await service_shares(r.service, clients, teams, 3 * SLOTS, 16 * SLOTS)
            finally:
                for team in list(clients.tasks):
                    await clients.stop(team)
        await wait_for(r.settled)
        # the shared ledger books nothing but the slots the replicas keep leased for what comes
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            deadline = time.monotonic() + 30
            while True:
                booked = int((await raw.hgetall("{vtc}:be:sim")).get(b"s", b"0"))
                leased = sum(
                    n for s in r.states for n, _ in s.dispatcher.core.store.leased().values()
                )  # type: ignore[union-attr]
                if booked == leased:
                    break
                assert time.monotonic() < deadline, (booked, leased)
                await asyncio.sleep(0.05)
        finally:
            await raw.aclose()
    assert within(after, {"a1": 3 / 8, "a2": 3 / 8, "b": 2 / 8}), after


# -- priority tiers --------------------------------------------------------------------------------

SEQS = 4
#: the batch tenant's weight: large enough that its counter stays below the interactive
#: tenants' (its long requests charge it little), so an order that ignored tiers would serve
#: its queued requests among theirs; only its tier may keep it waiting
BATCH_WEIGHT = 1000


async def _send(http: httpx.AsyncClient, url: str, tenant: str, max_tokens: int) -> int:
    body = {"model": MODEL, "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True}
    headers = {"Authorization": f"Bearer key-{tenant}"}
    resp = await http.post(f"{url}/v1/completions", json=body, headers=headers)
    return resp.status_code


@pytest.mark.parametrize("policy", ["vtc", "fcfs"])
async def test_a_batch_tier_waits_for_interactive_work_on_the_other_replica(
    redis_server: RedisServer, policy: str
) -> None:
    """c (tier batch) sends only through replica 0, a and b (interactive) only through replica
    1. With the interactive tier idle c takes every slot and queues more; then a and b flood
    replica 1: no replica dispatches c while an interactive request waits at any replica, and
    the interactive requests overtake c's queued ones although replica 0 never sees them.
    Under ``fcfs`` too (strict priority bands; no counters are shared)."""
    ts = tenants(("a", 1), ("b", 1), ("c", BATCH_WEIGHT))
    ts[2]["tier"] = "batch"
    sim = {"speed": 4.0, "max_num_seqs": SEQS}
    gw = {"tenants": ts, "scheduler": {"policy": policy}}
    async with replicas(redis_server, gw, seqs=SEQS, sim=sim) as r:
        log: list[tuple[str, int, int]] = []  # (tenant, interactive queued, batch queued)

        def seen(replica: int, job: Job) -> None:
            log.append((job.tenant, r.queued("a", "b"), r.queued("c")))

        r.observe = seen
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            async with asyncio.timeout(60):
                # interactive idle: the batch tenant takes every slot, the rest of it queues
                batch = [asyncio.create_task(_send(http, r.url(0), "c", 1200)) for _ in range(SEQS)]
                await wait_for(lambda: r.running("c") == SEQS)
                batch += [asyncio.create_task(_send(http, r.url(0), "c", 16)) for _ in range(SEQS)]
                await wait_for(lambda: r.queued("c") == SEQS)
                # interactive tenants flood the other replica while batch work runs and waits
                inter = [
                    asyncio.create_task(_send(http, r.url(1), t, 16))
                    for _ in range(6)
                    for t in ("a", "b")
                ]
                statuses = await asyncio.gather(*inter, *batch)
        assert statuses == [200] * (12 + 2 * SEQS)
        await r.assert_clean()
        if policy == "fcfs":  # no counters shared: the order within a tier is each replica's
            raw = aioredis.Redis.from_url(redis_server.url)
            try:
                counters = await raw.hgetall(f"{{vtc}}:c:{MODEL}")
            finally:
                await raw.aclose()
            assert all(float(v) == 0 for v in counters.values()), counters
    assert [t for t, _, _ in log[:SEQS]] == ["c"] * SEQS, log
    later = log[SEQS:]
    # no batch dispatch, at either replica, while an interactive request waited
    assert all(waiting == 0 for t, waiting, _ in later if t == "c"), log
    # the interactive requests did overtake queued batch work (the check above has teeth)
    assert sum(1 for t, _, batch_waiting in later if t != "c" and batch_waiting) >= 6, log


async def test_a_minimum_share_gives_batch_its_part_across_replicas(
    redis_server: RedisServer,
) -> None:
    """a (interactive) only through replica 1, c (batch) only through replica 0, with
    ``batch_min_share: 0.5``: while both wait, c gets about half of the dispatches, though
    each replica only ever sees one of the two tiers. a's weight is 4 times c's: an order of
    weights alone (tiers ignored) would give c a fifth, strict priority none."""
    ts = tenants(("a", 4), ("c", 1))
    ts[1]["tier"] = "batch"
    gw = {"tenants": ts, "scheduler": {"batch_min_share": 0.5}}
    async with replicas(redis_server, gw, seqs=SEQS) as r:
        both: list[str] = []  # tenants dispatched while both tiers had requests waiting

        def seen(replica: int, job: Job) -> None:
            if r.queued("a") and r.queued("c"):
                both.append(job.tenant)

        r.observe = seen
        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            async with asyncio.timeout(60):
                sends = [
                    asyncio.create_task(_send(http, r.url(replica), t, 16))
                    for _ in range(16)
                    for t, replica in (("a", 1), ("c", 0))
                ]
                statuses = await asyncio.gather(*sends)
        assert statuses == [200] * 32
        await r.assert_clean()
    assert len(both) >= 10, (both, r.order)
    assert 0.3 <= both.count("c") / len(both) <= 0.7, (both, r.order)


# -- caps --------------------------------------------------------------------------------------


async def _hold(http: httpx.AsyncClient, url: str, tenant: str) -> int:
    """A request that runs until cancelled (the simulated backend at speed 1)."""
    return await _send(http, url, tenant, 3000)


async def test_a_cap_counts_the_requests_of_every_replica(redis_server: RedisServer) -> None:
    """org-a (max_in_flight 2) has team a1 on replica 0 and a2 on replica 1, each sending 3
    long requests; b sends 4 through both. Over both replicas org-a never runs more than 2,
    its other requests wait (its queued head leads the order, yet b gets every other slot),
    and when the clients go away nothing is left running, booked or counted."""
    tree = [
        {"name": "org-a", "max_in_flight": 2, "tenants": tenants(("a1", 1), ("a2", 1))},
        {"name": "org-b", "tenants": tenants(("b", 1))},
    ]
    sim = {"speed": 1.0, "max_num_seqs": SEQS}
    async with replicas(redis_server, {"tenants": tree}, seqs=SEQS, sim=sim) as r:
        most = 0

        def seen(replica: int, job: Job) -> None:
            nonlocal most
            most = max(most, r.running("a1") + r.running("a2"))

        r.observe = seen
        async with httpx.AsyncClient(timeout=60, limits=UNLIMITED) as http:
            async with asyncio.timeout(60):
                tasks = [
                    asyncio.create_task(_hold(http, r.url(i), team))
                    for _ in range(3)
                    for i, team in enumerate(("a1", "a2"))
                ]
                await wait_for(lambda: r.running("a1") + r.running("a2") == 2)
                await wait_for(lambda: r.queued("a1", "a2") == 4)
                tasks += [asyncio.create_task(_hold(http, r.url(i % 2), "b")) for i in range(4)]
                await wait_for(lambda: r.running("b") == SEQS - 2)
                assert r.running("a1") + r.running("a2") == 2 and r.queued("a1", "a2") == 4
                assert r.queued("b") == 2  # b's others wait for a slot, not for org-a
                for task in tasks:  # clients go away: queued and running requests end
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        await r.assert_clean()
        assert most == 2
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            assert await raw.hgetall("{vtc}:run") == {}  # no running request left counted
        finally:
            await raw.aclose()
