"""Per-tenant caps end to end: ``max_in_flight`` through HTTP and the simulated backend.

Assertions are about states the gateway reaches (who runs, who waits), never durations.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from .conftest import MODEL, gateway_stack, tenants, wait_for

SEQS = 4


def _body() -> dict[str, Any]:
    return {"model": MODEL, "prompt": "go", "max_tokens": 100_000, "ignore_eos": True}


async def _send(http: httpx.AsyncClient, key: str) -> int:
    resp = await http.post(
        "/v1/completions", json=_body(), headers={"Authorization": f"Bearer {key}"}
    )
    return resp.status_code


async def test_capped_tenant_runs_at_most_its_cap_others_take_the_rest_nothing_leaks() -> None:
    ts = tenants(("a", 1), ("b", 1), max_queued=2)
    ts[0]["max_in_flight"] = 1
    gw = {"tenants": ts}
    sim = {"speed": 1.0, "max_model_len": 200_000, "max_num_seqs": SEQS}
    async with gateway_stack(gateway=gw, sim=sim, backend={"max_num_seqs": SEQS}) as stack:
        d = stack.state.dispatcher
        most: dict[str, int] = {}

        def seen(_job: Any) -> None:
            for t, n in d.core.running.items():
                most[t] = max(most.get(t, 0), n)

        d.on_dispatch = seen
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            tasks = [asyncio.create_task(_send(http, "key-a")) for _ in range(3)]
            await wait_for(lambda: d.core.running.get("a") == 1 and d.core.queued("a") == 2)
            assert await _send(http, "key-a") == 429  # a's queue is full (max_queued 2)
            full = await http.post(
                "/v1/completions", json=_body(), headers={"Authorization": "Bearer key-a"}
            )
            assert full.status_code == 429 and float(full.headers["Retry-After"]) > 0
            # a's queued head leads the fair order (oldest), yet b gets every other slot
            tasks += [asyncio.create_task(_send(http, "key-b")) for _ in range(3)]
            await wait_for(lambda: d.core.running.get("b") == SEQS - 1)
            assert d.core.running["a"] == 1 and d.core.queued("a") == 2 and d.core.queued("b") == 0
            assert stack.state.admission.in_flight() == SEQS
            for task in tasks:  # clients go away: queued and running requests are dropped
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await wait_for(lambda: stack.state.admission.in_flight() == 0)
        assert most["a"] == 1
        assert d.core.total_queued() == 0 and d.core.running == {"a": 0, "b": 0}
        backend = next(iter(stack.state.admission.backends()))
        assert backend.booked_tokens == 0
        await wait_for(lambda: stack.sims[0].core.num_running + stack.sims[0].core.num_waiting == 0)
