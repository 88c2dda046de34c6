"""Talking to backends: one protocol (:mod:`.interface`), the transports behind it.

* :mod:`.interface`: :class:`Upstream`, :class:`UpstreamStream`, :class:`ModelInfo`;
* :mod:`.http`: :class:`AiohttpUpstream`, the real transport (streams from ``http://`` backends
  on :mod:`.h1`, httptools' parser on an asyncio protocol; :mod:`.sse` splits the events);
* :mod:`.fake`: :class:`~gateway.upstream.fake.FakeUpstream`, in-process, for tests.
"""

from .http import AiohttpUpstream
from .interface import ModelInfo, Upstream, UpstreamStream

__all__ = [
    "AiohttpUpstream",
    "ModelInfo",
    "Upstream",
    "UpstreamStream",
]
