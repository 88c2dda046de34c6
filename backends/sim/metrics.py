"""Prometheus metrics with vLLM's names, one ``CollectorRegistry`` per app.

Names and labels as vLLM v1 (0.32) exports them (vllm/v1/metrics/loggers.py): labels
``model_name`` and ``engine`` (``"0"``); gauges read the engine core at scrape time, so they are
exact; ``vllm:cache_config_info`` is a gauge set to 1 whose labels carry the cache config
(``num_gpu_blocks``, ``block_size``, ``kv_cache_size_tokens``, ...), which the gateway uses to
discover KV capacity. Names vLLM dropped (``gpu_cache_usage_perc``,
``time_per_output_token_seconds``) are not exported.

With a quota (provider mode) the simulator adds its own ``sim:`` metrics, read from the
:class:`~backends.sim.ratelimit.RateLimiter` at scrape time: ``sim:ratelimit_accepted_requests``,
``sim:ratelimit_accepted_tokens`` and ``sim:ratelimit_refused_requests{reason}`` (counters),
``sim:ratelimit_window_requests`` and ``sim:ratelimit_window_tokens`` (what the sliding window
holds now).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from backends.sim.engine import EngineCore
from backends.sim.ratelimit import RateLimiter

__all__ = ["SimMetrics"]

_LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


class SimMetrics:
    """The server's metrics; call the ``on_*`` methods as events happen."""

    def __init__(
        self,
        core: EngineCore,
        model_name: str,
        engine: str = "0",
        limiter: RateLimiter | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        labels = ("model_name", "engine")
        values = (model_name, engine)
        reg = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=reg).labels(*values)

        gauge(
            "vllm:num_requests_running", "Number of requests in model execution batches."
        ).set_function(lambda: core.num_running)
        gauge(
            "vllm:num_requests_waiting", "Number of requests waiting to be processed."
        ).set_function(lambda: core.num_waiting)
        gauge(
            "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."
        ).set_function(lambda: core.kv_usage)

        cfg = core.config
        info = {
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "False",
            "gpu_memory_utilization": "0.9",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_blocks),
            "kv_cache_size_tokens": str(cfg.num_blocks * cfg.block_size),
            "engine": engine,
        }
        Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            tuple(info),
            registry=reg,
        ).labels(**info).set(1)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=reg).labels(*values)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.preemptions = counter(
            "vllm:num_preemptions", "Cumulative number of preemption from the engine."
        )
        self._success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*labels, "finished_reason"),
            registry=reg,
        )
        self._success_children = {
            reason: self._success.labels(model_name, engine, reason)
            for reason in ("stop", "length", "abort")
        }

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=reg).labels(*values)

        self.ttft = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            _LATENCY_BUCKETS,
        )
        self.e2e = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            _E2E_BUCKETS,
        )
        self.queue_time = histogram(
            "vllm:request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            _E2E_BUCKETS,
        )
        self.itl = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            _ITL_BUCKETS,
        )
        self.tpot = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            _ITL_BUCKETS,
        )
        if limiter is not None:
            reg.register(_RateLimitCollector(limiter, values))

    def on_finished(self, reason: str) -> None:
        """Count a finished request by reason (``stop``, ``length`` or ``abort``)."""
        child = self._success_children.get(reason)
        if child is not None:
            child.inc()


class _RateLimitCollector(Collector):
    """The quota's counters and window usage, exact at scrape time."""

    def __init__(self, limiter: RateLimiter, values: tuple[str, str]) -> None:
        self._limiter = limiter
        self._values = list(values)

    def collect(self) -> Iterator[Metric]:
        rl, values, labels = self._limiter, self._values, ["model_name", "engine"]
        requests, tokens = rl.usage(time.monotonic())
        for name, doc, value in (
            (
                "sim:ratelimit_accepted_requests",
                "Requests accepted by the quota.",
                rl.accepted_requests,
            ),
            (
                "sim:ratelimit_accepted_tokens",
                "Tokens (prompt + output) charged to the quota.",
                rl.accepted_tokens,
            ),
        ):
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric(values, value)
            yield family
        refused = CounterMetricFamily(
            "sim:ratelimit_refused_requests",
            "Requests refused with 429, by the limit that refused them.",
            labels=[*labels, "reason"],
        )
        for reason, count in rl.refused.items():
            refused.add_metric([*values, reason], count)
        yield refused
        for name, doc, value in (
            (
                "sim:ratelimit_window_requests",
                "Requests counted in the sliding window now.",
                requests,
            ),
            ("sim:ratelimit_window_tokens", "Tokens counted in the sliding window now.", tokens),
        ):
            gauge = GaugeMetricFamily(name, doc, labels=labels)
            gauge.add_metric(values, value)
            yield gauge
