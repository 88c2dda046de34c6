"""How a request ends, and how a backend failed: the label values the server records and the
metrics export (``vtc_requests_total{outcome}``, ``vtc_backend_errors_total{kind}``).

Each :class:`~gateway.errors.GatewayError` names the outcome of a request that ends with it
(``exc.outcome``); backend errors also name their kind (``exc.kind``).
"""

from __future__ import annotations

from typing import Literal, get_args

Outcome = Literal[
    "ok",
    "rejected_queue_full",  # 429: the tenant's queue is full
    "rejected_rate_limit",  # 429: over the rpm policy's limit
    "rejected_invalid",  # 4xx: bad request (the gateway's or the backend's own validation)
    "rejected_unauthorized",  # 401 for a known tenant: a reload removed it while it waited
    "rejected_draining",  # 503: the gateway is shutting down
    "client_cancelled",  # the client went away (queued or streaming)
    "backend_error",  # 502, or an error event inside the stream
    "timeout",  # 503: no backend slot within limits.queue_timeout_s
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

BackendErrorKind = Literal[
    "unreachable",  # no connection: refused, reset, connect timeout
    "error_before_stream",  # answered 5xx (or 401/403, or broke off) before streaming
    "stream_broken",  # the stream started, then dropped, stalled, or sent garbage/an error
]
BACKEND_ERROR_KINDS: tuple[BackendErrorKind, ...] = get_args(BackendErrorKind)
