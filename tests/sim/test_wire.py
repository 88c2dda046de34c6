"""Wire faithfulness with the official openai client and raw HTTP: shapes, usage, errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI

from backends.sim.server import SimServer
from common.tokenizer import TokenCounter

from .conftest import parse_sse

MODEL = "sim-llama-3-8b"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about continuous batching in vLLM."},
]


@pytest.fixture
async def client(srv: SimServer) -> AsyncIterator[AsyncOpenAI]:
    c = AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=10.0)
    yield c
    await c.close()


async def test_chat_non_stream(client: AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=12, extra_body={"ignore_eos": True}
    )
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 12
    assert resp.usage.prompt_tokens == TokenCounter().count_chat(MESSAGES)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12
    assert len(choice.message.content or "") > 0


async def test_chat_stream_role_first_usage_last(client: AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_completion_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    content = [c for c in chunks[1:] if c.choices]
    assert len(content) == 9  # one chunk per output token
    assert content[-1].choices[0].finish_reason == "length"
    final = chunks[-1]
    assert final.choices == [] and final.usage is not None
    assert final.usage.completion_tokens == len(content)
    assert final.usage.prompt_tokens == TokenCounter().count_chat(MESSAGES)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


async def test_completions_non_stream_and_stream(client: AsyncOpenAI) -> None:
    resp = await client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.usage is not None and resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens == TokenCounter().count_text("Once upon a time")
    stream = await client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = [c async for c in stream]
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) == 7
    assert "".join(c.choices[0].text for c in text_chunks) == resp.choices[0].text  # same seed
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


async def test_raw_sse_format_and_done(http: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True, "ignore_eos": True}
    resp = await http.post("/v1/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert events[-1] == "[DONE]"
    chunk = events[0]
    assert list(chunk) == ["id", "object", "created", "model", "choices", "usage"]
    assert chunk["usage"] is None
    assert list(chunk["choices"][0]) == [
        "index",
        "text",
        "logprobs",
        "finish_reason",
        "stop_reason",
    ]
    assert resp.text.startswith('data: {"id":"cmpl-')  # compact JSON like pydantic


async def test_continuous_usage_on_every_chunk(http: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 5,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    events = parse_sse((await http.post("/v1/chat/completions", json=body)).text)
    chunks = events[:-1]
    assert all("usage" in c for c in chunks)
    completions = [c["usage"]["completion_tokens"] for c in chunks]
    assert completions == [0, 1, 2, 3, 4, 5, 5]  # role chunk, 5 tokens, final usage chunk
    prompt = TokenCounter().count_chat(MESSAGES)
    assert all(c["usage"]["prompt_tokens"] == prompt for c in chunks)
    assert all(
        c["usage"]["total_tokens"] == prompt + c["usage"]["completion_tokens"] for c in chunks
    )


async def test_prompt_forms_and_content_parts(http: httpx.AsyncClient) -> None:
    counter = TokenCounter()
    for prompt, expected in (
        ("hello world", counter.count_text("hello world")),
        (["hello world"], counter.count_text("hello world")),
        ([1, 2, 3, 4, 5], 5),
        ([[7, 8, 9]], 3),
    ):
        r = await http.post(
            "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == expected
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}],
        }
    ]
    r = await http.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == counter.count_chat(parts)
    tok = await http.post("/tokenize", json={"model": MODEL, "messages": parts})
    assert tok.json()["count"] == counter.count_chat(parts)
    assert len(tok.json()["tokens"]) == tok.json()["count"]


async def test_determinism_seed_and_stop(http: httpx.AsyncClient) -> None:
    async def text(**extra: Any) -> dict[str, Any]:
        body = {"model": MODEL, "prompt": "abc", "max_tokens": 40, "ignore_eos": True, **extra}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        choice: dict[str, Any] = r.json()["choices"][0]
        return choice

    a, b = await text(seed=7), await text(seed=7)
    c = await text(seed=8)
    assert a["text"] == b["text"] != c["text"]
    stop_word = a["text"].split()[6]
    s = await text(seed=7, stop=[stop_word])
    assert s["finish_reason"] == "stop" and s["stop_reason"] == stop_word
    assert stop_word not in s["text"] and a["text"].startswith(s["text"])


async def test_output_length_without_ignore_eos_is_capped(http: httpx.AsyncClient) -> None:
    lengths = []
    for i in range(6):
        r = await http.post(
            "/v1/completions", json={"prompt": f"p{i}", "max_tokens": 64, "min_tokens": 2}
        )
        usage = r.json()["usage"]
        assert 2 <= usage["completion_tokens"] <= 64
        lengths.append(usage["completion_tokens"])
        reason = r.json()["choices"][0]["finish_reason"]
        assert reason == ("length" if usage["completion_tokens"] == 64 else "stop")


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404, "model"),
        ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        (
            "/v1/completions",
            {"prompt": "x", "stream_options": {"include_usage": True}},
            400,
            "stream_options",
        ),
        ("/v1/completions", {"prompt": "x", "max_tokens": 2049}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [1] * 2048, "max_tokens": 1}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": [1] * 2049, "max_tokens": 1}, 400, "input_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": 3}]}, 400, "messages[0].role"),
        ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
        ("/v1/completions", [1, 2], 400, None),
        ("/v1/completions", {"prompt": "x", "stop": 5}, 400, "stop"),
    ],
)
async def test_error_shapes(
    http: httpx.AsyncClient, path: str, body: Any, status: int, param: str | None
) -> None:
    r = await http.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and err["param"] == param and err["message"]
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")


async def test_invalid_json_and_unknown_route(http: httpx.AsyncClient) -> None:
    r = await http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = await http.get("/v1/nothing")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


async def test_openai_client_raises_typed_errors(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as info:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=5000)
    assert "cannot be greater than max_model_len=2048" in str(info.value)


async def test_models_health_version_tokenize(http: httpx.AsyncClient) -> None:
    models = (await http.get("/v1/models")).json()
    assert models["object"] == "list"
    card = models["data"][0]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "vllm"
    assert card["max_model_len"] == 2048 and card["root"] == MODEL and card["parent"] is None
    assert card["permission"][0]["object"] == "model_permission"
    health = await http.get("/health")
    assert health.status_code == 200 and health.content == b""
    assert "version" in (await http.get("/version")).json()
    tok = (await http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})).json()
    assert tok == {"count": 2, "max_model_len": 2048, "tokens": tok["tokens"], "token_strs": None}
    bad = await http.post("/tokenize", json={"model": "other", "prompt": "x"})
    assert bad.status_code == 404


async def test_metrics_names_and_cache_info(http: httpx.AsyncClient) -> None:
    await http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3})
    text = (await http.get("/metrics")).text
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:e2e_request_latency_seconds_count",
        "vllm:request_queue_time_seconds_sum",
    ):
        assert f'{name}{{engine="0"' in text, name
    assert 'model_name="sim-llama-3-8b"' in text
    line = next(ln for ln in text.splitlines() if ln.startswith("vllm:cache_config_info{"))
    assert 'block_size="16"' in line and 'num_gpu_blocks="28125"' in line
    gen = next(ln for ln in text.splitlines() if ln.startswith("vllm:generation_tokens_total"))
    assert float(gen.split()[-1]) >= 1


async def test_continuous_usage_needs_include_usage_as_in_vllm(http: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"continuous_usage_stats": True},
    }
    events = parse_sse((await http.post("/v1/chat/completions", json=body)).text)
    assert all("usage" not in e for e in events[:-1])
