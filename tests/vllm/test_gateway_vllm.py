"""The gateway in front of real vLLM: what a client sees is what vLLM alone would answer, and the
gateway's books match vLLM's own counts."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from .conftest import (
    BLOCK,
    CONTEXT,
    MAX_NUM_SEQS,
    MODEL,
    VllmServer,
    gateway_for,
    wait_until,
)

A = {"Authorization": "Bearer key-a"}
MESSAGES = [{"role": "user", "content": "tell me a story about the fair share gateway"}]


def ids(n: int, start: int = 10) -> list[int]:
    """A prompt of exactly ``n`` token ids (distinct per ``start``: no shared prefix)."""
    return [(start + i) % 1900 + 10 for i in range(n)]


def shape(value: Any) -> Any:
    """The keys of a JSON value, recursively (values dropped): compares body layouts."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return None


async def test_discovery(vllm: VllmServer) -> None:
    async with gateway_for(vllm.url) as gw, httpx.AsyncClient(base_url=gw.url) as http:
        health = (await http.get("/health")).json()
        (b,) = health["backends"]
        assert b["up"] and b["models"] == [MODEL]
        assert b["max_kv_tokens"] == (vllm.kv_blocks - 1) * BLOCK  # less vLLM's null block
        assert b["max_num_seqs"] == MAX_NUM_SEQS
        models = (await http.get("/v1/models", headers=A)).json()["data"]
        assert [(m["id"], m["max_model_len"]) for m in models] == [(MODEL, CONTEXT)]


async def test_openai_client_streaming_and_not_usage_reconciled(vllm: VllmServer) -> None:
    before = vllm.metrics()
    async with (
        gateway_for(vllm.url) as gw,
        AsyncOpenAI(base_url=gw.url + "/v1", api_key="key-a", max_retries=0) as client,
    ):
        prompt_total = completion_total = 0
        chat = await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=12, extra_body={"ignore_eos": True}
        )
        assert chat.usage is not None and chat.usage.completion_tokens == 12
        assert chat.choices[0].message.content
        prompt_total += chat.usage.prompt_tokens
        completion_total += chat.usage.completion_tokens
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [c async for c in stream]
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 9
        assert chunks[0].choices[0].delta.role == "assistant"
        prompt_total += usage.prompt_tokens
        completion_total += usage.completion_tokens
        comp = await client.completions.create(
            model=MODEL, prompt=ids(40), max_tokens=7, extra_body={"ignore_eos": True}
        )
        assert comp.usage is not None and comp.usage.prompt_tokens == 40
        assert comp.usage.completion_tokens == 7
        prompt_total += 40
        completion_total += 7
        # a stream that did not ask for usage gets none; vLLM may put several tokens in one
        # chunk or split a token's text over two, so what is compared is the text: greedy,
        # the same as the answer in one piece
        greedy: dict[str, Any] = {"ignore_eos": True, "temperature": 0.0}
        cstream = await client.completions.create(
            model=MODEL, prompt="hello world", max_tokens=5, stream=True, extra_body=greedy
        )
        cchunks = [c async for c in cstream]
        assert all(c.usage is None for c in cchunks)
        choices = [c.choices[0] for c in cchunks if c.choices]
        assert choices[-1].finish_reason == "length"
        whole = await client.completions.create(
            model=MODEL, prompt="hello world", max_tokens=5, extra_body=greedy
        )
        assert whole.usage is not None and whole.usage.completion_tokens == 5
        assert "".join(c.text for c in choices) == whole.choices[0].text
        prompt_total += 2 * whole.usage.prompt_tokens  # the stream's prompt is the same
        completion_total += 2 * 5  # the stream's by ignore_eos (vLLM's count checked below)
        # the gateway's charge equals vLLM's own counts: w_in * prompt + w_out * completion
        assert gw.state.stats.prompt_tokens["a"] == prompt_total
        assert gw.state.stats.completion_tokens["a"] == completion_total
        assert gw.counter("a") == pytest.approx(
            gw.state.stats.prompt_tokens["a"] + 2 * completion_total
        )
    after = vllm.metrics()
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == (
        completion_total
    )
    assert (
        after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"]
        == (gw.state.stats.prompt_tokens["a"])
    )


