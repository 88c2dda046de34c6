"""Talking to backends: one small interface, the transports behind it."""

from .http import (
    AiohttpUpstream,
    ModelInfo,
    Upstream,
    UpstreamStream,
    parse_gauge_sum,
    parse_kv_capacity,
)

__all__ = [
    "AiohttpUpstream",
    "ModelInfo",
    "Upstream",
    "UpstreamStream",
    "parse_gauge_sum",
    "parse_kv_capacity",
]
