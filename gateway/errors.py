"""Errors the gateway answers with, and their one rendering in the OpenAI error shape.

    GatewayError (status, type, code = status; outcome)
    ├── InvalidRequest          400 BadRequestError          bad JSON or field, prompt too long
    ├── Unauthorized            401 AuthenticationError      missing or unknown API key
    ├── ModelNotFound           404 NotFoundError            model served by no backend
    ├── PayloadTooLarge         413 BadRequestError          body over limits.max_body_bytes
    ├── RateLimited             429 RateLimitError           queue full / rpm cap
    ├── BackendRejected         4xx (the backend's)          the backend's own validation
    ├── BackendError            502 BadGatewayError          no backend could serve it
    │   ├── BackendUnreachable  502 BadGatewayError          failed before streaming
    │   └── StreamBroken        502 BadGatewayError          the stream started, then failed
    └── Unavailable             503 ServiceUnavailableError  queue timeout
        └── ShuttingDown        503 ServiceUnavailableError  the gateway is draining

Every path that answers an error builds one of these and renders it with :func:`error_body`
(``{"error": {"message", "type", "param", "code"}}``, ``code`` the integer HTTP status, as vLLM
does). ``type`` follows vLLM's names (the OpenAI SDK's exception classes: ``BadRequestError``,
``NotFoundError``, ...), so a client sees the same error whether the gateway or the backend
refused it. Inside a started stream the same body travels as an SSE ``data:`` event. Each error
names the ``outcome`` a request ending with it is counted as (``vtc_requests_total``); backend
errors also name their ``kind`` (``vtc_backend_errors_total``). The transport
(:mod:`gateway.upstream`) raises only the backend errors here, never its client library's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, ClassVar

from .outcomes import BackendErrorKind, Outcome

#: Answer for a tenant removed by a configuration reload (its key is gone too).
TENANT_REMOVED = "tenant removed by configuration reload"
#: Answer for requests refused while draining.
SHUTTING_DOWN = "gateway is shutting down"


class GatewayError(Exception):
    status = 500
    type = "InternalServerError"
    #: How ``vtc_requests_total`` counts a request that ends with this error.
    outcome: Outcome = "backend_error"

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.status, self.param)


class InvalidRequest(GatewayError):
    status = 400
    type = "BadRequestError"
    outcome: Outcome = "rejected_invalid"


class Unauthorized(GatewayError):
    status = 401
    type = "AuthenticationError"
    outcome: Outcome = "rejected_unauthorized"  # counted only once the tenant is known


class ModelNotFound(InvalidRequest):
    status = 404
    type = "NotFoundError"


class PayloadTooLarge(InvalidRequest):
    status = 413


class RateLimited(GatewayError):
    status = 429
    type = "RateLimitError"

    def __init__(self, message: str, *, retry_after: float, outcome: Outcome) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})
        self.retry_after = retry_after
        self.outcome = outcome  # rejected_queue_full | rejected_rate_limit


class BackendRejected(GatewayError):
    """4xx from the backend before the stream started; ``body`` is its JSON answer."""

    type = "BadRequestError"
    outcome: Outcome = "rejected_invalid"

    def __init__(
        self, status: int, body: dict[str, Any], headers: Mapping[str, str] | None = None
    ) -> None:
        #: the answer's rate-limit headers (``retry-after``, ``x-ratelimit-*``), lower case
        self.rate_headers: Mapping[str, str] = headers or {}
        err = body.get("error")
        if not isinstance(err, dict):
            err = body
        message = err.get("message")
        if not isinstance(message, str):
            message = f"backend refused the request ({status})"
        param = err.get("param")
        super().__init__(message, param=param if isinstance(param, str) else None)
        self.status = status
        self.upstream_body = body

    def body(self) -> dict[str, Any]:
        """The backend's answer when it has the OpenAI error shape, else that shape rebuilt
        from it (older vLLM answers ``{"object": "error", "message": ...}`` at the top)."""
        err = self.upstream_body.get("error")
        if isinstance(err, dict) and {"message", "type", "code"} <= set(err):
            return self.upstream_body
        return super().body()


class BackendError(GatewayError):
    status = 502
    type = "BadGatewayError"
    outcome: Outcome = "backend_error"


class BackendUnreachable(BackendError):
    """The request never ran on the backend: no connection (``kind="unreachable"``), or an
    error status before streaming (``kind="error_before_stream"``). Another backend may take it.
    """

    def __init__(self, message: str, *, kind: BackendErrorKind = "unreachable") -> None:
        super().__init__(message)
        self.kind: BackendErrorKind = kind


class StreamBroken(BackendError):
    """The backend's stream failed after it started: dropped, stalled past the read timeout,
    malformed, or an error event."""

    kind: ClassVar[BackendErrorKind] = "stream_broken"


class Unavailable(GatewayError):
    status = 503
    type = "ServiceUnavailableError"
    outcome: Outcome = "timeout"


class ShuttingDown(Unavailable):
    """Refused because the gateway is draining for shutdown."""

    outcome: Outcome = "rejected_draining"


def error_body(message: str, type_: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def sse_error_event(message: str, type_: str, status: int) -> bytes:
    """An error inside a stream that already answered 200: one event; ``[DONE]`` follows."""
    return b"data: " + json.dumps(error_body(message, type_, status)).encode() + b"\n\n"
