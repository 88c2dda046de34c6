"""Hierarchical tenants end to end: organisations and teams through HTTP and the simulated
backend.

Org A (weight 3) has teams a1 and a2 (1:1), org B (weight 1) has one team b. Every team runs
more closed-loop clients than its share of the backend's slots, so all stay backlogged. Service
is read from the gateway's ledger between two completion counts (after a warm-up), never over
a wall-clock window: a slow machine changes how long the test takes, not what it measures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from .conftest import MODEL, gateway_stack, wait_for

PROMPT = "tell me a story " * 12
MAX_TOKENS = 48
SPEED = 0.5
SLOTS = 8
CLIENTS = 8  # per team: more than any team's share of the 8 slots

ORGS: list[dict[str, Any]] = [
    {
        "name": "org-a",
        "weight": 3,
        "tenants": [
            {"name": "a1", "api_keys": ["key-a1"]},
            {"name": "a2", "api_keys": ["key-a2"]},
        ],
    },
    {"name": "org-b", "weight": 1, "tenants": [{"name": "b", "api_keys": ["key-b"]}]},
]


class Clients:
    """Closed-loop clients per team, each team stoppable on its own; counts completions."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http
        self.done = 0
        self.marks: dict[int, asyncio.Event] = {}
        self.stops: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, list[asyncio.Task[None]]] = {}

    def start(self, team: str, n: int, urls: Sequence[str] = ("",)) -> None:
        """``n`` clients of ``team``, client ``k`` sending to ``urls[k % len(urls)]`` (the
        default: the client's base URL)."""
        self.stops[team] = asyncio.Event()
        self.tasks[team] = [
            asyncio.create_task(self._client(team, urls[k % len(urls)])) for k in range(n)
        ]

    async def stop(self, team: str) -> None:
        self.stops[team].set()
        await asyncio.gather(*self.tasks.pop(team))

    async def until(self, count: int) -> None:
        """Wait until ``count`` more requests have completed."""
        mark = self.marks[self.done + count] = asyncio.Event()
        await mark.wait()

    async def _client(self, team: str, url: str) -> None:
        body = {
            "model": MODEL,
            "prompt": PROMPT,
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer key-{team}"}
        while not self.stops[team].is_set():
            async with self.http.stream(
                "POST", f"{url}/v1/completions", json=body, headers=headers
            ) as r:
                assert r.status_code == 200
                async for _ in r.aiter_bytes():
                    pass
            self.done += 1
            mark = self.marks.pop(self.done, None)
            if mark is not None:
                mark.set()


async def service_shares(
    service: Callable[[str], float], clients: Clients, teams: list[str], warm: int, n: int
) -> dict[str, float]:
    """Each team's share of the ledger's ``service`` over ``n`` completions after ``warm``."""
    await clients.until(warm)
    start = {t: service(t) for t in teams}
    await clients.until(n)
    got = {t: service(t) - start[t] for t in teams}
    total = sum(got.values())
    return {t: v / total for t, v in got.items()}


def within(shares: dict[str, float], want: dict[str, float], rel: float = 0.10) -> bool:
    return all(abs(shares[t] - w) <= rel * w for t, w in want.items())


async def test_orgs_and_teams_share_3_8_3_8_2_8_and_an_idle_teams_part_stays_in_its_org() -> None:
    gw = {"tenants": ORGS, "scheduler": {"hold_ms": 1000}}
    backend = {"max_num_seqs": SLOTS}
    async with gateway_stack(gateway=gw, backend=backend, sim={"speed": SPEED}) as stack:
        d = stack.state.dispatcher
        limits = httpx.Limits(max_connections=3 * CLIENTS + 4)
        async with httpx.AsyncClient(base_url=stack.url, timeout=120, limits=limits) as http:
            clients = Clients(http)
            try:
                async with asyncio.timeout(300):
                    for team in ("a1", "a2", "b"):
                        clients.start(team, CLIENTS)
                    service = stack.state.dispatcher.core.pool(MODEL).service
                    teams = ["a1", "a2", "b"]
                    all3 = await service_shares(service, clients, teams, 3 * SLOTS, 24 * SLOTS)
                    await clients.stop("a2")  # team a2 goes idle
                    two = await service_shares(service, clients, teams[::2], 3 * SLOTS, 24 * SLOTS)
            finally:
                for team in list(clients.tasks):
                    await clients.stop(team)
        await wait_for(lambda: stack.state.admission.in_flight() == 0 and d.core.held() == 0)
        assert d.core.total_queued() == 0 and not any(d.core.group_running.values())
    assert within(all3, {"a1": 3 / 8, "a2": 3 / 8, "b": 2 / 8}), all3
    assert within(two, {"a1": 3 / 4, "b": 1 / 4}), two


async def _send(http: httpx.AsyncClient, key: str, max_tokens: int) -> int:
    body = {"model": MODEL, "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True}
    resp = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status_code


async def test_a_batch_organisation_waits_for_interactive_teams_and_takes_an_idle_backend() -> None:
    """Tiers are the tree's top level: org-n (batch) with teams n1, n2 gets every slot while
    the interactive org is idle, and no dispatch while any interactive request waits."""
    seqs = 4
    tree = [
        {"name": "org-i", "tenants": [{"name": t, "api_keys": [f"key-{t}"]} for t in ("a", "b")]},
        {
            "name": "org-n",
            "tier": "batch",
            "tenants": [{"name": t, "api_keys": [f"key-{t}"]} for t in ("n1", "n2")],
        },
    ]
    sim = {"speed": 4.0, "max_num_seqs": seqs}
    async with gateway_stack(
        gateway={"tenants": tree}, sim=sim, backend={"max_num_seqs": seqs}
    ) as stack:
        d = stack.state.dispatcher
        log: list[tuple[str, int, int]] = []  # (tenant, interactive queued, batch queued)

        def seen(job: Any) -> None:
            log.append((job.tenant, d.core.queued_under("org-i"), d.core.queued_under("org-n")))

        d.on_dispatch = seen
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
            batch = [
                asyncio.create_task(_send(http, key, 1200)) for key in ("key-n1", "key-n2") * 2
            ]
            await wait_for(lambda: d.core.group_running.get("org-n") == seqs)
            batch += [asyncio.create_task(_send(http, key, 16)) for key in ("key-n1", "key-n2") * 2]
            await wait_for(lambda: d.core.queued_under("org-n") == seqs)
            inter = [
                asyncio.create_task(_send(http, key, 16))
                for _ in range(6)
                for key in ("key-a", "key-b")
            ]
            assert await asyncio.gather(*inter, *batch) == [200] * (12 + 2 * seqs)
        assert {t for t, _, _ in log[:seqs]} == {"n1", "n2"}  # the idle backend, both teams
        later = log[seqs:]
        assert all(waiting == 0 for t, waiting, _ in later if t in ("n1", "n2"))
        assert sum(1 for t, _, queued in later if t in ("a", "b") and queued) >= 6
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        assert d.core.total_queued() == 0 and d.core.group_running == {"org-i": 0, "org-n": 0}
