"""Deterministic generated text: one word-token per output step, stop strings, EOS lengths.

A request's whole output is decided when it arrives (the engine only decides *when* each token
comes out):

* the RNG is keyed by the request's ``seed`` when given, else by the server seed and a digest of
  the prompt, so the same request gives the same text on every run;
* each output token is one word from a fixed vocabulary (``" word"``; the first has no leading
  space), so ``completion_tokens`` equals the number of streamed token chunks;
* without ``ignore_eos`` the length before EOS is drawn from a log-normal distribution (median
  ``median_output_tokens``) and capped by ``max_tokens``; with it the request runs to
  ``max_tokens``; ``min_tokens`` is a floor in both cases;
* ``stop`` strings are searched in the text after ``min_tokens`` tokens (as vLLM does); the first
  match ends the output at the token that completes it, with the stop string itself removed from
  the text, ``finish_reason = "stop"`` and ``stop_reason`` = that string.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

__all__ = ["GeneratedText", "TextGenerator", "prompt_digest"]

_VOCABULARY = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there been one all we their has would when if "
    "so no will more other what about up out can time only into some could them these may "
    "then do first any my now such like our over man me even most made after also did many "
    "before must through back years where much your way well down should because each just "
    "those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three engine token batch "
    "cache model server request stream fair share queue counter tenant backend gateway"
)
_WORDS = tuple(_VOCABULARY.split())


def prompt_digest(prompt: object) -> str:
    """A stable digest of a prompt (any JSON-like value) for seeding."""
    return hashlib.blake2b(repr(prompt).encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True)
class GeneratedText:
    """The full output of one request, decided up front.

    Attributes:
        deltas: text of each output token, in order (``len(deltas)`` = output length).
        finish_reason: ``"length"`` or ``"stop"``.
        stop_reason: the stop string that ended the text, else ``None``.
    """

    deltas: tuple[str, ...]
    finish_reason: str
    stop_reason: str | None

    @property
    def num_tokens(self) -> int:
        """Output tokens (one per engine step)."""
        return len(self.deltas)

    @property
    def text(self) -> str:
        """The whole output text."""
        return "".join(self.deltas)


class TextGenerator:
    """Makes :class:`GeneratedText` for requests; pure and deterministic per seed."""

    def __init__(self, seed: int = 0, median_output_tokens: int = 128, sigma: float = 0.8) -> None:
        if median_output_tokens < 1:
            raise ValueError("median_output_tokens must be >= 1")
        self.seed = seed
        self._mu = math.log(median_output_tokens)
        self._sigma = sigma

    def generate(
        self,
        *,
        prompt_key: str,
        max_tokens: int,
        request_seed: int | None = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        stop: tuple[str, ...] = (),
    ) -> GeneratedText:
        """Decide the output of one request (see the module docstring)."""
        key = f"req:{request_seed}" if request_seed is not None else f"srv:{self.seed}:{prompt_key}"
        rng = random.Random(key)
        min_tokens = min(max(min_tokens, 0), max_tokens)
        if ignore_eos:
            length = max_tokens
        else:
            drawn = int(rng.lognormvariate(self._mu, self._sigma)) + 1
            length = min(max(drawn, min_tokens, 1), max_tokens)
        words = _WORDS
        pieces = [rng.choice(words) for _ in range(length)]
        deltas = [" " + w for w in pieces]
        deltas[0] = pieces[0]
        finish = "length" if length >= max_tokens else "stop"
        stops = tuple(s for s in stop if s)
        if stops:
            cut = _find_stop(deltas, stops, min_tokens)
            if cut is not None:
                end_token, text_end, stop_str = cut
                return GeneratedText(_clip(deltas[: end_token + 1], text_end), "stop", stop_str)
        return GeneratedText(tuple(deltas), finish, None)


def _find_stop(
    deltas: list[str], stops: tuple[str, ...], min_tokens: int
) -> tuple[int, int, str] | None:
    """Earliest-ending stop match: (index of the token completing it, match start, string).

    A match may begin before the ``min_tokens`` boundary but must complete after it.
    """
    text = "".join(deltas)
    ends: list[int] = []
    total = 0
    for d in deltas:
        total += len(d)
        ends.append(total)
    boundary = ends[min_tokens - 1] if min_tokens > 0 else 0
    best: tuple[int, int, str] | None = None  # (match end, match start, string)
    for s in stops:
        pos = text.find(s, max(0, boundary - len(s) + 1))
        if pos == -1:
            continue
        match_end = pos + len(s)
        if best is None or match_end < best[0]:
            best = (match_end, pos, s)
    if best is None:
        return None
    match_end, pos, s = best
    token = next(i for i, e in enumerate(ends) if e >= match_end)
    return token, pos, s


def _clip(deltas: list[str], text_end: int) -> tuple[str, ...]:
    """Cut the concatenated deltas at ``text_end`` characters, keeping one delta per token."""
    out: list[str] = []
    start = 0
    for d in deltas:
        end = start + len(d)
        if end <= text_end:
            out.append(d)
        elif start < text_end:
            out.append(d[: text_end - start])
        else:
            out.append("")
        start = end
    return tuple(out)
