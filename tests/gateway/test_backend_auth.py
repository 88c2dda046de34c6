"""A backend behind its own API key (vLLM --api-key), and backend error bodies of other shapes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import parse_config
from gateway.server import create_app

KEY = "backend-secret"


def _fake_backend() -> web.Application:
    """Just enough of an OpenAI server: checks the key, streams two tokens, or answers
    vLLM's older flat error shape for prompt "old-error"."""

    def authorized(request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {KEY}"

    async def models(request: web.Request) -> web.Response:  # open: the test targets requests
        return web.json_response({"data": [{"id": "m", "max_model_len": 1000}]})

    async def completions(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return web.json_response({"error": "Unauthorized"}, status=401)
        body = await request.json()
        if body["prompt"] == "old-error":
            return web.json_response(
                {
                    "object": "error",
                    "message": "bad prompt",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                },
                status=400,
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in (1, 2):
            chunk = {
                "id": "c",
                "object": "text_completion",
                "created": 0,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "text": "x",
                        "logprobs": None,
                        "finish_reason": None,
                        "stop_reason": None,
                    }
                ],
                "usage": {"prompt_tokens": 1, "total_tokens": 1 + n, "completion_tokens": n},
            }
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def empty(request: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", empty)
    app.router.add_get("/metrics", empty)
    return app


@asynccontextmanager
async def _stack(api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    backend = TestServer(_fake_backend())
    await backend.start_server()
    raw: dict[str, Any] = {
        "backends": [
            {
                "name": "b",
                "url": str(backend.make_url("")).rstrip("/"),
                "api_key": api_key,
                "max_kv_tokens": 100_000,
            }
        ],
        "tenants": [{"name": "a", "api_keys": ["key-a"]}],
        "limits": {"health_interval_s": 60},
    }
    gateway = TestServer(create_app(parse_config(raw)))
    await gateway.start_server()
    try:
        async with httpx.AsyncClient(
            base_url=str(gateway.make_url("")).rstrip("/"),
            headers={"Authorization": "Bearer key-a"},
        ) as http:
            yield http
    finally:
        await gateway.close()
        await backend.close()


async def test_backend_api_key_is_sent_and_never_shown() -> None:
    async with _stack(KEY) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "xx"
        metrics = (await http.get("/metrics")).text
        assert KEY not in metrics


async def test_a_backend_refusing_the_gateways_key_is_a_502_not_the_backends_401() -> None:
    async with _stack("wrong") as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 502
        assert r.json()["error"]["code"] == r.status_code
        assert "Unauthorized" not in r.text


async def test_backend_errors_of_the_older_flat_shape_reach_clients_in_openai_shape() -> None:
    async with _stack(KEY) as http:
        r = await http.post(
            "/v1/completions", json={"model": "m", "prompt": "old-error", "max_tokens": 2}
        )
        assert r.status_code == 400
        assert r.json() == {
            "error": {
                "message": "bad prompt",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        }
