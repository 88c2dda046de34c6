"""Two replicas sharing one backend's KV budget: the shared ledger books what ``predict``
admission plans for (a request's prompt and predicted output), not the rest of the context.

Clients send no ``max_tokens`` (as SDK clients do) to a backend whose KV budget is twice its
context: reserving the rest of the context, two requests at a time would fit. Once each replica's
predictor has seen its tenants' outputs (the simulated backend stops at about 32 tokens), the
two replicas together keep every batch slot busy; under ``kv_admission: reserve`` (the
baseline) they run two at a time. Counts of requests in flight, never durations.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from gateway.scheduler import Job

from ..gateway.conftest import MODEL, tenants
from .conftest import RedisServer
from .test_replicas_tree import UNLIMITED, Replicas, replicas

SEQS = 8
CONTEXT = 4096
KV = 2 * CONTEXT  # a request booking the rest of its context: two fit


async def _ask(http: httpx.AsyncClient, url: str, tenant: str) -> int:
    messages = [{"role": "user", "content": "tell me a story " * 8}]
    body = {"model": MODEL, "messages": messages}  # no max_tokens: up to the context
    headers = {"Authorization": f"Bearer key-{tenant}"}
    resp = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.status_code


def _running(r: Replicas) -> int:
    """Requests dispatched to the backend and not finished, both replicas together (slots
    held for a tenant's next request not counted)."""
    return sum(sum(s.dispatcher.core.running.values()) for s in r.states)


@pytest.mark.parametrize(("mode", "most"), [("predict", SEQS), ("reserve", 2)])
async def test_replicas_fill_the_batch_with_predicted_bookings(
    redis_server: RedisServer, mode: str, most: int
) -> None:
    gw = {"tenants": tenants(("a", 1), ("b", 1))}
    sim = {"speed": 2.0, "max_num_seqs": SEQS, "max_model_len": CONTEXT}  # long enough to overlap
    sim |= {"kv_cache_tokens": KV, "median_output_tokens": 32}
    backend = {"max_kv_tokens": KV, "kv_admission": mode}
    async with replicas(redis_server, gw, seqs=SEQS, sim=sim, backend=backend) as r:
        seen: list[int] = []

        def observe(replica: int, job: Job) -> None:
            seen.append(_running(r))

        async with httpx.AsyncClient(timeout=120, limits=UNLIMITED) as http:
            async with asyncio.timeout(90):
                for _ in range(6):  # each replica's predictor learns its tenant's outputs
                    assert await _ask(http, r.url(0), "a") == 200
                    assert await _ask(http, r.url(1), "b") == 200
                r.observe = observe
                flood = [
                    asyncio.create_task(_ask(http, r.url(i), t))
                    for _ in range(12)
                    for i, t in enumerate(("a", "b"))
                ]
                assert await asyncio.gather(*flood) == [200] * 24
        await r.assert_clean()
    assert max(seen) == most, seen
