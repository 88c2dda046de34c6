"""Fairness end to end: real HTTP clients, the gateway, the simulated backend.

The assertions are about the *order* in which the gateway dispatches and the service its ledger
records, never about durations, so they hold on a slow or busy machine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from gateway.scheduler import Job

from .conftest import MODEL, Stack, gateway_stack, tenants, wait_for

PROMPT = "tell me a story " * 24  # ~100 tokens
MAX_TOKENS = 32
SEQS = 4


def _body(stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }


async def _send(http: httpx.AsyncClient, key: str) -> int:
    async with http.stream(
        "POST", "/v1/completions", json=_body(), headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status_code == 200
        events = 0
        async for line in resp.aiter_lines():
            events += line.startswith("data: {")
        return events


async def _flood_then_steady(stack: Stack, flood: int, steady: int) -> tuple[float, float, float]:
    """Tenant a floods ``flood`` requests; once they are queued, tenant b sends ``steady``.
    Returns (service a, service b) from the ledger when b's last request completes, and 2U."""
    d = stack.state.dispatcher
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        flooders = [asyncio.create_task(_send(http, "key-a")) for _ in range(flood)]
        await wait_for(lambda: d.core.total_queued() == flood - SEQS)
        await asyncio.gather(*(_send(http, "key-b") for _ in range(steady)))
        pool = d.core.pool(MODEL)
        snapshot = (pool.service("a"), pool.service("b"))
        await asyncio.gather(*flooders)
    prompt = stack.state.counter.count_text(PROMPT)
    m = SEQS * (prompt + MAX_TOKENS)  # token capacity of the running batch (max_kv_tokens)
    two_u = 2 * max(1 * prompt, 2 * m)
    return snapshot[0], snapshot[1], two_u


def _kv() -> int:
    # enough KV for exactly SEQS requests of this shape
    from common.tokenizer import TokenCounter

    return SEQS * (TokenCounter().count_text(PROMPT) + MAX_TOKENS)


async def test_vtc_keeps_steady_tenant_within_bound_of_flooder_fcfs_does_not() -> None:
    results = {}
    for policy in ("vtc", "fcfs"):
        async with gateway_stack(
            gateway={"scheduler": {"policy": policy}},
            backend={"max_num_seqs": SEQS, "max_kv_tokens": _kv(), "kv_admission": "reserve"},
        ) as stack:
            a, b, two_u = await _flood_then_steady(stack, flood=40, steady=10)
            results[policy] = (a, b, two_u)
            assert stack.state.admission.in_flight() == 0
    a, b, two_u = results["vtc"]
    assert abs(a - b) <= two_u, results
    a, b, two_u = results["fcfs"]
    assert a - b > two_u, results


async def test_weights_two_to_one_give_two_to_one_dispatches() -> None:
    order: list[str] = []
    gw = {"tenants": tenants(("a", 2), ("b", 1))}
    async with gateway_stack(
        gateway=gw,
        backend={"max_num_seqs": SEQS, "max_kv_tokens": _kv(), "kv_admission": "reserve"},
    ) as stack:
        d = stack.state.dispatcher

        def record(job: Job) -> None:
            order.append(job.tenant)

        d.on_dispatch = record
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            tasks = [asyncio.create_task(_send(http, "key-a")) for _ in range(30)]
            await wait_for(lambda: d.core.total_queued() == 30 - SEQS)
            tasks += [asyncio.create_task(_send(http, "key-b")) for _ in range(30)]
            await wait_for(lambda: d.core.pool(MODEL).queued("b") == 30)
            await asyncio.gather(*tasks)
        pool = d.core.pool(MODEL)
        assert pool.service("a") == pool.service("b")  # same work in the end
    # while both were backlogged (from b's first dispatch until a's queue ran dry), a got ~2 of
    # every 3 dispatches
    start = order.index("b")
    a_last = max(i for i, t in enumerate(order) if t == "a")
    window = order[start : a_last + 1]
    share_a = window.count("a") / len(window)
    assert 0.6 <= share_a <= 0.73, (share_a, order)
