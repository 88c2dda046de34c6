from __future__ import annotations

import pytest

from common.tokenizer import (
    CACHED_TEXT_CHARS,
    NON_TEXT_PART_TOKENS,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    PromptError,
    TokenCounter,
)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter()


def test_offline_encoding_counts_text(counter: TokenCounter) -> None:
    assert counter.count_text("hello world") == 2
    assert counter.count_text("<|endoftext|>") > 0  # special text is counted, not refused


def test_chat_overhead_and_content_forms(counter: TokenCounter) -> None:
    text = counter.count_text
    as_string = counter.count_chat([{"role": "user", "content": "hello world"}])
    assert as_string == REPLY_PRIMING_TOKENS + TOKENS_PER_MESSAGE + text("user") + 2
    as_parts = counter.count_chat(
        [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]
    )
    assert as_parts == as_string
    with_image = counter.count_chat(
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello world"},
                    {"type": "image_url", "image_url": {"url": "data:,"}},
                ],
            }
        ]
    )
    assert with_image == as_string + NON_TEXT_PART_TOKENS
    assert counter.count_chat([{"role": "assistant", "content": None}]) > 0


def test_completion_prompt_forms(counter: TokenCounter) -> None:
    n = counter.count_text("one two three")
    assert counter.count_prompt("one two three") == n
    assert counter.count_prompt(["one two three"]) == n
    assert counter.count_prompt([1, 2, 3, 4]) == 4
    assert counter.count_prompt([[5, 6]]) == 2


@pytest.mark.parametrize(
    ("body", "chat", "param"),
    [
        ({"messages": []}, True, "messages"),
        ({"messages": "hi"}, True, "messages"),
        ({"messages": [{"content": "x"}]}, True, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 3}]}, True, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"text": 5}]}]},
            True,
            "messages[0].content[0]",
        ),
        ({}, False, "prompt"),
        ({"prompt": []}, False, "prompt"),
        ({"prompt": ["a", "b"]}, False, "prompt"),
        ({"prompt": [1, "b"]}, False, "prompt"),
        ({"prompt": [-1]}, False, "prompt"),
        ({"prompt": 7}, False, "prompt"),
        ({"prompt": [True]}, False, "prompt"),
    ],
)
def test_bad_prompts_name_the_field(
    counter: TokenCounter, body: dict[str, object], chat: bool, param: str
) -> None:
    with pytest.raises(PromptError) as info:
        counter.count_request(body, chat)
    assert info.value.param == param


def test_repeated_short_texts_are_counted_once_and_exactly(counter: TokenCounter) -> None:
    calls: list[str] = []
    enc = counter.encoder

    class Spy:
        def encode(self, text: str) -> list[int]:
            calls.append(text)
            return list(enc.encode(text))

    spy = TokenCounter(Spy())  # type: ignore[arg-type]
    short = "You are a helpful assistant. " * 10
    long = "x y " * CACHED_TEXT_CHARS  # longer than the cached texts
    for _ in range(3):
        assert spy.count_text(short) == len(enc.encode(short))
        assert spy.count_text(long) == len(enc.encode(long))
    assert calls.count(short) == 1 and calls.count(long) == 3
    # a counter with another encoder never sees these counts
    assert TokenCounter(enc).count_text(short) == len(enc.encode(short))
