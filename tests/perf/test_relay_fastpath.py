"""The relay's byte-level fast path behaves exactly like the full JSON path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from common.tokenizer import TokenCounter
from gateway.scheduler import Job
from gateway.server.relay import ChunkProcessor, client_format


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _usage(completion: int, details: bool = False) -> dict[str, Any]:
    u: dict[str, Any] = {"prompt_tokens": 9, "total_tokens": 9 + completion}
    u["completion_tokens"] = completion
    if details:
        u["prompt_tokens_details"] = None
    return u


def _chat(
    text: str | None, n: int, finish: str | None = None, fingerprint: str = "", **usage: Any
) -> bytes:
    choices = (
        []
        if text is None
        else [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}]
    )
    head = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    last = {"system_fingerprint": fingerprint} if fingerprint else {}
    return _compact({**head, "choices": choices, "usage": _usage(n, **usage), **last})


def _completion(text: str | None, n: int) -> bytes:
    choices = (
        []
        if text is None
        else [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]
    )
    head = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m"}
    return _compact({**head, "choices": choices, "usage": _usage(n, details=True)})


TRICKY = 'a "quoted" ,"usage":{"completion_tokens":99}} text \\ and "choices":[] too'

STREAMS = {
    "chat": [
        _chat("", 0),
        _chat("Hel", 1),
        _chat(TRICKY, 2),
        _chat("ü€😀", 3),
        _chat("long " * 300, 3),
        _compact({"choices": [{"delta": {"content": "s"}}], "usage": _usage(4)})[:-1] + b"}",
        _chat("x", 5, finish="length"),
        _chat(None, 5),
    ],
    "completions": [_completion("a", 1), _completion(TRICKY, 2), _completion(None, 2)],
    "final": [  # vLLM's last chunk ends with system_fingerprint
        _chat("", 0),
        _chat("a", 1),
        _chat(None, 1, fingerprint="vllm-0.32.0"),
        _chat(None, 1, fingerprint='x"y'),  # not the pattern's shape: JSON path
    ],
    "odd": [
        _chat("", 0),
        json.dumps(json.loads(_chat("spaced", 1))).encode(),  # not compact: slow path
        _chat("nested", 2, details=True),
        _compact({"choices": [{"index": 0, "delta": {"content": "u"}}], "usage": {"a": {"b": 1}}}),
        _chat("back", 5),
    ],
}

FORMATS = [
    {"stream": True},
    {"stream": True, "stream_options": {"include_usage": True}},
    {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}},
]


def _run(
    body: dict[str, Any], chunks: list[bytes], fast: bool, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[bytes | None], list[int], ChunkProcessor]:
    charged: list[int] = []
    proc = ChunkProcessor(
        Job("t", 5, 10, 0.0), client_format(body, chat=True), charged.append, TokenCounter()
    )
    if not fast:
        monkeypatch.setattr(proc, "_feed_fast", lambda payload: None)
    return [proc.feed(c) for c in chunks], charged, proc


@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("body", FORMATS, ids=["plain", "usage", "continuous"])
def test_fast_path_equals_json_path(
    stream: str, body: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = STREAMS[stream]
    out_fast, charged_fast, fast = _run(body, chunks, True, monkeypatch)
    out_slow, charged_slow, slow = _run(body, chunks, False, monkeypatch)
    assert out_fast == out_slow
    assert charged_fast == charged_slow
    assert fast.completion_tokens == slow.completion_tokens
    assert fast.prompt_tokens == slow.prompt_tokens
    assert fast.usage == slow.usage
    assert fast.reported_completion == slow.reported_completion


def test_fast_path_strips_usage_bytewise() -> None:
    proc = ChunkProcessor(
        Job("t", 5, 10, 0.0), client_format({"stream": True}, chat=True), lambda n: None, None
    )
    proc.feed(_chat("", 0))
    out = proc.feed(_chat(TRICKY, 1))
    assert out is not None
    assert json.loads(out[6:]) == {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": TRICKY}, "logprobs": None, "finish_reason": None}
        ],
    }
    assert proc.completion_tokens == 1


def test_feed_batch_stops_at_error_and_malformed() -> None:
    def proc() -> ChunkProcessor:
        return ChunkProcessor(
            Job("t", 5, 10, 0.0), client_format({"stream": True}, chat=True), lambda n: None, None
        )

    p = proc()
    err = _compact({"error": {"message": "boom", "type": "x", "param": None, "code": 500}})
    out = p.feed_batch([_chat("", 0), _chat("a", 1), err, _chat("b", 2)])
    assert out.count(b"data: ") == 2 and p.error is not None and p.completion_tokens == 1
    p = proc()
    out = p.feed_batch([_chat("", 0), b"{not json", _chat("b", 2)])
    assert out.count(b"data: ") == 1 and p.malformed is not None
    p = proc()
    assert p.feed_batch([b"[1]"]) == b"" and p.malformed is not None


COMPACT_VLLM = STREAMS["chat"][1:] + STREAMS["completions"] + STREAMS["final"][1:3]


@pytest.mark.parametrize("chunk", COMPACT_VLLM)
def test_compact_vllm_chunks_take_the_fast_path(chunk: bytes) -> None:
    proc = ChunkProcessor(
        Job("t", 5, 10, 0.0), client_format({"stream": True}, chat=True), lambda n: None, None
    )
    proc.feed(STREAMS["chat"][0])
    assert proc._feed_fast(chunk) is not None


def test_a_read_is_charged_once_with_all_its_tokens() -> None:
    charged: list[int] = []
    fmt = client_format({"stream": True}, chat=True)
    proc = ChunkProcessor(Job("t", 5, 10, 0.0), fmt, charged.append, TokenCounter())
    proc.feed_batch([_chat("", 0)])
    out = proc.feed_batch([_chat("a", 1), _chat("b", 2), _chat("c", 3)])
    assert charged == [3] and out.count(b"data: ") == 3
    # a malformed payload ends the read: the tokens before it are still charged
    proc.feed_batch([_chat("d", 4), b"{not json"])
    assert charged == [3, 1] and proc.malformed is not None
    assert proc.completion_tokens == proc.reported_completion == 4
    assert proc.usage == _usage(4)
