"""Every gateway metric exists and moves the way the request path and the scheduler move."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from backends.sim.faults import parse_fault
from gateway.metrics import FairnessWindow, jain_index
from gateway.outcomes import OUTCOMES
from gateway.scheduler.predictor import DEFAULT_PRIOR
from tests.gateway.conftest import MODEL, gateway_stack, tenants, wait_for

from .conftest import body, names, scrape, stream_all, value

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}

TENANT_FAMILIES = {
    "vtc_tenant_counter",
    "vtc_tenant_service_tokens_total",
    "vtc_tenant_prompt_tokens_total",
    "vtc_tenant_completion_tokens_total",
    "vtc_requests_total",
    "vtc_tenant_queued",
    "vtc_tenant_in_flight",
    "vtc_tenant_weight",
    "vtc_queue_wait_seconds_bucket",
    "vtc_time_to_first_token_seconds_bucket",
    "vtc_e2e_request_latency_seconds_bucket",
}
BACKEND_FAMILIES = {
    "vtc_backend_in_flight",
    "vtc_backend_reserved_tokens",
    "vtc_backend_max_num_seqs",
    "vtc_backend_max_kv_tokens",
    "vtc_backend_up",
    "vtc_backend_admitted_total",
    "vtc_backend_errors_total",
}
GLOBAL_FAMILIES = {
    "vtc_dispatches_total",
    "vtc_scheduler_decision_seconds_bucket",
    "vtc_fairness_jain_index",
    "vtc_fairness_backlogged_tenants",
    "vtc_backlogged_counter_gap",
    "vtc_config_reloads_total",
    "vtc_config_last_reload_success_timestamp_seconds",
}


async def test_all_families_exist_after_one_request_and_keys_never_appear() -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
        before = await scrape(http)
        # configured tenants are visible before their first request
        assert value(before, "vtc_tenant_queued", tenant="a") == 0
        assert value(before, "vtc_tenant_in_flight", tenant="b") == 0
        for outcome in OUTCOMES:
            assert value(before, "vtc_requests_total", tenant="a", outcome=outcome) == 0
        assert value(before, "vtc_backend_errors_total", backend="sim", kind="stream_broken") == 0
        assert value(before, "vtc_fairness_jain_index") == 1.0
        assert await stream_all(http, "key-a", 8) == 200
        text = (await http.get("/metrics")).text
        assert "key-a" not in text and "key-b" not in text
        got = names(await scrape(http))
        missing = (TENANT_FAMILIES | BACKEND_FAMILIES | GLOBAL_FAMILIES) - got
        assert not missing


async def test_a_finished_request_moves_tenant_global_and_backend_metrics() -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
        assert await stream_all(http, "key-a", 20) == 200
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        s = await scrape(http)
        prompt = stack.state.counter.count_text("hello there")
        assert value(s, "vtc_tenant_completion_tokens_total", tenant="a") == 20
        assert value(s, "vtc_tenant_prompt_tokens_total", tenant="a") == prompt
        # service at prices 1/2; the counter is service / weight (weight 1)
        assert value(s, "vtc_tenant_service_tokens_total", tenant="a") == prompt + 2 * 20
        assert value(s, "vtc_tenant_counter", tenant="a", model=MODEL) == prompt + 2 * 20
        assert value(s, "vtc_requests_total", tenant="a", outcome="ok") == 1
        assert value(s, "vtc_requests_total", tenant="b", outcome="ok") == 0
        for hist in ("vtc_queue_wait_seconds", "vtc_time_to_first_token_seconds"):
            assert value(s, f"{hist}_count", tenant="a") == 1
        assert value(s, "vtc_e2e_request_latency_seconds_count", tenant="a") == 1
        assert value(s, "vtc_e2e_request_latency_seconds_bucket", tenant="a", le="+Inf") == 1
        assert value(s, "vtc_dispatches_total") == 1
        assert value(s, "vtc_scheduler_decision_seconds_count") >= 1
        assert value(s, "vtc_backend_admitted_total", backend="sim") == 1
        assert value(s, "vtc_backend_up", backend="sim") == 1
        assert value(s, "vtc_backend_max_num_seqs", backend="sim") == 256
        assert value(s, "vtc_backend_max_kv_tokens", backend="sim") > 0
        assert value(s, "vtc_tenant_weight", tenant="a") == 1


async def test_running_and_queued_gauges_follow_the_requests() -> None:
    async with gateway_stack(backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body(2000), headers=A) as r:
                assert r.status_code == 200
                waiting = asyncio.create_task(http.post("/v1/completions", json=body(4), headers=B))
                await wait_for(lambda: d.core.total_queued() == 1)
                s = await scrape(http)
                prompt = stack.state.counter.count_text("hello there")
                assert value(s, "vtc_tenant_in_flight", tenant="a") == 1
                assert value(s, "vtc_tenant_queued", tenant="b") == 1
                assert value(s, "vtc_tenant_queued", tenant="a") == 0
                assert value(s, "vtc_backend_in_flight", backend="sim") == 1
                # "predict" admission plans for the predictor's prior (no history yet), at most
                # max_tokens, plus a block of rounding
                planned = prompt + min(2000, DEFAULT_PRIOR) + 16
                assert value(s, "vtc_backend_reserved_tokens", backend="sim") == planned
                await r.aclose()  # a leaves; b runs
                assert (await waiting).status_code == 200
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            s = await scrape(http)
        assert value(s, "vtc_tenant_in_flight", tenant="a") == 0
        assert value(s, "vtc_tenant_queued", tenant="b") == 0
        assert value(s, "vtc_backend_reserved_tokens", backend="sim") == 0
        assert value(s, "vtc_requests_total", tenant="a", outcome="client_cancelled") == 1
        assert value(s, "vtc_requests_total", tenant="b", outcome="ok") == 1


async def test_rejections_are_counted_by_reason() -> None:
    gw = {"tenants": tenants(("a", 1), ("b", 1), max_queued=1), "limits": {"queue_timeout_s": 0.3}}
    async with gateway_stack(gateway=gw, backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body(2000), headers=A) as r:
                assert r.status_code == 200
                queued = asyncio.create_task(http.post("/v1/completions", json=body(), headers=B))
                await wait_for(lambda: d.core.total_queued() == 1)
                full = await http.post("/v1/completions", json=body(), headers=B)
                assert full.status_code == 429
                assert (await queued).status_code == 503  # queue_timeout_s
                bad = await http.post("/v1/completions", json={"model": MODEL}, headers=B)
                assert bad.status_code == 400
            s = await scrape(http)
        assert value(s, "vtc_requests_total", tenant="b", outcome="rejected_queue_full") == 1
        assert value(s, "vtc_requests_total", tenant="b", outcome="timeout") == 1
        assert value(s, "vtc_requests_total", tenant="b", outcome="rejected_invalid") == 1


async def test_rpm_rejections_are_rate_limit() -> None:
    gw = {"scheduler": {"policy": "rpm", "rpm_limit": 1}}
    async with gateway_stack(gateway=gw) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        assert await stream_all(http, "key-a", 2) == 200
        assert await stream_all(http, "key-a", 2) == 429
        s = await scrape(http)
        assert value(s, "vtc_requests_total", tenant="a", outcome="rejected_rate_limit") == 1


async def test_backend_errors_by_kind_and_backend_error_outcome() -> None:
    sim = {"faults": (parse_fault("error_mid;after=2"),)}
    async with gateway_stack(sim=sim) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        assert await stream_all(http, "key-a", 10) == 200  # error arrives inside the stream
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        s = await scrape(http)
        assert value(s, "vtc_backend_errors_total", backend="sim", kind="stream_broken") == 1
        assert value(s, "vtc_requests_total", tenant="a", outcome="backend_error") == 1


async def test_backend_error_kinds_say_how_the_backend_failed() -> None:
    """One request tried on a backend that closes the connection unanswered (unreachable),
    then moved to one that answers 500 (error_before_stream): 502, one error of each kind."""
    refuse = {"faults": (parse_fault("refuse"),)}
    error_500 = {"faults": (parse_fault("error_500"),)}
    async with gateway_stack(sim=refuse, more_backends=[(error_500, {})]) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as http:
            assert await stream_all(http, "key-a", 4) == 502
            s = await scrape(http)
    kinds = {
        (b, k): value(s, "vtc_backend_errors_total", backend=b, kind=k)
        for b in ("sim", "sim1")
        for k in ("unreachable", "error_before_stream", "stream_broken")
    }
    assert {bk: n for bk, n in kinds.items() if n} == {
        ("sim", "unreachable"): 1,
        ("sim1", "error_before_stream"): 1,
    }
    assert value(s, "vtc_requests_total", tenant="a", outcome="backend_error") == 1


async def test_requests_refused_while_draining_are_counted_as_draining() -> None:
    """Shutdown answers the queue 503 and refuses new requests: ``rejected_draining``, not
    ``timeout``; the running stream finishes ``ok``."""
    async with gateway_stack(backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body(20), headers=A) as r:
                assert r.status_code == 200
                queued = asyncio.create_task(http.post("/v1/completions", json=body(), headers=B))
                await wait_for(lambda: d.core.total_queued() == 1)
                assert stack.state.drain() == 1
                assert (await queued).status_code == 503
                refused = await http.post("/v1/completions", json=body(), headers=A)
                assert refused.status_code == 503
                assert refused.json()["error"]["type"] == "ServiceUnavailableError"
                assert [line async for line in r.aiter_lines() if line][-1] == "data: [DONE]"
            await wait_for(lambda: stack.state.admission.in_flight() == 0)
            s = await scrape(http)
    assert value(s, "vtc_requests_total", tenant="b", outcome="rejected_draining") == 1
    assert value(s, "vtc_requests_total", tenant="a", outcome="rejected_draining") == 1
    assert value(s, "vtc_requests_total", tenant="a", outcome="ok") == 1
    for tenant in ("a", "b"):
        assert value(s, "vtc_requests_total", tenant=tenant, outcome="timeout") == 0


async def test_unreachable_backend_is_down_with_zero_capacity_in_use() -> None:
    backend = {"url": "http://127.0.0.1:9", "max_kv_tokens": 1000, "max_num_seqs": 4}
    async with gateway_stack(backend=backend) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as http:
            s = await scrape(http)
        assert value(s, "vtc_backend_up", backend="sim") == 0
        assert value(s, "vtc_backend_max_kv_tokens", backend="sim") == 1000
        assert value(s, "vtc_backend_max_num_seqs", backend="sim") == 4


async def test_tenant_label_cardinality_is_capped_to_other() -> None:
    gw = {"tenants": tenants(("a", 1), ("b", 2), ("c", 3)), "metrics": {"max_tenant_labels": 1}}
    async with gateway_stack(gateway=gw) as stack, httpx.AsyncClient(base_url=stack.url) as http:
        assert await stream_all(http, "key-b", 3) == 200
        assert await stream_all(http, "key-c", 3) == 200
        s = await scrape(http)
    tenants_seen = {dict(lbl).get("tenant") for _, lbl in s} - {None}
    assert tenants_seen == {"a", "other"}
    assert value(s, "vtc_requests_total", tenant="other", outcome="ok") == 2
    assert value(s, "vtc_tenant_completion_tokens_total", tenant="other") == 6
    assert value(s, "vtc_time_to_first_token_seconds_count", tenant="other") == 2
    assert value(s, "vtc_tenant_weight", tenant="a") == 1


async def test_counter_gap_and_jain_index_with_two_backlogged_tenants() -> None:
    async with gateway_stack(backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as stack:
        d = stack.state.dispatcher
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            async with http.stream("POST", "/v1/completions", json=body(2000), headers=A) as r:
                assert r.status_code == 200
                waiting = [
                    asyncio.create_task(http.post("/v1/completions", json=body(2), headers=h))
                    for h in (A, B)
                ]
                await wait_for(lambda: d.core.total_queued() == 2)
                lines = r.aiter_lines()
                for _ in range(20):  # a's counter climbs while it streams
                    await anext(lines)
                s = await scrape(http)
                pool = d.core.pool(MODEL)
                gap = value(s, "vtc_backlogged_counter_gap")
                assert gap > 0
                assert gap == pytest.approx(abs(pool.counter("a") - pool.counter("b")), rel=0.2)
                assert value(s, "vtc_fairness_backlogged_tenants") == 2
                assert 0.5 <= value(s, "vtc_fairness_jain_index") <= 1.0
                await r.aclose()
            for t in waiting:
                assert (await t).status_code == 200
            s = await scrape(http)
        assert value(s, "vtc_backlogged_counter_gap") == 0


def test_jain_index_bounds() -> None:
    assert jain_index([]) == 1.0
    assert jain_index([5.0]) == 1.0
    assert jain_index([0.0, 0.0]) == 1.0
    assert jain_index([3.0, 3.0, 3.0]) == pytest.approx(1.0)
    assert jain_index([1.0, 0.0, 0.0, 0.0]) == pytest.approx(0.25)
    assert jain_index([1.0, 3.0]) == pytest.approx(16 / 20)


def test_fairness_window_slides_and_covers_only_continuously_backlogged_tenants() -> None:
    w = FairnessWindow(window_s=10.0, min_gap_s=1.0)
    assert w.observe(0.0, {"a": 0, "b": 0}, {"a", "b"}) == (1.0, 2)
    # a served twice as much as b over the first 5 s
    idx, n = w.observe(5.0, {"a": 200, "b": 100}, {"a", "b"})
    assert n == 2 and idx == pytest.approx(jain_index([200, 100]))
    # 20 s later the early imbalance has left the window: equal service since t=10..
    w.observe(10.0, {"a": 400, "b": 300}, {"a", "b"})
    w.observe(15.0, {"a": 500, "b": 400}, {"a", "b"})
    idx, n = w.observe(20.0, {"a": 600, "b": 500}, {"a", "b"})
    assert n == 2 and idx == pytest.approx(1.0)
    # c was not backlogged throughout: not owed anything, not counted
    idx, n = w.observe(21.0, {"a": 620, "b": 520, "c": 0}, {"a", "b", "c"})
    assert n == 2
    # a scrape storm stores no extra samples
    for i in range(100):
        w.observe(21.0 + i / 1000, {"a": 620, "b": 520}, {"a", "b"})
    assert len(w._samples) <= 12