@pytest.mark.parametrize("chat", [True, False])
async def test_non_streaming_body_has_vllms_fields(vllm: VllmServer, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "max_tokens": 4, "return_token_ids": True}
    body.update({"messages": MESSAGES} if chat else {"prompt": ids(12)})
    async with gateway_for(vllm.url) as gw, httpx.AsyncClient(timeout=60) as http:
        direct = (await http.post(vllm.url + path, json=body)).json()
        via = (await http.post(gw.url + path, json=body, headers=A)).json()
    assert shape(via) == shape(direct)
    assert list(via) == list(direct)
    assert via["system_fingerprint"] == direct["system_fingerprint"]
    assert via["usage"] == direct["usage"]
    got = via["choices"][0]
    assert len(got["token_ids"]) == via["usage"]["completion_tokens"]
    prompt_ids = via["prompt_token_ids"] if chat else got["prompt_token_ids"]
    want = direct["prompt_token_ids"] if chat else direct["choices"][0]["prompt_token_ids"]
    assert prompt_ids == want


async def test_context_rule_and_errors_as_vllm(vllm: VllmServer) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        # prompt + max_tokens over the context: served with what fits (2048 - 2000 = 48)
        ("/v1/completions", {"prompt": ids(2000), "max_tokens": 100, "ignore_eos": True}),
        ("/v1/completions", {"prompt": ids(5), "max_tokens": CONTEXT + 1}),
        ("/v1/chat/completions", {"messages": MESSAGES, "max_completion_tokens": CONTEXT + 1}),
        ("/v1/completions", {"prompt": ids(CONTEXT + 1), "max_tokens": 1}),
        ("/v1/completions", {"prompt": ids(CONTEXT), "max_tokens": 1}),
        ("/v1/completions", {"prompt": "x", "n": 0}),
        ("/v1/completions", {"prompt": [5000], "max_tokens": 1}),  # vLLM's own check
    ]
    async with gateway_for(vllm.url) as gw, httpx.AsyncClient(timeout=60) as http:
        for path, extra in cases:
            body = {"model": MODEL, **extra}
            direct = await http.post(vllm.url + path, json=body)
            via = await http.post(gw.url + path, json=body, headers=A)
            assert via.status_code == direct.status_code, (extra, via.text, direct.text)
            if direct.status_code == 200:
                assert via.json()["usage"] == direct.json()["usage"]
                assert via.json()["usage"]["completion_tokens"] == CONTEXT - 2000
            else:
                assert via.json() == direct.json()
        # refused by vLLM only once streaming: the same error event, nothing charged
        body = {"model": MODEL, "prompt": [5000], "max_tokens": 1, "stream": True}
        direct = await http.post(vllm.url + "/v1/completions", json=body)
        via = await http.post(gw.url + "/v1/completions", json=body, headers=A)
        assert via.status_code == direct.status_code == 200
        assert via.text == direct.text and '"code": 400' in via.text
        body = {"model": "nope", "prompt": "x"}
        direct = await http.post(vllm.url + "/v1/completions", json=body)
        via = await http.post(gw.url + "/v1/completions", json=body, headers=A)
        assert via.status_code == direct.status_code == 404
        assert via.json() == direct.json()
        assert gw.state.admission.in_flight() == 0
    # only the request that ran was charged: 2000 prompt + 2 * 48 output
    assert gw.counter("a") == pytest.approx(2000 + 2 * 48)


