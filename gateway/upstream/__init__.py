"""Talking to backends: one small interface, the transports behind it."""

from .http import (
    AiohttpUpstream,
    BackendRejected,
    BackendUnreachable,
    ModelInfo,
    StreamBroken,
    Upstream,
    UpstreamStream,
    parse_gauge_sum,
    parse_kv_capacity,
)

__all__ = [
    "AiohttpUpstream",
    "BackendRejected",
    "BackendUnreachable",
    "ModelInfo",
    "StreamBroken",
    "Upstream",
    "UpstreamStream",
    "parse_gauge_sum",
    "parse_kv_capacity",
]
