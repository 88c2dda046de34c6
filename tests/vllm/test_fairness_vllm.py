"""VTC through the gateway with real vLLM as the bottleneck: a model big enough that the engine,
not the gateway, limits throughput (hidden 1024 x 8 layers on CPU)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest

from .conftest import MODEL, VllmServer, build_model, gateway_for, running_vllm, wait_until
from .test_gateway_vllm import ids

SEQS = 4
OUT = 16


@pytest.fixture(scope="module")
def big_vllm() -> Iterator[VllmServer]:
    from .conftest import require_vllm

    require_vllm()
    with running_vllm(model_dir=build_model(hidden=1024, layers=8), max_num_seqs=SEQS) as s:
        yield s


async def _b_share(url: str, policy: str) -> float:
    """Tenant a floods 16 requests; once they queue, b sends 4. Returns b's share of the 8
    completions after those of the requests already running when b arrived."""
    order: list[str] = []
    async with (
        gateway_for(url, backend={"max_num_seqs": SEQS}, scheduler={"policy": policy}) as gw,
        httpx.AsyncClient(timeout=300) as http,
    ):

        async def one(tenant: str, i: int) -> None:
            r = await http.post(
                gw.url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": ids(16, 50 * i + (0 if tenant == "a" else 7)),
                    "max_tokens": OUT,
                    "ignore_eos": True,
                },
                headers={"Authorization": f"Bearer key-{tenant}"},
            )
            assert r.status_code == 200, r.text
            order.append(tenant)

        flood = [asyncio.create_task(one("a", i)) for i in range(16)]
        await wait_until(lambda: gw.state.dispatcher.core.total_queued() >= 12, 60, "a queued")
        done_before = len(order)
        light = [asyncio.create_task(one("b", i)) for i in range(4)]
        await asyncio.gather(*flood, *light)
    # the SEQS requests running when b arrived finish first under any policy; then the order
    # is the scheduler's
    after = order[done_before + SEQS : done_before + SEQS + 8]
    return after.count("b") / len(after)


async def test_vtc_shares_the_engine_fcfs_does_not(big_vllm: VllmServer) -> None:
    fcfs = await _b_share(big_vllm.url, "fcfs")
    vtc = await _b_share(big_vllm.url, "vtc")
    # FCFS serves b after a's backlog (share ~0); VTC lifts b to a's counter and alternates
    assert vtc >= fcfs + 0.25, (vtc, fcfs)
    assert big_vllm.metrics()["vllm:num_requests_waiting"] == 0
