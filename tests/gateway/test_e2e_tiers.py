"""Priority tiers end to end: a ``batch`` tenant through HTTP and the simulated backend.

Assertions are about who is dispatched while whom waits (recorded at each dispatch), never
about durations.
"""

from __future__ import annotations

import asyncio

import httpx

from gateway.scheduler import Job

from .conftest import MODEL, gateway_stack, tenants, wait_for

SEQS = 4


async def _send(http: httpx.AsyncClient, key: str, max_tokens: int) -> int:
    body = {"model": MODEL, "prompt": "go", "max_tokens": max_tokens, "ignore_eos": True}
    resp = await http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status_code


async def test_batch_gets_nothing_while_interactive_waits_and_everything_when_idle() -> None:
    ts = tenants(("a", 1), ("b", 1), ("c", 1))
    ts[2]["tier"] = "batch"
    sim = {"speed": 4.0, "max_num_seqs": SEQS}
    backend = {"max_num_seqs": SEQS}
    async with gateway_stack(gateway={"tenants": ts}, sim=sim, backend=backend) as stack:
        d = stack.state.dispatcher
        log: list[tuple[str, int, int]] = []  # (tenant, interactive queued, batch queued)

        def seen(job: Job) -> None:
            log.append((job.tenant, d.core.queued("a") + d.core.queued("b"), d.core.queued("c")))

        d.on_dispatch = seen
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
            # interactive idle: the batch tenant takes every slot, the rest of it queues
            batch = [asyncio.create_task(_send(http, "key-c", 1200)) for _ in range(SEQS)]
            await wait_for(lambda: d.core.running.get("c") == SEQS)
            batch += [asyncio.create_task(_send(http, "key-c", 16)) for _ in range(SEQS)]
            await wait_for(lambda: d.core.queued("c") == SEQS)
            # interactive tenants flood while batch work runs and waits
            inter = [
                asyncio.create_task(_send(http, key, 16))
                for _ in range(6)
                for key in ("key-a", "key-b")
            ]
            assert await asyncio.gather(*inter, *batch) == [200] * (12 + 2 * SEQS)
        assert [t for t, _, _ in log[:SEQS]] == ["c"] * SEQS
        later = log[SEQS:]
        # no batch dispatch while an interactive request waited
        assert all(waiting == 0 for t, waiting, _ in later if t == "c")
        # the interactive requests did overtake queued batch work (the check above has teeth)
        assert sum(1 for t, _, batch_waiting in later if t != "c" and batch_waiting) >= 6
        assert d.core.total_queued() == 0 and stack.state.admission.in_flight() == 0


async def test_a_minimum_share_gives_batch_its_part_while_interactive_waits() -> None:
    ts = tenants(("a", 1), ("c", 1))
    ts[1]["tier"] = "batch"
    gw = {"tenants": ts, "scheduler": {"batch_min_share": 0.5}}
    backend = {"max_num_seqs": SEQS}
    async with gateway_stack(gateway=gw, sim={"speed": 4.0}, backend=backend) as stack:
        d = stack.state.dispatcher
        both: list[str] = []  # tenants dispatched while both tiers had requests waiting

        def seen(job: Job) -> None:
            if d.core.queued("a") and d.core.queued("c"):
                both.append(job.tenant)

        d.on_dispatch = seen
        async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
            sends = [
                asyncio.create_task(_send(http, key, 16))
                for _ in range(16)
                for key in ("key-a", "key-c")
            ]
            assert await asyncio.gather(*sends) == [200] * 32
        assert len(both) >= 10, both
        assert 0.3 <= both.count("c") / len(both) <= 0.7, both