@pytest.mark.parametrize("stream", [False, True])
async def test_n_sequences_reserved_and_charged(vllm: VllmServer, stream: bool) -> None:
    async with (
        gateway_for(vllm.url) as gw,
        AsyncOpenAI(base_url=gw.url + "/v1", api_key="key-a", max_retries=0) as client,
    ):
        if stream:
            s = await client.completions.create(
                model=MODEL,
                prompt=ids(30),
                max_tokens=6,
                n=3,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            chunks = [c async for c in s]
            usage = chunks[-1].usage
            assert {c.choices[0].index for c in chunks if c.choices} == {0, 1, 2}
        else:
            r = await client.completions.create(
                model=MODEL, prompt=ids(30), max_tokens=6, n=3, extra_body={"ignore_eos": True}
            )
            usage = r.usage
            assert [c.index for c in r.choices] == [0, 1, 2]
        assert usage is not None and usage.completion_tokens == 18 and usage.prompt_tokens == 30
        assert gw.counter("a") == pytest.approx(30 + 2 * 18)
        assert gw.state.admission.in_flight() == 0


async def _stream_then_drop(
    http: httpx.AsyncClient, url: str, body: dict[str, Any], chunks: int
) -> None:
    async with http.stream("POST", url, json=body, headers=A) as r:
        assert r.status_code == 200
        n = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                n += 1
                if n >= chunks:
                    break  # leaving the block closes the connection (the body is unread)


async def _idle_metrics(vllm: VllmServer) -> dict[str, float]:
    """vLLM's counters once it runs nothing (each sample read off the event loop, which the
    in-process gateway shares)."""
    deadline = time.monotonic() + 30
    while True:
        m = await asyncio.to_thread(vllm.metrics)
        busy = m["vllm:num_requests_running"] + m["vllm:num_requests_waiting"]
        if busy == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"vLLM still has {busy:g} request(s) after 30 s")
        await asyncio.sleep(0.05)


