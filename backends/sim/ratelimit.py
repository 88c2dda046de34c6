"""A hosted provider's quota: requests and tokens per minute over a sliding window (pure).

No asyncio and no clock of its own: every call is given ``now`` (seconds, any monotonic origin;
a ``now`` earlier than one already seen is treated as that one).

Accounting (:meth:`RateLimiter.admit`):

* a request is charged once, at its arrival, with ``prompt_tokens + output tokens`` where the
  output is the length the simulator will actually generate (decided at arrival, capped by
  ``max_tokens``); nothing is refunded when the client leaves early;
* an accepted request counts in every window that contains its arrival time ``a``, i.e. while
  ``now < a + window_s``; the window ending ``now`` is ``(now - window_s, now]``;
* a request is accepted when ``requests < rpm`` and ``tokens + cost <= tpm`` in that window; a
  request whose cost alone exceeds ``tpm`` is accepted into an empty window (else it could never
  be served); refused requests are not counted;
* a refusal carries ``retry_after``: the time until the oldest counted requests have left the
  window far enough for this request to fit, assuming no other admissions (exact: at
  ``now + retry_after`` the same request is accepted); its ``reason`` is the limit that needs
  the longer wait (``"requests"`` on a tie).

Quota state for OpenAI's headers (:class:`Quota`): ``remaining`` = limit minus what the window
holds (after this request when it was accepted; never below 0), ``reset`` = time until the
quota is back to its initial state, i.e. until the newest counted request leaves the window (in
a sliding window this is the same instant for requests and tokens).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Decision",
    "Quota",
    "RateLimiter",
    "RateLimits",
    "Reason",
    "format_duration",
]

Reason = Literal["requests", "tokens"]

#: Slack for float noise when turning seconds into whole milliseconds or seconds.
_EPS = 1e-9


def _ceil(value: float) -> int:
    return max(0, math.ceil(value - _EPS))


def format_duration(seconds: float) -> str:
    """OpenAI's ``x-ratelimit-reset-*`` format (Go durations at ms resolution, rounded up).

    ``0s``, ``120ms``, ``1s``, ``8.64s``, ``1m26.4s``, ``6m0s``, ``1h0m0s``.
    """
    ms = _ceil(seconds * 1000)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    sec = f"{secs}.{frac:03d}".rstrip("0") + "s" if frac else f"{secs}s"
    if hours:
        return f"{hours}h{minutes}m{sec}"
    if minutes:
        return f"{minutes}m{sec}"
    return sec


@dataclass(frozen=True, slots=True)
class RateLimits:
    """The quota: ``None`` leaves that dimension unlimited.

    Attributes:
        tpm: tokens (prompt + output) per window.
        rpm: requests per window.
        window_s: the sliding window in seconds (60 for a per-minute quota).
    """

    tpm: int | None = None
    rpm: int | None = None
    window_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("tpm", "rpm"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1
            ):
                raise ValueError(f"{name} must be an integer >= 1 (or unset), got {value!r}")
        if not (isinstance(self.window_s, int | float) and 0 < self.window_s < math.inf):
            raise ValueError(f"rate window must be > 0 seconds, got {self.window_s!r}")

    @property
    def enabled(self) -> bool:
        """Whether any limit is set."""
        return self.tpm is not None or self.rpm is not None


@dataclass(frozen=True, slots=True)
class Quota:
    """Limits, what remains of them and when they reset; ``None`` for an unlimited dimension."""

    limit_requests: int | None
    limit_tokens: int | None
    remaining_requests: int | None
    remaining_tokens: int | None
    reset_s: float

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*`` headers for the limited dimensions."""
        out: dict[str, str] = {}
        reset = format_duration(self.reset_s)
        if self.limit_requests is not None:
            out["x-ratelimit-limit-requests"] = str(self.limit_requests)
            out["x-ratelimit-remaining-requests"] = str(self.remaining_requests)
            out["x-ratelimit-reset-requests"] = reset
        if self.limit_tokens is not None:
            out["x-ratelimit-limit-tokens"] = str(self.limit_tokens)
            out["x-ratelimit-remaining-tokens"] = str(self.remaining_tokens)
            out["x-ratelimit-reset-tokens"] = reset
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of :meth:`RateLimiter.admit`.

    Attributes:
        accepted: whether the request was admitted (and counted).
        cost: the tokens it is (or would be) charged.
        reason: for a refusal, the limit that refused it.
        retry_after: for a refusal, seconds until it would be accepted; 0 when accepted.
        used_requests, used_tokens: what the window held before this request.
        quota: the quota after the decision (this request included when accepted).
    """

    accepted: bool
    cost: int
    reason: Reason | None
    retry_after: float
    used_requests: int
    used_tokens: int
    quota: Quota

    def headers(self) -> dict[str, str]:
        """The quota headers, plus ``retry-after`` (whole seconds, rounded up) and
        ``retry-after-ms`` on a refusal."""
        out = self.quota.headers()
        if not self.accepted:
            out["retry-after"] = str(_ceil(self.retry_after))
            out["retry-after-ms"] = str(_ceil(self.retry_after * 1000))
        return out


@dataclass(slots=True)
class RateLimiter:
    """Sliding-window RPM/TPM limiter (see the module docstring for the rules).

    Counters (cumulative, never reset): ``accepted_requests``, ``accepted_tokens``,
    ``refused`` by reason and ``refused_tokens`` (the costs of refused requests).
    """

    limits: RateLimits
    accepted_requests: int = 0
    accepted_tokens: int = 0
    refused: dict[Reason, int] = field(default_factory=lambda: {"requests": 0, "tokens": 0})
    refused_tokens: int = 0
    _entries: deque[tuple[float, int]] = field(default_factory=deque)  # (arrival, tokens)
    _tokens: int = 0
    _now: float = -math.inf

    def _advance(self, now: float) -> float:
        now = max(now, self._now)
        self._now = now
        window = self.limits.window_s
        entries = self._entries
        while entries and entries[0][0] + window <= now:
            self._tokens -= entries.popleft()[1]
        return now

    def usage(self, now: float) -> tuple[int, int]:
        """``(requests, tokens)`` counted in the window ending ``now``."""
        self._advance(now)
        return len(self._entries), self._tokens

    def quota(self, now: float) -> Quota:
        """The quota as of ``now`` (for headers of responses that were not charged)."""
        now = self._advance(now)
        lim = self.limits
        entries = self._entries
        reset = entries[-1][0] + lim.window_s - now if entries else 0.0
        return Quota(
            limit_requests=lim.rpm,
            limit_tokens=lim.tpm,
            remaining_requests=None if lim.rpm is None else max(0, lim.rpm - len(entries)),
            remaining_tokens=None if lim.tpm is None else max(0, lim.tpm - self._tokens),
            reset_s=reset,
        )

    def _wait_requests(self, now: float) -> float | None:
        rpm, n = self.limits.rpm, len(self._entries)
        if rpm is None or n < rpm:
            return None
        # the oldest n - rpm + 1 must leave
        return self._entries[n - rpm][0] + self.limits.window_s - now

    def _wait_tokens(self, now: float, cost: int) -> float | None:
        tpm, entries = self.limits.tpm, self._entries
        if tpm is None or not entries or self._tokens + cost <= tpm:
            return None
        if cost > tpm:
            leave = len(entries)  # only into an empty window
        else:
            need, freed, leave = self._tokens + cost - tpm, 0, 0
            while freed < need:
                freed += entries[leave][1]
                leave += 1
        return entries[leave - 1][0] + self.limits.window_s - now

    def admit(self, now: float, cost: int) -> Decision:
        """Accept and count a request charged ``cost`` tokens at ``now``, or refuse it."""
        if cost < 0:
            raise ValueError(f"cost must be >= 0, got {cost}")
        now = self._advance(now)
        used_requests, used_tokens = len(self._entries), self._tokens
        wait_req = self._wait_requests(now)
        wait_tok = self._wait_tokens(now, cost)
        if wait_req is None and wait_tok is None:
            self._entries.append((now, cost))
            self._tokens += cost
            self.accepted_requests += 1
            self.accepted_tokens += cost
            return Decision(True, cost, None, 0.0, used_requests, used_tokens, self.quota(now))
        reason: Reason
        if wait_tok is None or (wait_req is not None and wait_req >= wait_tok):
            reason, wait = "requests", wait_req
        else:
            reason, wait = "tokens", wait_tok
        assert wait is not None
        self.refused[reason] += 1
        self.refused_tokens += cost
        return Decision(
            False, cost, reason, max(0.0, wait), used_requests, used_tokens, self.quota(now)
        )
