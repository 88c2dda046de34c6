"""Through the gateway to the simulated backend with the official openai client."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from .conftest import MODEL, gateway_stack, tenants, wait_for


def _client(url: str, key: str = "key-a") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


async def test_chat_stream_and_non_stream_with_usage() -> None:
    async with gateway_stack() as stack:
        client = _client(stack.url)
        try:
            messages = [{"role": "user", "content": "Say something."}]
            resp = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=12,
                extra_body={"ignore_eos": True},
            )
            assert resp.object == "chat.completion"
            assert resp.usage is not None and resp.usage.completion_tokens == 12
            text = resp.choices[0].message.content
            assert text and resp.choices[0].finish_reason == "length"

            stream = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.role == "assistant"
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
            assert all(c.usage is None for c in chunks[:-1])
            assert chunks[-1].choices == [] and chunks[-1].usage is not None
            assert chunks[-1].usage.completion_tokens == 12
            assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens
        finally:
            await client.close()
        pool = stack.state.dispatcher.core.pool(MODEL)
        # 2 requests x (prompt + 2 * 12) at weight 1, reconciled with the backend's usage
        assert pool.counter("a") == pytest.approx(2 * (resp.usage.prompt_tokens + 24))
        assert stack.state.admission.in_flight() == 0


async def test_completions_stream_plain_and_continuous_usage() -> None:
    async with gateway_stack() as stack:
        client = _client(stack.url, "key-b")
        try:
            resp = await client.completions.create(
                model=MODEL,
                prompt="Once upon a time",
                max_tokens=8,
                extra_body={"ignore_eos": True},
            )
            assert resp.object == "text_completion" and resp.usage is not None
            assert resp.usage.completion_tokens == 8
            stream = await client.completions.create(
                model=MODEL,
                prompt=[1, 2, 3, 4],
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True},
                extra_body={"ignore_eos": True},
            )
            chunks = [c async for c in stream]
            assert all(c.usage is not None for c in chunks)
            assert chunks[-1].usage.prompt_tokens == 4
            assert chunks[-1].usage.completion_tokens == 8
        finally:
            await client.close()


async def test_models_health_and_metrics() -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
        models = (await http.get("/v1/models", headers={"Authorization": "Bearer key-a"})).json()
        assert [m["id"] for m in models["data"]] == [MODEL]
        assert models["data"][0]["max_model_len"] > 0
        assert (await http.get("/v1/models")).status_code == 401
        health = (await http.get("/health")).json()
        assert health["status"] == "ok" and health["backends"][0]["up"] is True
        metrics = (await http.get("/metrics")).text
        assert 'vtc_backend_up{backend="sim"} 1.0' in metrics
        assert "vtc_tenant_weight" in metrics
        assert "key-a" not in metrics


def _err(resp: httpx.Response, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status
    return body["error"]  # type: ignore[no-any-return]


async def test_error_paths_401_400_404_413() -> None:
    async with gateway_stack(gateway={"limits": {"max_body_bytes": 4096}}) as stack:
        async with httpx.AsyncClient(base_url=stack.url) as http:
            ok_auth = {"Authorization": "Bearer key-a"}
            chat = "/v1/chat/completions"
            msgs = [{"role": "user", "content": "hi"}]
            _err(await http.post(chat, json={"model": MODEL, "messages": msgs}), 401)
            _err(
                await http.post(
                    chat,
                    json={"model": MODEL, "messages": msgs},
                    headers={"Authorization": "Bearer nope"},
                ),
                401,
            )
            _err(await http.post(chat, content=b"{not json", headers=ok_auth), 400)
            _err(await http.post(chat, content=b"[1, 2]", headers=ok_auth), 400)
            _err(await http.post(chat, content=b"\xff\xfe", headers=ok_auth), 400)
            e = _err(
                await http.post(chat, json={"model": "nope", "messages": msgs}, headers=ok_auth),
                404,
            )
            assert e["param"] == "model"
            e = _err(
                await http.post(
                    chat, json={"model": MODEL, "messages": msgs, "max_tokens": 0}, headers=ok_auth
                ),
                400,
            )
            assert e["param"] == "max_tokens"
            _err(
                await http.post(
                    chat, json={"model": MODEL, "messages": msgs, "n": 0}, headers=ok_auth
                ),
                400,
            )
            _err(
                await http.post(chat, json={"model": MODEL, "messages": "hi"}, headers=ok_auth), 400
            )
            e = _err(
                await http.post(
                    chat,
                    json={"model": MODEL, "messages": msgs, "max_tokens": 10**7},
                    headers=ok_auth,
                ),
                400,
            )
            assert "cannot be greater than max_model_len" in str(e["message"])
            assert e["param"] == "max_tokens" and e["type"] == "BadRequestError"
            _err(await http.post(chat, content=b"x" * 5000, headers=ok_auth), 413)
        assert stack.state.dispatcher.core.total_queued() == 0
        assert stack.state.admission.in_flight() == 0
        pool = stack.state.dispatcher.core.pool(MODEL)
        assert pool.counter("a") == 0  # nothing was charged for rejected requests


async def test_request_that_can_never_fit_the_kv_budget_is_400() -> None:
    async with (
        gateway_stack(backend={"max_kv_tokens": 100}) as stack,
        httpx.AsyncClient(base_url=stack.url) as http,
    ):
        e = _err(
            await http.post(
                "/v1/completions",
                headers={"Authorization": "Bearer key-a"},
                json={"model": MODEL, "prompt": "hello", "max_tokens": 200},
            ),
            400,
        )
        assert "KV tokens" in str(e["message"])


async def test_queue_full_is_429_with_retry_after_and_timeout_is_503() -> None:
    gw = {
        "tenants": tenants(("a", 1), ("b", 1), max_queued=1),
        "limits": {"queue_timeout_s": 0.5, "health_interval_s": 60},
    }
    async with gateway_stack(gateway=gw, backend={"max_num_seqs": 1}, sim={"speed": 1.0}) as st:
        async with httpx.AsyncClient(base_url=st.url, timeout=30) as http:
            body = {
                "model": MODEL,
                "prompt": "x",
                "max_tokens": 2000,
                "ignore_eos": True,
                "stream": True,
            }
            hdr = {"Authorization": "Bearer key-a"}
            async with http.stream("POST", "/v1/completions", json=body, headers=hdr) as running:
                assert running.status_code == 200
                queued = asyncio.create_task(http.post("/v1/completions", json=body, headers=hdr))
                await wait_for(lambda: st.state.dispatcher.core.total_queued() == 1)
                full = await http.post("/v1/completions", json=body, headers=hdr)
                e = _err(full, 429)
                assert int(full.headers["Retry-After"]) >= 1
                assert "queued" in str(e["message"])
                timed_out = await queued
                e = _err(timed_out, 503)
                assert "waited" in str(e["message"])
        await wait_for(lambda: st.state.admission.in_flight() == 0)
        assert st.state.dispatcher.core.total_queued() == 0


async def test_unknown_fields_pass_through_to_backend() -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
        resp = await http.post(
            "/v1/completions",
            headers={"Authorization": "Bearer key-a"},
            json={
                "model": MODEL,
                "prompt": "a b c",
                "max_tokens": 5,
                "ignore_eos": True,
                "top_k": 3,
                "min_tokens": 5,
                "some_vendor_extra": {"x": 1},
            },
        )
        assert resp.status_code == 200, resp.text
        assert json.loads(resp.text)["usage"]["completion_tokens"] == 5


async def test_backend_tokenizer_counts_with_the_backends_tokenize_route() -> None:
    async with gateway_stack(gateway={"tokenizer": "backend"}) as stack:
        seen: list[int] = []
        stack.state.dispatcher.on_dispatch = lambda job: seen.append(job.prompt_tokens)
        async with httpx.AsyncClient(base_url=stack.url) as http:
            msgs = [{"role": "user", "content": "count me please"}]
            tok = (
                await http.post(
                    stack.sims[0].url + "/tokenize", json={"model": MODEL, "messages": msgs}
                )
            ).json()["count"]
            r = await http.post(
                "/v1/chat/completions",
                headers={"Authorization": "Bearer key-a"},
                json={"model": MODEL, "messages": msgs, "max_tokens": 3},
            )
            assert r.status_code == 200
        assert seen == [tok]


async def test_oversized_headers_are_refused_without_a_500() -> None:
    async with gateway_stack() as stack, httpx.AsyncClient(base_url=stack.url) as http:
        r = await http.post(
            "/v1/completions",
            json={"model": MODEL, "prompt": "x"},
            headers={"Authorization": "Bearer key-a", "X-Big": "a" * 20_000},
        )
        assert 400 <= r.status_code < 500
        assert stack.state.dispatcher.core.total_queued() == 0


async def test_requests_spread_over_backends_least_loaded_first() -> None:
    async with gateway_stack(
        backend={"max_num_seqs": 2}, more_backends=[({}, {"max_num_seqs": 2})], sim={"speed": 1}
    ) as stack:
        body = {
            "model": MODEL,
            "prompt": "x",
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        hdr = {"Authorization": "Bearer key-a"}
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            streams = [
                http.stream("POST", "/v1/completions", json=body, headers=hdr) for _ in range(4)
            ]
            opened = [await s.__aenter__() for s in streams]
            try:
                assert all(r.status_code == 200 for r in opened)
                slots = stack.state.pool.states
                assert slots["sim"].slots.in_flight == 2 and slots["sim1"].slots.in_flight == 2
                await wait_for(lambda: [s.core.num_running for s in stack.sims] == [2, 2])
            finally:
                for s in streams:
                    await s.__aexit__(None, None, None)
        await wait_for(lambda: stack.state.admission.in_flight() == 0)


def _strip_ids(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_ids(v) for k, v in obj.items() if k not in ("id", "created")}
    if isinstance(obj, list):
        return [_strip_ids(v) for v in obj]
    return obj


def _events(text: str) -> list[Any]:
    return [
        e if e == "[DONE]" else json.loads(e)
        for e in (x.removeprefix("data: ") for x in text.split("\n\n") if x)
    ]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize(
    "stream_options",
    [None, {}, {"include_usage": True}, {"include_usage": True, "continuous_usage_stats": True}],
)
async def test_client_gets_the_backends_bytes_apart_from_ids(
    chat: bool, stream_options: dict[str, Any] | None
) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 6, "seed": 3}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    if stream_options is not None:
        body["stream"] = True
        if stream_options:
            body["stream_options"] = stream_options
    async with gateway_stack(sim={"speed": 0}) as stack, httpx.AsyncClient() as http:
        direct = await http.post(stack.sims[0].url + path, json=body)
        via = await http.post(
            stack.url + path, json=body, headers={"Authorization": "Bearer key-a"}
        )
    assert via.status_code == direct.status_code == 200
    if stream_options is None:
        assert _strip_ids(via.json()) == _strip_ids(direct.json())
        assert list(via.json()) == list(direct.json())  # same field order
    else:
        assert _strip_ids(_events(via.text)) == _strip_ids(_events(direct.text))


async def test_adaptive_admission_moves_the_queue_from_the_backend_to_the_gateway() -> None:
    gw = {"limits": {"health_interval_s": 0.2}}
    async with gateway_stack(
        gateway=gw,
        backend={"max_num_seqs": 8, "adaptive": True},
        sim={"speed": 1, "max_num_seqs": 2},  # the backend really runs 2 at a time
    ) as stack:
        slots = stack.state.pool.states["sim"].slots
        sim = stack.sims[0].core
        body = {"model": MODEL, "prompt": "x", "max_tokens": 120, "ignore_eos": True}
        hdr = {"Authorization": "Bearer key-a"}
        async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
            calls = [
                asyncio.create_task(http.post("/v1/completions", json=body, headers=hdr))
                for _ in range(12)
            ]
            await wait_for(lambda: slots.seq_cap is not None and slots.seq_cap <= 2, limit_s=30)
            # the backend's FCFS queue drains; the rest wait in the gateway's fair queue
            await wait_for(
                lambda: sim.num_waiting == 0 and stack.state.dispatcher.core.total_queued() > 0,
                limit_s=30,
            )
            results = await asyncio.gather(*calls)
            assert all(r.status_code == 200 for r in results)
            await wait_for(lambda: stack.state.admission.in_flight() == 0)
            metrics = (await http.get("/metrics")).text
        assert 'vtc_backend_seq_cap{backend="sim"}' in metrics
