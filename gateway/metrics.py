"""Metrics: plain counters updated on the request path, exported in one Prometheus collector.

The hot path only bumps integers in :class:`GatewayStats` (and observes three latency
histograms once per request); everything derived from scheduler and admission state (counters,
service, queue depth, in-flight, capacity, fairness) is read when Prometheus scrapes, as one
:class:`GatewaySnapshot` (plain data; the collector never reaches into the dispatcher or the
backend pool). Nothing here runs per output token. The dispatcher's pump is timed once per
call (:attr:`Recorder.decision`).

Tenant label values are capped at ``max_tenant_labels`` (configured tenants first, then first
come, first labelled); the rest are reported as ``other``. API keys never appear anywhere here.
``docs/observability.md`` lists every metric.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .outcomes import BACKEND_ERROR_KINDS, OUTCOMES, BackendErrorKind, Outcome
from .scheduler import TenantStats

if TYPE_CHECKING:
    from prometheus_client import Metric

RELOAD_RESULTS = ("ok", "error")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: One dispatcher pump: a heap peek/pop and an admission check per dispatched request.
DECISION_BUCKETS = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1,
)  # fmt: skip
#: Sliding window of the Jain fairness index.
FAIRNESS_WINDOW_S = 60.0


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One model's scheduler: every tenant it knows, and which of them are backlogged."""

    model: str
    tenants: tuple[TenantStats, ...]
    backlogged: frozenset[str]
    #: tenant -> (counter lifts on arrival, counter units they added)
    lifts: Mapping[str, tuple[int, float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BackendSnapshot:
    name: str
    up: bool
    models: frozenset[str]
    in_flight: int
    reserved_tokens: int
    max_num_seqs: int
    seq_cap: int  # sequences admitted at most now (max_num_seqs unless adaptive caps it)
    max_kv_tokens: int
    admitted_total: int
    errors: Mapping[BackendErrorKind, int]
    kv_scale: float = 1.0  # "predict" admission: the budget is max_kv_tokens times this
    engine_preemptions: float = 0.0  # preemptions the engine reported since the gateway started


#: the per-backend series, in exposition order: (family, name, help, value of a backend)
_BACKEND_FAMILIES: tuple[
    tuple[
        type[GaugeMetricFamily | CounterMetricFamily], str, str, Callable[[BackendSnapshot], float]
    ],
    ...,
] = (
    (GaugeMetricFamily, "vtc_backend_in_flight", "Sequences in flight.", lambda b: b.in_flight),
    (
        GaugeMetricFamily,
        "vtc_backend_reserved_tokens",
        "KV tokens reserved by in-flight requests.",
        lambda b: b.reserved_tokens,
    ),
    (
        GaugeMetricFamily,
        "vtc_backend_max_num_seqs",
        "Sequence capacity.",
        lambda b: b.max_num_seqs,
    ),
    (
        GaugeMetricFamily,
        "vtc_backend_seq_cap",
        "Sequences admitted at most now (max_num_seqs, or less while adaptive feedback caps it).",
        lambda b: b.seq_cap,
    ),
    (
        GaugeMetricFamily,
        "vtc_backend_max_kv_tokens",
        "KV token capacity.",
        lambda b: b.max_kv_tokens,
    ),
    (GaugeMetricFamily, "vtc_backend_up", "1 if the backend takes requests.", lambda b: int(b.up)),
    (
        CounterMetricFamily,
        "vtc_backend_admitted",
        "Requests admitted to the backend.",
        lambda b: b.admitted_total,
    ),
    (
        GaugeMetricFamily,
        "vtc_backend_kv_scale",
        "Predict admission: the KV budget as a fraction of max_kv_tokens (engine feedback lowers "
        "it while the backend queues or preempts).",
        lambda b: b.kv_scale,
    ),
    (
        CounterMetricFamily,
        "vtc_backend_engine_preemptions",
        "Preemptions the backend's engine reported since the gateway started.",
        lambda b: b.engine_preemptions,
    ),
)


@dataclass(frozen=True, slots=True)
class GroupSnapshot:
    """An inner node of the tenant tree (``path``: ``org/team``; ``level``: 1 at the top)."""

    path: str
    weight: float
    counters: Mapping[str, float]  # model -> the group's counter in that pool
    queued: int  # requests waiting in its subtree
    running: int  # requests of its subtree in flight
    service: float  # its tenants' service, summed

    @property
    def level(self) -> int:
        return self.path.count("/") + 1


@dataclass(frozen=True, slots=True)
class GatewaySnapshot:
    """Everything the collector exports besides :class:`GatewayStats`, read at scrape time."""

    weights: Mapping[str, float]  # configured tenants
    running: Mapping[str, int]  # tenant -> requests in flight
    dispatched_total: int
    pools: tuple[PoolSnapshot, ...]
    backends: tuple[BackendSnapshot, ...]
    holds_total: int = 0  # slots held for a resubmitting tenant's next request, ever
    holds_used: int = 0  # ... of which its next request took over
    held: int = 0  # slots held right now
    groups: tuple[GroupSnapshot, ...] = ()  # the tenant tree's inner nodes (none if flat)
    paths: Mapping[str, str] = field(default_factory=dict)  # nested tenant -> its path


@dataclass
class GatewayStats:
    """Per-tenant counters bumped by the request path (and by config reloads)."""

    max_tenant_labels: int = 100
    outcomes: defaultdict[tuple[str, Outcome], int] = field(
        default_factory=lambda: defaultdict(int)
    )
    prompt_tokens: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    completion_tokens: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    reloads: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_reload_ok: float = field(default_factory=time.time)  # unix time of the config in force
    _labels: dict[str, str] = field(default_factory=dict)

    def label(self, tenant: str) -> str:
        """The metric label for ``tenant`` (``other`` past the cardinality cap)."""
        lab = self._labels.get(tenant)
        if lab is None:
            lab = tenant if len(self._labels) < self.max_tenant_labels else "other"
            self._labels[tenant] = lab
        return lab

    def outcome(self, tenant: str, outcome: Outcome) -> None:
        self.outcomes[(self.label(tenant), outcome)] += 1

    def reload(self, ok: bool) -> None:
        self.reloads["ok" if ok else "error"] += 1
        if ok:
            self.last_reload_ok = time.time()


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``: 1 when all equal, 1/n when one
    value takes everything; 1 for fewer than two values or all zeros (nothing to compare)."""
    xs = list(values)
    sq = sum(x * x for x in xs)
    if len(xs) < 2 or sq <= 0:
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sq)


@dataclass(frozen=True, slots=True)
class _Sample:
    t: float
    service: Mapping[str, float]  # tenant -> service so far, divided by its weight
    backlogged: frozenset[str]


class FairnessWindow:
    """Jain's index of weight-normalised service over the last ``window_s`` seconds among
    tenants backlogged in every sample of the window (a tenant with an empty queue is not
    owed anything). Sampled when Prometheus scrapes; samples closer than ``min_gap_s`` are
    not stored, so a scrape storm costs nothing extra."""

    def __init__(self, window_s: float = FAIRNESS_WINDOW_S, min_gap_s: float = 1.0) -> None:
        self.window_s = window_s
        self.min_gap_s = min_gap_s
        self._samples: deque[_Sample] = deque()

    def observe(
        self, now: float, service: Mapping[str, float], backlogged: Iterable[str]
    ) -> tuple[float, int]:
        """Add a sample; return (Jain index, number of tenants it covers)."""
        cur = _Sample(now, dict(service), frozenset(backlogged))
        samples = self._samples
        if not samples or now - samples[-1].t >= self.min_gap_s:
            samples.append(cur)
        # keep one baseline sample at or before the window's start
        while len(samples) >= 2 and samples[1].t <= now - self.window_s:
            samples.popleft()
        base = samples[0]
        tenants = set(cur.backlogged)
        for s in samples:
            tenants &= s.backlogged
        deltas = [cur.service.get(t, 0.0) - base.service.get(t, 0.0) for t in sorted(tenants)]
        return jain_index(deltas), len(deltas)


class Recorder:
    """Owns the registry: latency histograms plus a collector over live state."""

    def __init__(
        self,
        stats: GatewayStats,
        snapshot: Callable[[], GatewaySnapshot],
        *,
        fairness_window_s: float = FAIRNESS_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self.stats = stats
        self._children: dict[tuple[int, str], Any] = {}
        self.queue_wait = self._latency("vtc_queue_wait_seconds", "Time from arrival to dispatch.")
        self.ttft = self._latency(
            "vtc_time_to_first_token_seconds", "Time from arrival to the first output token."
        )
        self.e2e = self._latency(
            "vtc_e2e_request_latency_seconds",
            "Time from arrival to the end of a successful response.",
        )
        self.decision = Histogram(
            "vtc_scheduler_decision_seconds",
            "Duration of one dispatcher pump (scheduler picks and admission checks).",
            buckets=DECISION_BUCKETS,
            registry=self.registry,
        )
        self.fairness = FairnessWindow(fairness_window_s)
        self.registry.register(_StateCollector(stats, snapshot, self.fairness, clock))

    def observe(self, hist: Histogram, label: str, seconds: float) -> None:
        """``hist.labels(label).observe(seconds)``, the labelled child looked up once (labels()
        validates and locks on every call: three times per request)."""
        key = (id(hist), label)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = hist.labels(label)
        child.observe(seconds)

    def _latency(self, name: str, documentation: str) -> Histogram:
        """A per-tenant latency histogram in seconds."""
        return Histogram(
            name, documentation, ["tenant"], buckets=LATENCY_BUCKETS, registry=self.registry
        )


class _StateCollector(Collector):
    def __init__(
        self,
        stats: GatewayStats,
        snapshot: Callable[[], GatewaySnapshot],
        fairness: FairnessWindow,
        clock: Callable[[], float],
    ) -> None:
        self._stats = stats
        self._snapshot = snapshot
        self._fairness = fairness
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        yield from self._tenants(snap)
        yield from self._backends(snap)
        yield from self._global(snap)

    def _groups(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        """The tenant tree: one series per group (``group`` its path, ``level`` its depth),
        at most ``max_tenant_labels`` groups (configured, in config order), and each nested
        tenant's path (join on ``tenant`` for per-level views)."""
        if not snap.groups:
            return
        stats = self._stats
        path = GaugeMetricFamily(
            "vtc_tenant_path",
            "Where a nested tenant sits in the tree (1; the path is the label).",
            labels=["tenant", "path"],
        )
        for tenant, p in snap.paths.items():
            lab = stats.label(tenant)
            if lab != "other":
                path.add_metric([lab, p], 1)
        labels = ["group", "level"]
        counter = GaugeMetricFamily(
            "vtc_group_counter",
            "Virtual token counter of a group (its subtree's priced tokens / its weight).",
            labels=[*labels, "model"],
        )
        service = CounterMetricFamily(
            "vtc_group_service_tokens", "Service received by a group's tenants.", labels=labels
        )
        queued = GaugeMetricFamily("vtc_group_queued", "Requests waiting.", labels=labels)
        inflight = GaugeMetricFamily("vtc_group_in_flight", "Requests running.", labels=labels)
        weight = GaugeMetricFamily("vtc_group_weight", "Configured weight.", labels=labels)
        for g in snap.groups[: stats.max_tenant_labels]:
            key = [g.path, str(g.level)]
            for model, c in sorted(g.counters.items()):
                counter.add_metric([*key, model], c)
            service.add_metric(key, g.service)
            queued.add_metric(key, g.queued)
            inflight.add_metric(key, g.running)
            weight.add_metric(key, g.weight)
        yield from (path, counter, service, queued, inflight, weight)

    def _tenants(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        yield from self._tenant_state(snap)
        yield from self._tenant_lifts(snap)
        yield from self._groups(snap)
        yield from self._tenant_requests(snap)

    def _tenant_state(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        """Counters (per model pool), service, queued and running requests, weights."""
        stats = self._stats
        counter = GaugeMetricFamily(
            "vtc_tenant_counter",
            "Virtual token counter (weighted tokens / tenant weight) per model pool.",
            labels=["tenant", "model"],
        )
        service = CounterMetricFamily(
            "vtc_tenant_service_tokens",
            "Service received: input_price * prompt + output_price * completion tokens.",
            labels=["tenant"],
        )
        queued = GaugeMetricFamily(
            "vtc_tenant_queued", "Requests waiting in the gateway.", labels=["tenant"]
        )
        inflight = GaugeMetricFamily(
            "vtc_tenant_in_flight", "Requests running on backends.", labels=["tenant"]
        )
        weight = GaugeMetricFamily("vtc_tenant_weight", "Configured weight.", labels=["tenant"])
        configured = snap.weights
        agg_service: defaultdict[str, float] = defaultdict(float)
        agg_queued = defaultdict(int, _zeros(stats, configured, 0))
        agg_running = defaultdict(int, _zeros(stats, configured, 0))
        for ps in sorted(snap.pools, key=lambda p: p.model):
            per_label: dict[str, float] = {}
            for ts in ps.tenants:
                lab = stats.label(ts.name)
                per_label[lab] = max(per_label.get(lab, ts.counter), ts.counter)
                agg_service[lab] += ts.service
                agg_queued[lab] += ts.queued
            for lab, c in per_label.items():
                counter.add_metric([lab, ps.model], c)
        for lab, v in agg_service.items():
            service.add_metric([lab], v)
        for lab, n in agg_queued.items():
            queued.add_metric([lab], n)
        for tenant, n in snap.running.items():
            agg_running[stats.label(tenant)] += n
        for lab, n in agg_running.items():
            inflight.add_metric([lab], n)
        for tenant, w in configured.items():
            lab = stats.label(tenant)
            if lab != "other":
                weight.add_metric([lab], w)
        yield from (counter, service, queued, inflight, weight)

    def _tenant_lifts(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        """How often, and by how much, each tenant's counter was lifted on arrival."""
        stats = self._stats
        lifts = CounterMetricFamily(
            "vtc_tenant_lifts",
            "Counter lifts on arrival to an empty queue (VTC's rule against banked credit).",
            labels=["tenant"],
        )
        lift_units = CounterMetricFamily(
            "vtc_tenant_lift_units",
            "Counter units the lifts added (weight-normalised token prices).",
            labels=["tenant"],
        )
        agg_lifts = defaultdict(int, _zeros(stats, snap.weights, 0))
        agg_units = defaultdict(float, _zeros(stats, snap.weights, 0.0))
        for ps in snap.pools:
            for tenant, (count, units) in ps.lifts.items():
                lab = stats.label(tenant)
                agg_lifts[lab] += count
                agg_units[lab] += units
        for lab, n in agg_lifts.items():
            lifts.add_metric([lab], n)
            lift_units.add_metric([lab], agg_units[lab])
        yield from (lifts, lift_units)

    def _tenant_requests(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        """Prompt and output tokens, finished requests by outcome."""
        stats = self._stats
        prompt = CounterMetricFamily(
            "vtc_tenant_prompt_tokens", "Prompt tokens of requests that ran.", labels=["tenant"]
        )
        completion = CounterMetricFamily(
            "vtc_tenant_completion_tokens", "Output tokens generated.", labels=["tenant"]
        )
        for lab, v in _by_label(stats, stats.prompt_tokens).items():
            prompt.add_metric([lab], v)
        for lab, v in _by_label(stats, stats.completion_tokens).items():
            completion.add_metric([lab], v)
        requests = CounterMetricFamily(
            "vtc_requests", "Finished requests by outcome.", labels=["tenant", "outcome"]
        )
        outcomes: dict[tuple[str, Outcome], int] = {
            (stats.label(t), o): 0 for t in snap.weights for o in OUTCOMES
        }
        outcomes.update(stats.outcomes)
        for (lab, outcome), v in sorted(outcomes.items()):
            requests.add_metric([lab, outcome], v)
        yield from (prompt, completion, requests)

    def _backends(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        families = [
            (family(name, text, labels=["backend"]), value)
            for family, name, text, value in _BACKEND_FAMILIES
        ]
        b_err = CounterMetricFamily(
            "vtc_backend_errors", "Upstream errors by kind.", labels=["backend", "kind"]
        )
        for b in snap.backends:
            for metric, value in families:
                metric.add_metric([b.name], value(b))
            errors: dict[BackendErrorKind, int] = dict.fromkeys(BACKEND_ERROR_KINDS, 0)
            errors.update(b.errors)
            for kind, n in sorted(errors.items()):
                b_err.add_metric([b.name, kind], n)
        yield from (metric for metric, _ in families)
        yield b_err

    def _global(self, snap: GatewaySnapshot) -> Iterator[Metric]:
        stats = self._stats
        dispatches = CounterMetricFamily("vtc_dispatches", "Requests dispatched to backends.")
        dispatches.add_metric([], snap.dispatched_total)

        service: defaultdict[str, float] = defaultdict(float)
        backlogged: set[str] = set()
        gap = 0.0
        for ps in snap.pools:
            for ts in ps.tenants:
                service[ts.name] += ts.service / ts.weight
            backlogged.update(ps.backlogged)
            if len(ps.backlogged) >= 2:
                counters = [ts.counter for ts in ps.tenants if ts.name in ps.backlogged]
                gap = max(gap, max(counters) - min(counters))
        index, n = self._fairness.observe(self._clock(), service, backlogged)
        jain = GaugeMetricFamily(
            "vtc_fairness_jain_index",
            f"Jain's index of weight-normalised service over the last "
            f"{self._fairness.window_s:g} s among continuously backlogged tenants "
            "(1 = fair; 1 when fewer than two).",
            value=index,
        )
        covered = GaugeMetricFamily(
            "vtc_fairness_backlogged_tenants",
            "Tenants the Jain index covers (backlogged throughout its window).",
            value=n,
        )
        gap_m = GaugeMetricFamily(
            "vtc_backlogged_counter_gap",
            "Largest counter difference between tenants backlogged in the same model pool "
            "(VTC bounds it by 2U).",
            value=gap if math.isfinite(gap) else 0.0,
        )
        reloads = CounterMetricFamily(
            "vtc_config_reloads", "Configuration reloads by result.", labels=["result"]
        )
        for result in RELOAD_RESULTS:
            reloads.add_metric([result], stats.reloads.get(result, 0))
        last = GaugeMetricFamily(
            "vtc_config_last_reload_success_timestamp_seconds",
            "Unix time the configuration in force was loaded.",
            value=stats.last_reload_ok,
        )
        holds = CounterMetricFamily(
            "vtc_slot_holds",
            "Freed slots held for a resubmitting tenant's next request, by how the hold ended "
            "(used: its next request came; lapsed: scheduler.hold_ms passed, or still held).",
            labels=["result"],
        )
        holds.add_metric(["used"], snap.holds_used)
        holds.add_metric(["lapsed"], snap.holds_total - snap.holds_used)
        held = GaugeMetricFamily("vtc_slots_held", "Slots held right now.", value=snap.held)
        yield from (dispatches, jain, covered, gap_m, reloads, last, holds, held)


_N = TypeVar("_N", int, float)


def _zeros(stats: GatewayStats, tenants: Iterable[str], zero: _N) -> dict[str, _N]:
    """``zero`` for the label of each of ``tenants``: every configured tenant's series exists
    from the start (and from the reload that adds it), so a rate over it reads 0, not "no
    data"."""
    return dict.fromkeys((stats.label(t) for t in tenants), zero)


def _by_label(stats: GatewayStats, values: dict[str, int]) -> dict[str, int]:
    out: defaultdict[str, int] = defaultdict(int)
    for tenant, v in values.items():
        out[stats.label(tenant)] += v
    return out
