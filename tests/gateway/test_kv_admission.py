"""KV admission through the real gateway: ``kv_admission: peak`` packs more requests than
``reserve`` on the same KV budget, and both give every token back."""

from __future__ import annotations

import asyncio

import httpx

from .conftest import MODEL, gateway_stack, wait_for

KV = 2000
HDR = {"Authorization": "Bearer key-a"}


async def _max_in_flight(mode: str) -> int:
    """One long generation (max_tokens 1500) in flight, then 12 short ones (100) at once.

    ``reserve`` books 1 + 1500 for the long one and leaves room for 4 short ones (101 each);
    ``peak`` sees that the short ones finish long before the long one has grown: the i-th
    request in order of tokens left ends at 1 + (i - 1) + 100*i <= 2000 for i <= 19, so all
    12 run beside it.
    """
    async with gateway_stack(
        backend={"max_kv_tokens": KV, "kv_admission": mode}, sim={"speed": 1}
    ) as stack:
        st = stack.state
        slots = st.pool.states["sim"].slots
        seen: list[int] = []
        st.dispatcher.on_dispatch = lambda job: seen.append(slots.in_flight)  # incl. this one
        body = {"model": MODEL, "prompt": "x", "ignore_eos": True}
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            long = {**body, "max_tokens": 1500, "stream": True}
            async with http.stream("POST", "/v1/completions", json=long, headers=HDR) as resp:
                assert resp.status_code == 200
                short = {**body, "max_tokens": 100}
                answers = await asyncio.gather(
                    *(http.post("/v1/completions", json=short, headers=HDR) for _ in range(12))
                )
                assert [r.status_code for r in answers] == [200] * 12
                assert all(r.json()["usage"]["completion_tokens"] == 100 for r in answers)
                assert slots.in_flight == 1  # the long one is still running
                if mode == "peak":
                    assert 0 < slots.reserved_tokens <= KV
            # leaving the block closes the long stream: the gateway aborts it upstream
        await wait_for(lambda: st.admission.in_flight() == 0)
        assert (slots.in_flight, slots.booked_tokens, slots.reserved_tokens) == (0, 0, 0)
        await wait_for(lambda: stack.sims[0].core.num_running == 0)
        return max(seen)


async def test_peak_admission_runs_more_requests_than_reserve_on_the_same_budget() -> None:
    reserve = await _max_in_flight("reserve")
    peak = await _max_in_flight("peak")
    assert peak == 13  # the long one and all 12 short ones at once
    assert reserve < 8 < peak  # 5 while no short one has finished
