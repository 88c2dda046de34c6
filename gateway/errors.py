"""Errors the gateway answers with, and their one rendering in the OpenAI error shape.

    GatewayError (status, type, code = status)
    ├── InvalidRequest        400 invalid_request_error   bad JSON, bad field, prompt too long
    ├── Unauthorized          401 authentication_error    missing or unknown API key
    ├── ModelNotFound         404 not_found_error         model served by no backend
    ├── PayloadTooLarge       413 invalid_request_error   body over limits.max_body_bytes
    ├── RateLimited           429 rate_limit_error        queue full / rpm cap (Retry-After)
    ├── BackendError          502 upstream_error          backend refused or broke the stream
    └── Unavailable           503 service_unavailable     queue timeout, draining

Every path that answers an error builds one of these and renders it with :func:`error_body`
(``{"error": {"message", "type", "param", "code"}}``, ``code`` the integer HTTP status, as vLLM
does). Inside a started stream the same body travels as an SSE ``data:`` event.
"""

from __future__ import annotations

import json
from typing import Any

#: Answer for a tenant removed by a configuration reload (its key is gone too).
TENANT_REMOVED = "tenant removed by configuration reload"


class GatewayError(Exception):
    status = 500
    type = "internal_error"

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
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"


class ModelNotFound(GatewayError):
    status = 404
    type = "not_found_error"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after: float, outcome: str) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, round(retry_after)))})
        self.retry_after = retry_after
        self.outcome = outcome  # the metrics outcome: rejected_queue_full | rejected_rate_limit


class BackendError(GatewayError):
    status = 502
    type = "upstream_error"


class Unavailable(GatewayError):
    status = 503
    type = "service_unavailable"


def error_body(message: str, type_: str, status: int, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def sse_error_event(message: str, type_: str, status: int) -> bytes:
    """An error inside a stream that already answered 200: one event; ``[DONE]`` follows."""
    return b"data: " + json.dumps(error_body(message, type_, status)).encode() + b"\n\n"
