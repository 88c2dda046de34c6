"""Prometheus view of a replica's link to the shared order (read at scrape time)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .store import ClusterStore


class ClusterCollector(Collector):
    def __init__(self, store: ClusterStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store
        st = store.stats
        replica = store.replica
        lag = time.monotonic() - st.last_sync if st.last_sync else 0.0
        for family, name, doc, value in (
            (GaugeMetricFamily, "shared", "1 while dispatching in the shared order, 0 in local "
             "fallback.", 1.0 if store.up else 0.0),
            (GaugeMetricFamily, "sync_lag_seconds", "Age of this replica's view of the shared "
             "state (time since its last round trip to Redis).", lag),
            (CounterMetricFamily, "fallbacks", "Times this replica lost Redis and fell back to "
             "its local fair order.", st.fallbacks),
            (CounterMetricFamily, "redis_commands", "Operations sent to Redis (claims, "
             "releases, backlog changes, syncs); one script call per round trip.", st.commands),
            (GaugeMetricFamily, "replicas", "Replicas holding a lease, as last seen.",
             st.live_replicas),
            (CounterMetricFamily, "grants_alone", "Requests this replica dispatched without a "
             "round trip (nobody waiting anywhere in its view, room in its share).",
             st.alone),
        ):  # fmt: skip
            metric = family(f"vtc_cluster_{name}", doc, labels=["replica"])
            metric.add_metric([replica], value)
            yield metric
        rtt = SummaryMetricFamily(
            "vtc_cluster_redis_rtt_seconds",
            "Round-trip time of the replica's pipelined batches to Redis.",
            labels=["replica"],
        )
        rtt.add_metric([replica], count_value=st.round_trips, sum_value=st.rtt_sum)
        yield rtt
        slots = GaugeMetricFamily(
            "vtc_cluster_slots_held",
            "Batch slots (sequences) this replica holds per backend.",
            labels=["replica", "backend"],
        )
        kv = GaugeMetricFamily(
            "vtc_cluster_kv_tokens_held",
            "KV tokens this replica has booked per backend.",
            labels=["replica", "backend"],
        )
        leased = GaugeMetricFamily(
            "vtc_cluster_slots_leased",
            "Of the slots held, those leased for requests to come (granted without a round "
            "trip while nobody waits).",
            labels=["replica", "backend"],
        )
        leases = store.leased()
        for backend, (seqs, tokens) in sorted(store.held.items()):
            slots.add_metric([replica, backend], seqs)
            kv.add_metric([replica, backend], tokens)
            leased.add_metric([replica, backend], leases.get(backend, (0, 0))[0])
        yield slots
        yield kv
        yield leased
