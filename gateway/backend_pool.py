"""The backends behind the gateway: discovery, health, failure marking.

At start-up each backend is asked for its models (``GET /v1/models``, which also gives
``max_model_len``) and, when ``max_kv_tokens`` is not configured, its KV capacity
(``vllm:cache_config_info`` on ``/metrics``: ``num_gpu_blocks * block_size``). A backend that
cannot be reached starts *down* and is probed again by the health loop.

A backend is marked down after ``failure_threshold`` consecutive failures to take a request
(refused, 5xx before streaming); the health loop (``GET /health`` every ``health_interval_s``)
brings it back and wakes the dispatcher. A backend that comes back (after being down, or after
a failure that may have been a restart: unreachable, broken stream) is discovered again before
it takes work: a restarted vLLM may serve another context length or KV cache size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .admission import AdmissionController, BackendSlots, Quota, adapt_kv_scale, adapt_seq_cap
from .config import BackendConfig
from .engines import Engine, EngineLoad, engine_for
from .errors import BackendError
from .metrics import BackendSnapshot
from .outcomes import BackendErrorKind
from .upstream import Upstream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BackendState:
    config: BackendConfig
    slots: BackendSlots
    engine: Engine
    max_model_len: dict[str, int | None] = field(default_factory=dict)
    discovered: bool = False
    #: something suggested a restart since the last discovery: discover again on next check
    stale: bool = False
    failures: int = 0
    errors: dict[BackendErrorKind, int] = field(default_factory=dict)  # kind -> count
    #: the engine's preemption counter at the last feedback step (None: not read yet)
    preemptions: float | None = None
    #: engine preemptions seen since the gateway started (for metrics)
    preemptions_seen: float = 0.0
    #: 429s the backend (a rate-limited provider) answered
    rate_limited: int = 0

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def url(self) -> str:
        return self.config.url


class BackendPool:
    failure_threshold = 3

    def __init__(
        self,
        configs: tuple[BackendConfig, ...],
        upstream: Upstream,
        admission: AdmissionController,
        on_capacity: Callable[[BackendSlots], None],
        health_interval: float = 5.0,
        queued_for: Callable[[BackendSlots], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_capacity(slots)``: a backend has (more) room, dispatch to it;
        ``queued_for(slots)``: requests queued for the models that backend serves (adaptive
        admission grows its cap only while they have a queue)."""
        self.upstream = upstream
        self.admission = admission
        self._on_capacity = on_capacity
        self._queued_for = queued_for
        self.health_interval = health_interval
        self.clock = clock
        self.feedback_interval = 1.0
        self.states: dict[str, BackendState] = {}
        for cfg in configs:
            slots = BackendSlots(
                name=cfg.name,
                models=frozenset(cfg.models),
                max_num_seqs=cfg.max_num_seqs,
                max_kv_tokens=cfg.max_kv_tokens or cfg.max_num_seqs * (cfg.max_model_len or 8192),
                healthy=False,
                kv_admission=cfg.kv_admission,
            )
            if cfg.tpm is not None or cfg.rpm is not None:
                slots.quota = Quota(cfg.tpm, cfg.rpm, cfg.quota_window_s, clock)
            self.states[cfg.name] = BackendState(cfg, slots, engine_for(cfg.kind))
            admission.add(slots)

    # -- discovery ---------------------------------------------------------------------------
    async def discover_all(self) -> None:
        await asyncio.gather(*(self._discover(s) for s in self.states.values()))

    async def _discover(self, st: BackendState) -> None:
        cfg = st.config
        engine = st.engine
        try:
            models = await self.upstream.models(cfg.url)
            cache = None
            if engine.has_metrics and (cfg.max_kv_tokens is None or cfg.kv_admission == "predict"):
                try:
                    cache = engine.kv_cache(await self.upstream.metrics_text(cfg.url))
                except BackendError:
                    if cfg.max_kv_tokens is None:
                        raise
            kv = None if cache is None or cfg.max_kv_tokens is not None else cache.tokens
        except BackendError as exc:  # stay down, the health loop retries
            log.warning(
                "backend %s: discovery failed (%s); marked down", cfg.name, exc.__class__.__name__
            )
            st.slots.healthy = False
            return
        served = {m.id: m.max_model_len for m in models}
        names = cfg.models or tuple(served)
        st.max_model_len = {n: cfg.max_model_len or served.get(n) for n in names}
        st.slots.models = frozenset(names)
        if cache is not None:
            st.slots.block_size = cache.block_size  # "predict" rounds each request to blocks
        if kv is not None:
            st.slots.max_kv_tokens = kv
        elif cfg.max_kv_tokens is None:
            longest = max((v for v in st.max_model_len.values() if v), default=8192)
            st.slots.max_kv_tokens = cfg.max_num_seqs * longest
            log.log(
                logging.WARNING if engine.has_metrics else logging.DEBUG,
                "backend %s: no KV capacity from the backend; KV budget set to "
                "max_num_seqs * max_model_len = %d tokens",
                cfg.name,
                st.slots.max_kv_tokens,
            )
        st.discovered = True
        st.stale = False
        st.failures = 0
        st.slots.healthy = True
        log.info(
            "backend %s up: models=%s max_num_seqs=%d max_kv_tokens=%d",
            cfg.name,
            sorted(st.slots.models),
            st.slots.max_num_seqs,
            st.slots.max_kv_tokens,
        )
        self._on_capacity(st.slots)

    # -- health ------------------------------------------------------------------------------
    def record_failure(self, name: str, kind: BackendErrorKind) -> None:
        st = self.states.get(name)
        if st is None:
            return
        st.errors[kind] = st.errors.get(kind, 0) + 1
        st.stale = True
        if kind in ("unreachable", "error_before_stream"):
            st.failures += 1
            if st.failures >= self.failure_threshold and st.slots.healthy:
                st.slots.healthy = False
                log.warning(
                    "backend %s marked down after %d consecutive failures", name, st.failures
                )

    def record_success(self, name: str) -> None:
        st = self.states.get(name)
        if st is not None:
            st.failures = 0

    async def health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            await self.check_once()

    async def feedback_loop(self) -> None:
        """Engine feedback every ``feedback_interval`` seconds (:meth:`feedback_once`)."""
        while True:
            await asyncio.sleep(self.feedback_interval)
            await self.feedback_once()

    async def quota_loop(self) -> None:
        """Wake the dispatcher when a rate budget can take more: sleep until the earliest
        moment a quota backend's window lets a booking go (or its back-off ends), then pump
        its models if requests wait for it. Idle backends are looked at every second."""
        while True:
            delay = 1.0
            for st in self.states.values():
                quota = st.slots.quota
                if quota is None:
                    continue
                wait = quota.next_change()
                if wait is not None:
                    delay = min(delay, wait + 0.001)
            await asyncio.sleep(delay)
            for st in self.states.values():
                slots = st.slots
                if (
                    slots.quota is not None
                    and slots.healthy
                    and (self._queued_for is None or self._queued_for(slots) > 0)
                ):
                    self._on_capacity(slots)

    def rate_limited(self, name: str, headers: Mapping[str, str]) -> float:
        """A provider's 429 with ``headers``: its budget backs off for ``Retry-After`` (1 s
        when absent); returns the delay."""
        st = self.states.get(name)
        delay = retry_after(headers)
        if st is not None:
            if st.slots.quota is None:
                st.slots.quota = Quota(None, None, st.config.quota_window_s, self.clock)
            self.learn_rates(name, headers)
            st.slots.quota.back_off(delay)
            st.rate_limited += 1
            log.info("backend %s rate limited; pausing %.2f s", name, delay)
        return delay

    def learn_rates(self, name: str, headers: Mapping[str, str]) -> None:
        """Limits a provider announced (``x-ratelimit-limit-tokens``, ``-requests``) for a
        backend whose config leaves them unset."""
        st = self.states.get(name)
        if st is None or not headers:
            return
        tpm = _int_header(headers, "x-ratelimit-limit-tokens")
        rpm = _int_header(headers, "x-ratelimit-limit-requests")
        if tpm is None and rpm is None:
            return
        cfg = st.config
        quota = st.slots.quota
        if quota is None:
            quota = st.slots.quota = Quota(tpm, rpm, cfg.quota_window_s, self.clock)
        quota.learn(tpm if cfg.tpm is None else None, rpm if cfg.rpm is None else None)

    async def feedback_once(self) -> None:
        """Read each healthy backend's ``/metrics`` once and adapt its admission: the KV
        budget of ``"predict"`` backends (:func:`adapt_kv_scale`) and, with ``adaptive``, the
        sequence cap (:func:`adapt_seq_cap`)."""
        for st in list(self.states.values()):
            if (
                st.discovered
                and st.slots.healthy
                and st.engine.has_metrics
                and (st.config.adaptive or st.slots.kv_admission == "predict")
            ):
                await self._adapt(st)

    async def check_once(self) -> None:
        for st in list(self.states.values()):
            if not st.discovered:
                await self._discover(st)
                continue
            ok = await self.upstream.healthy(st.url, st.engine.health_path)
            if ok and (st.stale or not st.slots.healthy):
                # back (or maybe restarted): its context length or KV size may have changed
                log.info("backend %s healthy again; discovering it again", st.name)
                await self._discover(st)
            elif not ok:
                st.stale = True
                if st.slots.healthy:
                    st.slots.healthy = False
                    log.warning("backend %s failed its health check; marked down", st.name)

    async def remote_count(self, model: str, body: dict[str, Any], chat: bool) -> int | None:
        """Prompt tokens as a backend serving ``model`` counts them (``POST /tokenize``), or
        None when no healthy backend answers (the caller falls back to its own count)."""
        payload: dict[str, Any] = {"model": model}
        if chat:
            payload["messages"] = body.get("messages")
        else:
            payload["prompt"] = body.get("prompt")
        for st in self.states.values():
            if model not in st.slots.models or not st.slots.healthy or not st.engine.has_tokenize:
                continue
            try:
                count = await self.upstream.tokenize(st.url, payload)
            except BackendError:
                continue
            if count is not None:
                return count
        return None

    async def _adapt(self, st: BackendState) -> None:
        """Admission feedback from the engine's own view: its queue, preemptions, KV use."""
        try:
            text = await self.upstream.metrics_text(st.url)
        except BackendError:
            return  # the health check decides about the backend itself
        load = st.engine.load(text)
        if load is None:
            return
        waiting, running = load.waiting, load.running
        slots = st.slots
        queued = self._queued_for(slots) if self._queued_for is not None else 0
        grew = slots.kv_admission == "predict" and self._adapt_kv(st, load, queued)
        if st.config.adaptive:
            before = slots.seq_cap
            if adapt_seq_cap(slots, int(waiting), int(running), queued):
                grew = True
            if slots.seq_cap != before:
                log.info(
                    "backend %s: sequence cap %s -> %s (backend waiting %d, running %d)",
                    st.name,
                    before,
                    slots.seq_cap,
                    waiting,
                    running,
                )
        if grew:
            self._on_capacity(slots)

    @staticmethod
    def _adapt_kv(st: BackendState, load: EngineLoad, queued: int) -> bool:
        """``predict`` admission: the KV budget's scale from the engine's queue and
        preemptions; True when it grew."""
        slots = st.slots
        if load.block_size is not None:
            slots.block_size = load.block_size
        total = load.preemptions_total
        preempted = 0.0
        if total is not None:
            if st.preemptions is not None and total >= st.preemptions:
                preempted = total - st.preemptions
            st.preemptions = total
            st.preemptions_seen += preempted
        scale = slots.kv_scale
        grew = adapt_kv_scale(
            slots,
            waiting=load.waiting,
            preempted=preempted,
            kv_usage=load.kv_usage,
            gateway_queued=queued,
            running=load.running,
        )
        if slots.kv_scale != scale and (slots.kv_scale < 1.0 or preempted):
            log.info(
                "backend %s: KV budget scale %.2f -> %.2f (waiting %d, running %d, preempted %d)",
                st.name,
                scale,
                slots.kv_scale,
                load.waiting,
                load.running,
                preempted,
            )
        return grew

    # -- queries -----------------------------------------------------------------------------
    def snapshot(self) -> tuple[BackendSnapshot, ...]:
        """Each backend's state and load as plain data (for /health and the metrics)."""
        return tuple(
            BackendSnapshot(
                name=st.name,
                up=st.slots.healthy,
                models=st.slots.models,
                in_flight=st.slots.in_flight,
                reserved_tokens=st.slots.reserved_tokens,
                max_num_seqs=st.slots.max_num_seqs,
                seq_cap=st.slots.cap,
                max_kv_tokens=st.slots.max_kv_tokens,
                admitted_total=st.slots.admitted_total,
                errors=dict(st.errors),
                kv_scale=st.slots.kv_scale,
                engine_preemptions=st.preemptions_seen,
            )
            for st in self.states.values()
        )

    def max_model_len(self, model: str) -> int | None:
        """The smallest context length among backends serving ``model`` (None: unknown)."""
        lens = [
            st.max_model_len.get(model) for st in self.states.values() if model in st.slots.models
        ]
        known = [n for n in lens if n]
        return min(known) if known else None

    def serves(self, model: str) -> bool:
        return any(model in st.slots.models for st in self.states.values())

    def models(self) -> list[dict[str, Any]]:
        seen: dict[str, dict[str, Any]] = {}
        for st in self.states.values():
            for m in sorted(st.slots.models):
                if m not in seen:
                    seen[m] = {
                        "id": m,
                        "object": "model",
                        "created": 0,
                        "owned_by": "vllm",
                        "root": m,
                        "parent": None,
                        "max_model_len": self.max_model_len(m),
                    }
        return list(seen.values())


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    try:
        return int(headers[name])
    except (KeyError, ValueError):
        return None


def retry_after(headers: Mapping[str, str], default: float = 1.0) -> float:
    """Seconds a 429 asks to wait: ``retry-after-ms``, else ``Retry-After`` (seconds), else
    ``default``; at most 60."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw) * scale
        except ValueError:
            continue
        if value >= 0:
            return min(value, 60.0)
    return default
