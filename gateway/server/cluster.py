"""Joining the shared order at start-up, leaving it at shutdown (an aiohttp cleanup context)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from ..cluster import ClusterDispatcher, default_replica_id, make_store
from ..cluster.metrics import ClusterCollector
from .state import STATE

log = logging.getLogger(__name__)


async def cluster_context(app: web.Application) -> AsyncIterator[None]:
    """Connect the replica's store (``cluster:``), export its metrics; close it after."""
    state = app[STATE]
    cfg = state.config.cluster
    dispatcher = state.dispatcher
    assert cfg is not None and isinstance(dispatcher, ClusterDispatcher)
    store = make_store(
        cfg.url,
        dispatcher.core,
        replica=cfg.replica_id or default_replica_id(),
        prefix=cfg.prefix,
        sync_interval_s=cfg.sync_interval_s,
        lease_s=cfg.lease_s,
    )
    dispatcher.attach(store)
    collector = ClusterCollector(store)
    state.recorder.registry.register(collector)
    await store.start()
    log.info("cluster: replica %s, shared order %s", store.replica, "on" if store.up else "off")
    try:
        yield
    finally:
        state.recorder.registry.unregister(collector)
        await store.close()
