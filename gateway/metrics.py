"""Metrics: plain counters updated on the request path, exported in one Prometheus collector.

The hot path only bumps integers in :class:`GatewayStats`; everything derived from scheduler and
admission state (counters, queue depth, in-flight, capacity) is read when Prometheus scrapes.
Tenant label values are capped at ``max_tenant_labels`` (first come, first labelled); the rest
are reported as ``other``. API keys never appear anywhere here.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client import Metric

    from .backend_pool import BackendPool
    from .dispatcher import Dispatcher

OUTCOMES = (
    "ok",
    "rejected_queue_full",
    "rejected_rate_limit",
    "rejected_invalid",
    "client_cancelled",
    "backend_error",
    "timeout",
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class GatewayStats:
    """Per-tenant counters bumped by the request path."""

    max_tenant_labels: int = 100
    outcomes: defaultdict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    prompt_tokens: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    completion_tokens: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    _labels: dict[str, str] = field(default_factory=dict)

    def label(self, tenant: str) -> str:
        """The metric label for ``tenant`` (``other`` past the cardinality cap)."""
        lab = self._labels.get(tenant)
        if lab is None:
            lab = tenant if len(self._labels) < self.max_tenant_labels else "other"
            self._labels[tenant] = lab
        return lab

    def outcome(self, tenant: str, outcome: str) -> None:
        self.outcomes[(self.label(tenant), outcome)] += 1


class Recorder:
    """Owns the registry: latency histograms plus a collector over live state."""

    def __init__(
        self,
        stats: GatewayStats,
        dispatcher: Callable[[], Dispatcher],
        pool: Callable[[], BackendPool],
    ) -> None:
        self.registry = CollectorRegistry()
        self.stats = stats
        self.queue_wait = Histogram(
            "vtc_queue_wait_seconds",
            "Time from arrival to dispatch.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ttft = Histogram(
            "vtc_time_to_first_token_seconds",
            "Time from arrival to the first output token.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "vtc_e2e_request_latency_seconds",
            "Time from arrival to the end of the response.",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(stats, dispatcher, pool))


class _StateCollector(Collector):
    def __init__(
        self,
        stats: GatewayStats,
        dispatcher: Callable[[], Dispatcher],
        pool: Callable[[], BackendPool],
    ) -> None:
        self._stats = stats
        self._dispatcher = dispatcher
        self._pool = pool

    def collect(self) -> Iterator[Metric]:
        stats = self._stats
        d = self._dispatcher()
        counter = GaugeMetricFamily(
            "vtc_tenant_counter", "Virtual token counter.", labels=["tenant", "model"]
        )
        service = CounterMetricFamily(
            "vtc_tenant_service", "Tokens served at their prices.", labels=["tenant"]
        )
        queued = GaugeMetricFamily(
            "vtc_tenant_queued", "Requests waiting in the gateway.", labels=["tenant"]
        )
        inflight = GaugeMetricFamily(
            "vtc_tenant_in_flight", "Requests running on backends.", labels=["tenant"]
        )
        weight = GaugeMetricFamily("vtc_tenant_weight", "Configured weight.", labels=["tenant"])
        agg_service: defaultdict[str, float] = defaultdict(float)
        agg_queued: defaultdict[str, int] = defaultdict(int)
        for model, sched in d.pools().items():
            per_label: defaultdict[str, float] = defaultdict(float)
            for ts in sched.stats():
                lab = stats.label(ts.name)
                per_label[lab] = max(per_label[lab], ts.counter) if lab == "other" else ts.counter
                agg_service[lab] += ts.service
                agg_queued[lab] += ts.queued
            for lab, c in per_label.items():
                counter.add_metric([lab, model], c)
        for lab, v in agg_service.items():
            service.add_metric([lab], v)
        for lab, v in agg_queued.items():
            queued.add_metric([lab], v)
        agg_running: defaultdict[str, int] = defaultdict(int)
        for tenant, n in d.running.items():
            agg_running[stats.label(tenant)] += n
        for lab, v in agg_running.items():
            inflight.add_metric([lab], v)
        for tenant, lim in d.tenant_limits().items():
            lab = stats.label(tenant)
            if lab != "other":
                weight.add_metric([lab], lim.weight)
        yield from (counter, service, queued, inflight, weight)

        prompt = CounterMetricFamily(
            "vtc_tenant_prompt_tokens", "Prompt tokens processed.", labels=["tenant"]
        )
        completion = CounterMetricFamily(
            "vtc_tenant_completion_tokens", "Output tokens delivered.", labels=["tenant"]
        )
        for lab, v in _by_label(stats, stats.prompt_tokens).items():
            prompt.add_metric([lab], v)
        for lab, v in _by_label(stats, stats.completion_tokens).items():
            completion.add_metric([lab], v)
        requests = CounterMetricFamily(
            "vtc_requests", "Requests by outcome.", labels=["tenant", "outcome"]
        )
        for (lab, outcome), v in sorted(stats.outcomes.items()):
            requests.add_metric([lab, outcome], v)
        dispatches = CounterMetricFamily("vtc_dispatches", "Requests dispatched to backends.")
        dispatches.add_metric([], d.dispatched_total)
        yield from (prompt, completion, requests, dispatches)

        pool = self._pool()
        b_inflight = GaugeMetricFamily(
            "vtc_backend_in_flight", "Sequences in flight.", labels=["backend"]
        )
        b_reserved = GaugeMetricFamily(
            "vtc_backend_reserved_tokens", "KV tokens reserved.", labels=["backend"]
        )
        b_seqs = GaugeMetricFamily(
            "vtc_backend_max_num_seqs", "Sequence capacity.", labels=["backend"]
        )
        b_kv = GaugeMetricFamily(
            "vtc_backend_max_kv_tokens", "KV token capacity.", labels=["backend"]
        )
        b_up = GaugeMetricFamily(
            "vtc_backend_up", "1 if the backend takes requests.", labels=["backend"]
        )
        b_err = CounterMetricFamily(
            "vtc_backend_errors", "Upstream errors by kind.", labels=["backend", "kind"]
        )
        for st in pool.states.values():
            s = st.slots
            b_inflight.add_metric([s.name], s.in_flight)
            b_reserved.add_metric([s.name], s.reserved_tokens)
            b_seqs.add_metric([s.name], s.max_num_seqs)
            b_kv.add_metric([s.name], s.max_kv_tokens)
            b_up.add_metric([s.name], 1 if s.healthy else 0)
            for kind, n in st.errors.items():
                b_err.add_metric([s.name, kind], n)
        yield from (b_inflight, b_reserved, b_seqs, b_kv, b_up, b_err)


def _by_label(stats: GatewayStats, values: dict[str, int]) -> dict[str, int]:
    out: defaultdict[str, int] = defaultdict(int)
    for tenant, v in values.items():
        out[stats.label(tenant)] += v
    return out
