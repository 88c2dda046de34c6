"""The chunk processor: charging from usage, client formats, non-stream assembly."""

from __future__ import annotations

import json
from typing import Any

from common.tokenizer import TokenCounter
from gateway.scheduler import Job
from gateway.server.relay import ChunkProcessor, client_format, upstream_body


def _chunk(content: str | None, completion: int, prompt: int = 7, **extra: Any) -> bytes:
    choices = (
        []
        if content is None
        else [
            {
                "index": 0,
                "delta": {"content": content},
                "logprobs": None,
                "finish_reason": extra.pop("finish", None),
            }
        ]
    )
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return json.dumps(obj).encode()


def _run(
    body: dict[str, Any], chunks: list[bytes]
) -> tuple[ChunkProcessor, list[int], list[bytes]]:
    charged: list[int] = []
    proc = ChunkProcessor(
        Job("t", 5, 10, 0.0), client_format(body, chat=True), charged.append, TokenCounter()
    )
    out = [o for o in (proc.feed(c) for c in chunks) if o is not None]
    return proc, charged, out


STREAM = [_chunk("", 0), _chunk("Hel", 1), _chunk("lo", 2, finish="stop"), _chunk(None, 2)]


def test_charges_each_usage_increment_and_learns_prompt_count() -> None:
    proc, charged, _ = _run({"stream": True}, STREAM)
    assert charged == [1, 1]
    assert proc.completion_tokens == 2
    assert proc.prompt_tokens == 7


def test_plain_stream_client_gets_no_usage() -> None:
    _, _, out = _run({"stream": True}, STREAM)
    assert len(out) == 3  # final usage-only chunk dropped
    for event in out:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        assert "usage" not in json.loads(event[6:])


def test_include_usage_keeps_only_the_final_usage_chunk() -> None:
    _, _, out = _run({"stream": True, "stream_options": {"include_usage": True}}, STREAM)
    objs = [json.loads(e[6:]) for e in out]
    assert len(objs) == 4
    assert all("usage" not in o for o in objs[:3])
    assert objs[3]["choices"] == [] and objs[3]["usage"]["completion_tokens"] == 2


def test_continuous_usage_passes_bytes_through() -> None:
    body = {
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    _, _, out = _run(body, STREAM)
    assert out == [b"data: " + c + b"\n\n" for c in STREAM]


def test_non_stream_is_assembled() -> None:
    proc, charged, out = _run({}, STREAM)
    assert out == [] and charged == [1, 1]
    body = proc.assembled("m")
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == "Hello"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 2


def test_without_usage_the_delta_text_is_counted() -> None:
    plain = [json.dumps({"choices": [{"index": 0, "delta": {"content": "hello world"}}]}).encode()]
    _, charged, _ = _run({"stream": True}, plain)
    assert charged == [2]


def test_upstream_body_forces_streaming_usage_and_keeps_unknown_fields() -> None:
    sent = json.loads(
        upstream_body(
            {"model": "m", "stream": False, "top_k": 5, "stream_options": {"include_usage": False}}
        )
    )
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert sent["top_k"] == 5


def test_backend_usage_reconciles_an_overestimate_downwards() -> None:
    role = json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    text = json.dumps({"choices": [{"index": 0, "delta": {"content": "hello wonderful world"}}]})
    final = json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    )
    proc, charged, _ = _run({"stream": True}, [role.encode(), text.encode(), final.encode()])
    assert charged == [3]  # the role chunk costs nothing; the text was estimated at 3
    assert proc.reported_completion == 2  # what the job is reconciled to when it ends
