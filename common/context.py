"""vLLM's context-length rule (0.32: ``TokenizeParams`` and ``get_max_tokens``), shared by the
gateway (which must answer as the backend would) and the simulated backend.

* ``max_tokens`` above the context length is refused;
* a prompt longer than the context is refused;
* otherwise the output is capped at what the context leaves after the prompt: a request whose
  prompt + ``max_tokens`` overflows is served with fewer tokens, not refused. A prompt that
  fills the context leaves 0, which vLLM refuses as ``max_tokens`` 0.

Messages and ``param`` are vLLM's. Pure; imports no project code.
"""

from __future__ import annotations


class ContextError(ValueError):
    """A request vLLM refuses for its length; ``param`` as vLLM names it."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def output_cap(
    prompt_tokens: int, max_tokens: int | None, context: int, max_tokens_param: str = "max_tokens"
) -> int:
    """The most output tokens the request can generate (``max_tokens`` capped by the room the
    context leaves; the room when ``max_tokens`` is None); raises :class:`ContextError`."""
    if max_tokens is not None and max_tokens > context:
        name = max_tokens_param
        raise ContextError(
            f"{name}={max_tokens} cannot be greater than max_model_len={context}. Please "
            f"request fewer output tokens. (parameter={name}, value={max_tokens})",
            name,
        )
    if prompt_tokens > context:
        at_least = "at least " if prompt_tokens == context + 1 else ""
        raise ContextError(
            f"This model's maximum context length is {context} tokens. However, your "
            f"prompt contains {at_least}{prompt_tokens} input tokens, which exceeds this "
            "limit even without any output tokens. Please reduce the length of the input "
            f"prompt. (parameter=input_tokens, value={prompt_tokens})",
            "input_tokens",
        )
    room = context - prompt_tokens
    if room < 1:
        raise ContextError(
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)", "max_tokens"
        )
    return room if max_tokens is None else min(max_tokens, room)
