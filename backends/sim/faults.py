"""Fault injection for reliability tests of clients and the gateway.

A fault is ``KIND[;key=value]...``, switchable per server (``--fault``, repeatable, with an
optional probability ``p``) and per request (header ``X-Sim-Fault``; the header wins, and
``X-Sim-Fault: none`` disables the server's faults for that request).

=============  ==========================================================================
kind           effect
=============  ==========================================================================
refuse         close the connection without answering (before reading the body)
error_500      answer 500 in the OpenAI error shape before streaming
drop_mid       drop the TCP connection after ``after`` output tokens (default 3)
stall_mid      stop sending after ``after`` tokens, keep the connection open (the engine
               request is aborted so the simulator itself stays healthy)
slow_first     delay the first token by ``delay`` seconds (default 2.0)
malformed_sse  emit a garbage SSE event after ``after`` tokens, then carry on normally
               (non-stream: the 200 body is not JSON)
error_mid      after ``after`` tokens send ``data: {"error": ...}`` then ``data: [DONE]``
               (non-stream: a 500 once generation reaches that point)
=============  ==========================================================================

Keys: ``p`` (probability 0-1, server flag only; default 1), ``after`` (tokens, >= 0), ``delay``
(seconds, >= 0). Examples: ``--fault drop_mid;p=0.1;after=5``,
``X-Sim-Fault: slow_first;delay=0.5``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, cast, get_args

__all__ = ["FAULT_HEADER", "FaultInjector", "FaultKind", "FaultSpec", "parse_fault"]

FaultKind = Literal[
    "refuse", "error_500", "drop_mid", "stall_mid", "slow_first", "malformed_sse", "error_mid"
]
FAULT_KINDS: tuple[str, ...] = get_args(FaultKind)
FAULT_HEADER = "X-Sim-Fault"


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault: its kind and parameters (see the module docstring)."""

    kind: FaultKind
    probability: float = 1.0
    after: int = 3
    delay: float = 2.0


def parse_fault(text: str) -> FaultSpec:
    """Parse ``KIND[;key=value]...``; ``ValueError`` with a readable message when invalid."""
    parts = [p.strip() for p in text.split(";") if p.strip()]
    if not parts:
        raise ValueError("empty fault spec")
    kind = parts[0].lower()
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
    probability, after, delay = 1.0, 3, 2.0
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ValueError(f"fault option {part!r} must be key=value")
        try:
            if key == "p":
                probability = float(value)
                if not 0.0 <= probability <= 1.0:
                    raise ValueError
            elif key == "after":
                after = int(value)
                if after < 0:
                    raise ValueError
            elif key == "delay":
                delay = float(value)
                if not 0.0 <= delay < 3600:
                    raise ValueError
            else:
                raise KeyError(key)
        except KeyError:
            raise ValueError(f"unknown fault option {key!r} (p, after, delay)") from None
        except ValueError:
            raise ValueError(f"bad value for fault option {key!r}: {value.strip()!r}") from None
    return FaultSpec(cast(FaultKind, kind), probability, after, delay)


class FaultInjector:
    """Chooses the fault (if any) of each request: header first, then the server's specs."""

    def __init__(self, specs: tuple[FaultSpec, ...] = (), seed: int = 0) -> None:
        self.specs = specs
        self._rng = random.Random(f"faults:{seed}")

    def pick(self, header: str | None) -> FaultSpec | None:
        """The fault for a request with ``X-Sim-Fault: header`` (``None``: header absent).

        Raises ``ValueError`` for a malformed header.
        """
        if header is not None:
            if header.strip().lower() in ("", "none"):
                return None
            return parse_fault(header)
        for spec in self.specs:
            if spec.probability >= 1.0 or self._rng.random() < spec.probability:
                return spec
        return None
