"""Property tests: the parser and validator answer every input with a value or InvalidRequest."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.tokenizer import PromptError, TokenCounter
from gateway.errors import InvalidRequest
from gateway.server.validate import Fields, check_fields, output_reservation, parse_body

COUNTER = TokenCounter()

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
    "temperature",
    "ignore_eos",
]
bodies = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6) | st.fixed_dictionaries(
    {
        "model": st.just("m"),
        "messages": st.lists(
            st.fixed_dictionaries(
                {"role": st.sampled_from(["user", "system"]), "content": json_values}
            ),
            max_size=3,
        ),
    },
    optional={"max_tokens": json_values, "stream": json_values, "n": json_values},
)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=64) | bodies.map(lambda b: json.dumps(b).encode()))
def test_parse_body_returns_an_object_or_invalid_request(raw: bytes) -> None:
    try:
        body = parse_body(raw)
    except InvalidRequest as exc:
        assert exc.status == 400
    else:
        assert isinstance(body, dict)
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # forwardable as it is


def test_unpaired_surrogate_escapes_are_rejected_paired_ones_kept() -> None:
    assert parse_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}
    with pytest.raises(InvalidRequest, match="surrogate"):
        parse_body(b'{"a": ["x", {"b": "\\udcff"}]}')


def test_deeply_nested_json_is_a_400_not_a_crash() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequest):
        parse_body(raw)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    bodies,
    st.booleans(),
    st.one_of(st.none(), st.integers(1, 10_000)),
    st.one_of(st.none(), st.integers(1, 5000)),
)
def test_validation_chain_never_escapes_its_error_types(
    body: dict[str, Any], chat: bool, context: int | None, default: int | None
) -> None:
    try:
        fields = check_fields(body, chat)
        prompt_tokens = COUNTER.count_request(body, chat)
        reserve = output_reservation(fields, prompt_tokens, context, default)
    except (InvalidRequest, PromptError):
        return
    assert isinstance(fields, Fields) and fields.model == body["model"]
    assert reserve >= 1
    if context is not None:
        assert prompt_tokens + reserve <= context
    if fields.max_tokens is not None:  # vLLM 0.32: the output is capped by the room left
        room = context - prompt_tokens if context is not None else fields.max_tokens
        assert reserve == min(fields.max_tokens, room)


def test_reservation_defaults() -> None:
    f = Fields("m", None, "max_tokens", "prompt")
    assert output_reservation(f, 100, 4096, None) == 3996
    assert output_reservation(f, 100, 4096, 256) == 256
    assert output_reservation(f, 100, None, None) == 1 << 20


def test_context_rule_is_vllms() -> None:
    """vLLM 0.32 serves prompt + max_tokens over the context with fewer tokens; it refuses only
    max_tokens over the context, a prompt over it, or a prompt that fills it."""
    f = Fields("m", 2040, "max_tokens", "prompt")
    assert output_reservation(f, 9, 2048, None) == 2039
    with pytest.raises(InvalidRequest) as info:
        output_reservation(Fields("m", 2049, "max_completion_tokens", "messages"), 9, 2048, None)
    assert info.value.param == "max_completion_tokens"
    assert info.value.message.startswith(
        "max_completion_tokens=2049 cannot be greater than max_model_len=2048."
    )
    with pytest.raises(InvalidRequest) as info:
        output_reservation(f, 2049, 2048, None)
    assert info.value.param == "input_tokens"
    assert "your prompt contains at least 2049 input tokens" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        output_reservation(f, 2048, 2048, None)
    assert info.value.message.startswith("max_tokens must be at least 1, got 0.")
