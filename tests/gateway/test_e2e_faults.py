"""Client disconnects in every phase and backend failures: nothing leaks, charges stay exact."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from backends.sim.faults import parse_fault

from .conftest import MODEL, Stack, gateway_stack, wait_for

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}


def _body(max_tokens: int = 64, stream: bool = True) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": "hello there",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


def _settled(stack: Stack) -> bool:
    st = stack.state
    return (
        st.admission.in_flight() == 0
        and st.dispatcher.core.total_queued() == 0
        and all(s.core.num_running == 0 and s.core.num_waiting == 0 for s in stack.sims)
    )


async def test_disconnect_while_queued_removes_it_and_charges_nothing() -> None:
    async with gateway_stack(backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=_body(2000), headers=A) as r:
                assert r.status_code == 200
                waiting = asyncio.create_task(http.post("/v1/completions", json=_body(), headers=B))
                await wait_for(lambda: d.core.total_queued() == 1)
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                await wait_for(lambda: d.core.total_queued() == 0)
                pool = d.core.pool(MODEL)
                lifted = pool.counter("b")  # lifted on arrival to a's counter, never charged
                assert pool.service("b") == 0 and lifted <= pool.counter("a")
        await wait_for(lambda: _settled(stack))
        assert stack.state.stats.outcomes[("b", "client_cancelled")] == 1


async def test_disconnect_before_first_token_aborts_upstream_and_keeps_prompt_charge() -> None:
    slow = {"faults": (parse_fault("slow_first;delay=30"),)}
    async with gateway_stack(sim=slow) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            # the gateway answers 200 only once the backend has taken the request; leave then,
            # 30 s before the first token
            async with http.stream("POST", "/v1/completions", json=_body(), headers=A) as resp:
                assert resp.status_code == 200
                assert stack.state.admission.in_flight() == 1
        await wait_for(lambda: _settled(stack))
        pool = stack.state.dispatcher.core.pool(MODEL)
        prompt = stack.state.counter.count_text("hello there")
        assert pool.counter("a") == prompt  # prompt was sent upstream; no output was generated


async def test_disconnect_mid_stream_charges_generated_tokens_only() -> None:
    async with gateway_stack(sim={"speed": 1.0}) as stack:
        async with (
            httpx.AsyncClient(base_url=stack.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=_body(4000), headers=A) as resp,
        ):
            seen = 0
            async for line in resp.aiter_lines():
                seen += line.startswith("data: {")
                if seen == 5:
                    break
        await wait_for(lambda: _settled(stack))
        pool = stack.state.dispatcher.core.pool(MODEL)
        prompt = stack.state.counter.count_text("hello there")
        out = (pool.counter("a") - prompt) / 2
        assert out == int(out)
        assert 5 <= out < 4000  # what was generated before the abort, never the reservation


async def test_refusing_backend_is_retried_elsewhere_and_marked_down() -> None:
    refuse = {"faults": (parse_fault("refuse"),)}
    async with gateway_stack(sim=refuse, more_backends=[({}, {})]) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            for _ in range(6):
                r = await http.post("/v1/completions", json=_body(8, stream=False), headers=A)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 8
        pool = stack.state.pool
        assert pool.states["sim"].slots.healthy is False
        assert pool.states["sim"].errors == {"unreachable": 3}  # closed without an answer
        assert pool.states["sim1"].slots.healthy is True
        assert _settled(stack)
        prompt = stack.state.counter.count_text("hello there")
        assert stack.state.dispatcher.core.pool(MODEL).counter("a") == 6 * (prompt + 16)


async def test_500_before_streaming_with_no_other_backend_is_502_and_refunded() -> None:
    async with gateway_stack(sim={"faults": (parse_fault("error_500"),)}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            r = await http.post("/v1/completions", json=_body(8), headers=A)
        assert r.status_code == 502
        assert r.json()["error"]["code"] == 502
        assert _settled(stack)
        assert stack.state.dispatcher.core.pool(MODEL).counter("a") == 0


@pytest.mark.parametrize(
    "fault", ["drop_mid;after=4", "error_mid;after=4", "malformed_sse;after=4"]
)
async def test_mid_stream_failure_is_an_sse_error_then_done(fault: str) -> None:
    async with gateway_stack(sim={"faults": (parse_fault(fault),)}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            r = await http.post("/v1/completions", json=_body(32), headers=A)
        assert r.status_code == 200
        events = [e for e in r.text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        assert '"error"' in events[-2] and '"code": 502' in events[-2]
        await wait_for(lambda: _settled(stack))
        prompt = stack.state.counter.count_text("hello there")
        charged_out = (stack.state.dispatcher.core.pool(MODEL).counter("a") - prompt) / 2
        assert 4 <= charged_out <= 5  # tokens delivered before the failure, not the 32 reserved


async def test_stalled_stream_hits_the_read_timeout() -> None:
    gw = {"limits": {"read_timeout_s": 0.5, "health_interval_s": 60}}
    async with gateway_stack(gateway=gw, sim={"faults": (parse_fault("stall_mid;after=2"),)}) as st:
        async with httpx.AsyncClient(base_url=st.url, timeout=30) as http:
            r = await http.post("/v1/completions", json=_body(32), headers=A)
        assert r.status_code == 200
        assert "stalled" in r.text and r.text.endswith("data: [DONE]\n\n")
        await wait_for(lambda: _settled(st))


async def test_backend_marked_down_comes_back_after_a_passing_health_check() -> None:
    from backends.sim.config import SimConfig
    from backends.sim.server import SimServer

    gw = {"limits": {"health_interval_s": 0.2, "connect_timeout_s": 1}}
    async with gateway_stack(gateway=gw, more_backends=[({}, {})]) as stack:
        first = stack.sims[0]
        port = first.port
        await first.stop()
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            # The health loop or the failed attempts mark it down; requests go to sim1.
            for _ in range(4):
                r = await http.post("/v1/completions", json=_body(4, stream=False), headers=A)
                assert r.status_code == 200
            await wait_for(lambda: not stack.state.pool.states["sim"].slots.healthy)
            async with SimServer(SimConfig(port=port, speed=4.0)):
                await wait_for(lambda: stack.state.pool.states["sim"].slots.healthy)
                health = (await http.get("/health")).json()
                assert all(b["up"] for b in health["backends"])


async def test_api_keys_and_prompts_never_reach_the_logs(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    secret_prompt = "the-secret-prompt-text"
    async with gateway_stack(sim={"faults": (parse_fault("error_500"),)}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            body = {"model": MODEL, "prompt": secret_prompt, "max_tokens": 3}
            await http.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
            await http.post("/v1/completions", json=body, headers=A)
            metrics = (await http.get("/metrics")).text
    text = caplog.text
    assert "key-a" not in text and "nope" not in text and secret_prompt not in text
    assert "key-a" not in metrics and secret_prompt not in metrics


async def test_bodies_the_encoder_may_refuse_never_hold_a_slot() -> None:
    deep = "[" * 300 + "]" * 300
    raws = [
        b'{"model": "%s", "prompt": "x", "max_tokens": 2, "seed": %d}' % (MODEL.encode(), 10**30),
        b'{"model": "%s", "prompt": "x", "max_tokens": 2, "extra": %s}'
        % (MODEL.encode(), deep.encode()),
    ]
    async with gateway_stack(backend={"max_num_seqs": 1}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            for raw in raws * 2:
                r = await http.post("/v1/completions", content=raw, headers=A)
                assert r.status_code < 500, r.text
            ok = await http.post("/v1/completions", json=_body(2, stream=False), headers=A)
            assert ok.status_code == 200
        await wait_for(lambda: _settled(stack))
        assert stack.state.dispatcher.core.running.get("a", 0) == 0


async def test_completions_without_max_tokens_reserve_sixteen_like_vllm() -> None:
    async with gateway_stack() as stack:
        reserved: list[int] = []
        stack.state.dispatcher.on_dispatch = lambda job: reserved.append(job.max_tokens)
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            r = await http.post(
                "/v1/completions",
                headers=A,
                json={"model": MODEL, "prompt": "x", "ignore_eos": True},
            )
            assert r.json()["usage"]["completion_tokens"] == 16
        assert reserved == [16]


async def test_a_tenant_removed_after_authentication_is_not_queued() -> None:
    from gateway.errors import Unauthorized
    from gateway.scheduler import Job

    async with gateway_stack() as stack:
        d = stack.state.dispatcher
        d.remove_tenant("a", Unauthorized("gone"))
        with pytest.raises(Unauthorized):
            await d.acquire(Job("a", 1, 1, 0.0, model=MODEL), 1.0)
        d.close(RuntimeError("closing"))
        with pytest.raises(RuntimeError, match="closing"):
            await d.acquire(Job("b", 1, 1, 0.0, model=MODEL), 1.0)
        assert d.core.total_queued() == 0
