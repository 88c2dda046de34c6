"""A bounded, seeded HTTP fuzz run: every answer is a well-formed 2xx/4xx; nothing leaks."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import httpx

from .conftest import MODEL, gateway_stack, wait_for

VALID_CHAT: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "hi there"}],
    "max_tokens": 6,
}
VALID_COMPLETION: dict[str, Any] = {"model": MODEL, "prompt": "once upon", "max_tokens": 6}
ODD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    2**63,
    1.5,
    "",
    "x" * 50,
    [],
    {},
    [1, "a"],
    {"a": [None]},
    "\udcff",
]
AUTH = ["Bearer key-a", "Bearer key-b", "bearer key-a", "Bearer", "Basic abc", "Bearer nope", ""]


def _mutate(rng: random.Random) -> tuple[str, bytes, dict[str, str]]:
    chat = rng.random() < 0.5
    body = json.loads(json.dumps(VALID_CHAT if chat else VALID_COMPLETION))
    for _ in range(rng.randint(0, 3)):
        action = rng.random()
        keys = [
            *body,
            "stream",
            "stream_options",
            "n",
            "max_completion_tokens",
            "ignore_eos",
            "top_k",
            "best_of",
        ]
        key = rng.choice(keys)
        if action < 0.3:
            body.pop(key, None)
        elif action < 0.8:
            body[key] = rng.choice(ODD_VALUES)
        else:
            body[key] = {
                "stream": True,
                "stream_options": {"include_usage": True},
                "max_tokens": rng.randint(1, 8),
                "n": 1,
            }.get(key, 1)
    raw = json.dumps(body).encode("utf-8", "surrogatepass")
    roll = rng.random()
    if roll < 0.05:
        raw = raw[: rng.randint(0, len(raw))]
    elif roll < 0.08:
        raw = b"\xff\xfe" + raw
    headers = {"Content-Type": "application/json"}
    auth = rng.choice(AUTH)
    if auth:
        headers["Authorization"] = auth
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw, headers


def _check(resp: httpx.Response) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text)
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == resp.status_code
    elif resp.headers["content-type"].startswith("text/event-stream"):
        assert resp.text.endswith("data: [DONE]\n\n")
    else:
        assert resp.json()["choices"]


async def test_fuzzed_requests_get_well_formed_answers_and_leave_nothing_behind() -> None:
    rng = random.Random(20261125)
    cases = [_mutate(rng) for _ in range(160)]
    async with gateway_stack(sim={"speed": 0}, backend={"max_num_seqs": 4}) as stack:
        async with httpx.AsyncClient(base_url=stack.url, timeout=30) as http:
            statuses: dict[int, int] = {}
            for i in range(0, len(cases), 16):
                batch = cases[i : i + 16]
                results = await asyncio.gather(
                    *(http.post(path, content=raw, headers=h) for path, raw, h in batch)
                )
                for resp in results:
                    _check(resp)
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
        assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 10, statuses
        assert statuses.get(401, 0) >= 10, statuses
        await wait_for(lambda: stack.state.admission.in_flight() == 0)
        assert stack.state.dispatcher.core.total_queued() == 0
        assert stack.sims[0].core.num_running == 0