async def test_disconnect_aborts_upstream_in_every_phase_without_tracebacks(
    vllm: VllmServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that goes away ends its request inside vLLM: mid-stream (several times: a
    write can meet the closing connection) vLLM aborts it; queued in the gateway, it never
    reaches vLLM.

    Asserted on vLLM's counters, not on time: a dropped request asks for the whole context,
    so it can end only by an abort unless it ran to its end, which
    ``vllm:request_success_total`` counts (aborts are not counted there). The tokens vLLM
    makes before an abort lands depend on how fast this process is scheduled, not on the
    gateway. The queued request's prompt has a length of its own: vLLM's prompt tokens tell
    whether it got there."""
    caplog.set_level(logging.ERROR)
    prompt = 20
    body = {
        "model": MODEL,
        "max_tokens": CONTEXT - prompt,
        "ignore_eos": True,
        "stream": True,
    }
    # one client throughout (creating one per request builds a TLS context on the event loop
    # the gateway shares, which delays the gateway's view of the disconnect)
    async with (
        gateway_for(vllm.url, backend={"max_num_seqs": 1}) as gw,
        httpx.AsyncClient(timeout=60) as http,
    ):
        path = gw.url + "/v1/completions"
        before = await _idle_metrics(vllm)
        for i in range(6):
            await _stream_then_drop(http, path, {**body, "prompt": ids(prompt, 100 * i)}, 1 + i)
        # queued in the gateway behind a running request: vLLM never sees it
        async with http.stream(
            "POST", path, json={**body, "prompt": ids(prompt, 700)}, headers=A
        ) as r:
            lines = r.aiter_lines()  # kept: closing the iterator would close the stream
            await anext(lines)
            queued = asyncio.create_task(
                http.post(
                    path,
                    json={**body, "prompt": ids(prompt + 11, 900), "stream": False},
                    headers=A,
                )
            )
            await wait_until(lambda: gw.state.dispatcher.core.total_queued() == 1, 30, "queued")
            queued.cancel()
            await asyncio.gather(queued, return_exceptions=True)
            await wait_until(lambda: gw.state.dispatcher.core.total_queued() == 0, 30, "dequeued")
        await wait_until(lambda: gw.state.admission.in_flight() == 0, 30, "gateway slots free")
        after = await _idle_metrics(vllm)
        assert gw.state.stats.prompt_tokens["a"] == 7 * prompt  # the queued one did not run
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    # every one of the 7 requests vLLM got was aborted: none ran to its end
    ended = after["vllm:request_success_total"] - before["vllm:request_success_total"]
    assert ended == 0, f"{ended:g} of 7 dropped requests ran to their end ({generated:g} tokens)"
    # vLLM got exactly those 7 (their prompts), not the one that was queued
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == 7 * prompt


async def _burst(url: str, headers: dict[str, str], n: int, prompt: int, out: int) -> list[int]:
    async with httpx.AsyncClient(timeout=300) as http:

        async def one(i: int) -> int:
            r = await http.post(
                url + "/v1/completions",
                json={
                    "model": MODEL,
                    "prompt": ids(prompt, 200 * i + 7),
                    "max_tokens": out,
                    "ignore_eos": True,
                },
                headers=headers,
            )
            assert r.status_code == 200, r.text
            return int(r.json()["usage"]["completion_tokens"])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_kv_admission_prevents_preemptions(vllm: VllmServer) -> None:
    # 8 requests of 100 + 300 tokens: 3,200 > 2,528 (or 3,040 after the restart test) KV
    # tokens once they have grown. vLLM alone preempts (recompute) when they start together:
    # one request of 8 prompts (8 separate requests may reach it far enough apart on a busy
    # machine that the first ones end before the last ones have grown: no preemption)
    pre = vllm.metrics()["vllm:num_preemptions_total"]
    async with httpx.AsyncClient(timeout=300) as http:
        r = await http.post(
            vllm.url + "/v1/completions",
            json={
                "model": MODEL,
                "prompt": [ids(100, 200 * i + 7) for i in range(8)],
                "max_tokens": 300,
                "ignore_eos": True,
            },
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["choices"]) == 8 and r.json()["usage"]["completion_tokens"] == 8 * 300
    assert vllm.metrics()["vllm:num_preemptions_total"] - pre > 0
    for mode in ("reserve", "predict"):  # strict, and planned from the lengths it learns
        async with gateway_for(vllm.url, backend={"kv_admission": mode}) as gw:
            pre = vllm.metrics()["vllm:num_preemptions_total"]
            assert await _burst(gw.url, A, 8, 100, 300) == [300] * 8
            assert vllm.metrics()["vllm:num_preemptions_total"] - pre == 0, mode
            assert gw.state.admission.in_flight() == 0


async def test_adaptive_admission_follows_vllms_queue(vllm: VllmServer) -> None:
    # the gateway believes in 16 slots; vLLM runs 8 and queues the rest: the cap comes down
    async with gateway_for(
        vllm.url,
        backend={"max_num_seqs": 16, "adaptive": True},
        limits={"health_interval_s": 0.2, "feedback_interval_s": 0.2},
    ) as gw:
        slots = gw.state.pool.states["vllm"].slots
        task = asyncio.create_task(_burst(gw.url, A, 16, 20, 120))
        await wait_until(lambda: slots.seq_cap is not None and slots.seq_cap <= 8, 60, "cap")
        assert await task == [120] * 16


async def test_backend_restart_with_another_kv_size_is_rediscovered(vllm: VllmServer) -> None:
    """The session's vLLM is restarted on its port with a larger KV cache (one start instead
    of two; the other tests read its size from ``vllm.kv_blocks``)."""
    async with gateway_for(vllm.url, limits={"health_interval_s": 0.2}) as gw:
        slots = gw.state.pool.states["vllm"].slots
        assert slots.max_kv_tokens == (vllm.kv_blocks - 1) * BLOCK
        vllm.stop()
        await wait_until(lambda: not slots.healthy, 30, "marked down")
        vllm.kv_blocks += 16
        vllm.start()
        await asyncio.to_thread(vllm.wait_ready)
        want = (vllm.kv_blocks - 1) * BLOCK
        await wait_until(lambda: slots.max_kv_tokens == want, 30, "rediscovered")
        assert slots.healthy
        async with httpx.AsyncClient(timeout=60) as http:
            r = await http.post(
                gw.url + "/v1/completions",
                json={"model": MODEL, "prompt": "hi", "max_tokens": 3},
                headers=A,
            )
            assert r.status_code == 200
