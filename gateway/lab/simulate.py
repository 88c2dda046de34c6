"""Discrete-event simulation in virtual time: the gateway's own code on a simulated engine.

No HTTP, no sleeping, no asyncio. One run wires together exactly the pure pieces that the live
system uses:

* the gateway's dispatch core (:class:`gateway.core.DispatchCore`): its scheduler holds the
  per-tenant queues and its dispatch loop takes the decisions, exactly as in the live gateway;
* the gateway's admission controller (:class:`gateway.admission.AdmissionController`) decides
  when the backend has room (``max_num_seqs`` and a KV-token budget, each request reserving
  ``prompt + max_tokens`` capped by the context length (:func:`gateway.core.reserved_output`;
  a request without ``max_tokens`` books the rest of the context, as the live gateway does),
  checked as a sum (``"reserve"``) or as S-LoRA's peak-future-memory estimate (``"peak"``):
  ``SimConfig.kv_admission``, by default the profile's own engine mode, used by the engine too
  unless ``SimConfig.engine_kv_admission`` says otherwise);
* the simulated backend's engine core (:class:`backends.sim.engine.EngineCore`) batches, fills
  the KV cache, preempts and times each step with the profile's cost model. Like vLLM it lowers
  a request's ``max_tokens`` (unset: the rest of the context) to fit the context.

The ``direct`` policy is the engine alone, what the backend does without the gateway: every
request goes to the engine at its arrival (an ``fcfs`` core whose admission never says no), so
the engine's own FCFS queue, KV admission and preemption decide; its throughput is what the
gateway's policies are compared with.

Events, in virtual time:

* an **arrival** is submitted to the scheduler at its arrival time (``QueueRejected`` -> the
  request is recorded as ``rejected``; a request that can never fit -> ``error``), then the
  core pumps; open-loop arrivals come from the workload's list, closed-loop ones (a client with
  N requests outstanding) ``think`` seconds after one of the client's requests finished;
* the core's **pump** (run whenever capacity may have freed) pops jobs while ``peek()`` fits the
  admission controller: pop, reserve, hand the request to the engine;
* an **engine step** starting at ``t`` ends at ``t + duration``; its outputs happen then: every
  token goes to ``scheduler.on_output``, a finished request to ``scheduler.finish`` and
  ``admission.release``, then the dispatcher runs. Arrivals during a step are handled at their
  own times (before the step's outputs), as the live gateway would.

The run continues until every request has finished (the paper's benchmark waits for all
responses), so throughput is measured over the whole run.

Replicas (``SimConfig.replicas``): each gateway replica is its own core in front of the one
engine, a request reaching one of them by ``SimConfig.ingress``. With ``vtc-local`` each
schedules on its own, booking the whole backend; with a policy a cluster shares, each is a
:class:`gateway.lab.replicas.ReplicaCore` claiming its slots from one shared fair order, the
cluster's own rule (:class:`gateway.cluster.rule.SharedState`, in memory), as live replicas do
through Redis: see :mod:`gateway.lab.replicas`.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import cast, get_args

from backends.sim.costmodel import KvAdmission as EngineKvAdmission
from backends.sim.costmodel import Profile, get_profile
from backends.sim.engine import EngineConfig, EngineCore
from common.context import ContextError, output_cap
from gateway.admission import AdmissionController, BackendSlots, KvAdmission, adapt_kv_scale
from gateway.core import CoreOptions, DispatchCore, Grant, reserved_output
from gateway.scheduler import CLUSTER_POLICIES, Job, Prices, QueueRejected

from .metrics import RequestRecord
from .replicas import ReplicaCore, SharedOrder, SharedStats
from .workloads import ClosedDraw, Workload

MODEL = "sim-model"
DEFAULT_PROFILE = "a10g-llama2-7b"

#: The engine alone, without the gateway's admission (see the module docstring).
DIRECT = "direct"
#: KV admission modes the simulated engine knows.
ENGINE_KV_ADMISSION: tuple[str, ...] = get_args(EngineKvAdmission)
#: Admission of the ``direct`` path: no limit of the gateway's own.
_UNLIMITED = 1 << 62

#: ``progress(done, total)`` is called now and then with finished/total request counts.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything a run needs besides the workload and the policy."""

    profile: str = DEFAULT_PROFILE
    kv_cache_tokens: int | None = None  # None: the profile's
    max_num_seqs: int | None = None  # None: the workload's, else the profile's
    rpm_limit: int = 5
    prices: Prices = field(default_factory=Prices)
    #: KV admission of the gateway *and* (when the engine has the mode) the engine; None: the
    #: profile's (``"peak"`` for the paper's a10g-llama2-7b; a vLLM-like ``"blocks"`` engine
    #: gets ``"reserve"`` in front)
    kv_admission: KvAdmission | None = None
    #: the engine's KV admission when it differs from the gateway's (``"blocks"``: vLLM's own,
    #: whatever the gateway does); None: as above
    engine_kv_admission: EngineKvAdmission | None = None
    #: context length of the engine (and the gateway's reservations); None: the profile's
    max_model_len: int | None = None
    #: how long a finished request's slot waits for its busy tenant's next request (the
    #: gateway's default ``scheduler.hold_ms``)
    hold_s: float = 0.05
    #: gateway replicas in front of the backend (see :func:`simulate`): with ``vtc`` and the
    #: other policies a cluster can share (``CLUSTER_POLICIES``) each replica claims its slots
    #: from one shared fair order, the cluster's own rule (:mod:`gateway.lab.replicas`), its
    #: output charges flushed with its claims and every ``sync_s``
    #: (``cluster.sync_interval_s``); ``vtc-local`` runs each replica on its own
    replicas: int = 1
    #: which replica a request reaches: ``uniform`` (round robin), ``skewed`` (each tenant
    #: always the same replica, tenants dealt out in order) or ``TENANT=R,...``
    ingress: str = "uniform"
    sync_s: float = 0.01
    #: how often the gateway reads the engine's metrics for admission feedback (the gateway's
    #: ``limits.feedback_interval_s``; 0: never)
    feedback_s: float = 1.0

    def engine_config(self, max_num_seqs: int | None = None) -> tuple[Profile, EngineConfig]:
        profile = get_profile(self.profile)
        cfg = EngineConfig.from_profile(
            profile,
            kv_cache_tokens=self.kv_cache_tokens,
            max_num_seqs=self.max_num_seqs if self.max_num_seqs is not None else max_num_seqs,
            max_model_len=self.max_model_len,
            kv_admission=self.engine_admission(),
        )
        return profile, cfg

    def engine_admission(self) -> EngineKvAdmission | None:
        """The engine's KV admission mode (None: the profile's)."""
        if self.engine_kv_admission is not None:
            return self.engine_kv_admission
        if self.kv_admission in ENGINE_KV_ADMISSION:
            return cast(EngineKvAdmission, self.kv_admission)
        return None

    def gateway_admission(self) -> KvAdmission:
        """The gateway's KV admission mode in this run."""
        if self.kv_admission is not None:
            return self.kv_admission
        # the paper's engine reserves (S-LoRA's peak check): the gateway in front does the same;
        # in front of a vLLM-like engine, the gateway's default
        return "peak" if get_profile(self.profile).kv_admission == "peak" else "predict"

    def core_options(self, policy: str) -> CoreOptions:
        """The gateway core's settings in a run of ``policy`` (:data:`LOCAL`: ``vtc`` on each
        replica; :data:`DIRECT`, the engine alone: ``fcfs``, no holds)."""
        direct = policy == DIRECT
        return CoreOptions(
            policy="vtc" if policy == LOCAL else "fcfs" if direct else policy,
            prices=self.prices,
            rpm_limit=self.rpm_limit,
            hold_s=0.0 if direct else self.hold_s,
        )


@dataclass(slots=True)
class SimResult:
    policy: str
    records: list[RequestRecord]
    kv_cache_tokens: int
    steps: int = 0
    preemptions: int = 0
    end_time: float = 0.0
    wall_seconds: float = 0.0
    max_engine_waiting: int = 0  # requests admitted by the gateway but queued inside the engine
    #: tenant -> (lifts, counter units the lifts added), from the scheduler (none for replicas
    #: sharing an order: the shared order lifts, not their schedulers)
    lifts: dict[str, tuple[int, float]] = field(default_factory=dict)
    #: tenant -> batch-slot seconds held (time-integral of the tenant's running requests)
    slot_seconds: dict[str, float] = field(default_factory=dict)
    #: replicas sharing one fair order: what they asked of it (None: no shared order)
    shared: SharedStats | None = None


#: The per-replica baseline of ``lab simulate --replicas``: every replica schedules on its own.
LOCAL = "vtc-local"


class _Run:
    """State of one simulation (one policy, one workload)."""

    def __init__(self, workload: Workload, policy: str, config: SimConfig) -> None:
        profile, cfg = config.engine_config(workload.max_num_seqs)
        self.cfg = cfg
        self.now = 0.0
        self.engine = EngineCore(cfg, profile.cost)
        self.replicas = max(1, config.replicas)
        self.local = policy == LOCAL
        if self.local and self.replicas < 2:
            raise ValueError(f"{LOCAL} needs replicas >= 2")
        direct = policy == DIRECT
        if direct and self.replicas > 1:
            raise ValueError(f"{DIRECT} is the engine alone: no replicas")
        #: the replicas' shared fair order (None: one process, or vtc-local)
        self.shared: SharedOrder | None = None
        if self.replicas > 1 and not self.local:
            if policy not in CLUSTER_POLICIES:
                raise ValueError(
                    f"{policy} cannot share its order across replicas (the cluster's policies: "
                    f"{', '.join(CLUSTER_POLICIES)}; or {LOCAL})"
                )
            self.shared = SharedOrder(config.sync_s)
        self.cores: list[DispatchCore] = []
        options = config.core_options(policy)
        for r in range(self.replicas):
            # vtc-local: each replica books the whole backend, unaware of the others
            backend = BackendSlots(
                "sim",
                frozenset({MODEL}),
                _UNLIMITED if direct else cfg.max_num_seqs,
                _UNLIMITED if direct else cfg.kv_cache_tokens,
                kv_admission="reserve" if direct else config.gateway_admission(),
            )
            core: DispatchCore
            if self.shared is not None:  # replicas claim through the shared order
                core = ReplicaCore(
                    f"r{r}", self.shared, [backend], self._granted, options, lambda: self.now
                )
            else:
                core = DispatchCore(
                    AdmissionController([backend]), self._granted, options, clock=lambda: self.now
                )
            configure_tenants(core, workload)
            self.cores.append(core)
        self.core = self.cores[0]
        self.admission = self.core.admission
        self._route = _ingress(config.ingress, list(workload.tenants), self.replicas)
        self.replica_of: dict[int, int] = {}  # request index -> replica
        self.workload = workload
        self.records = workload.new_records()
        #: request index -> (job, grant) while it runs
        self.jobs: dict[int, tuple[Job, Grant]] = {}
        self.owner: dict[int, int] = {}  # closed-loop request index -> client index
        # closed-loop arrivals to come: (time, order, client index)
        self.closed_due: list[tuple[float, int, int]] = []
        self._order = 0
        self._sizes: list[Iterator[ClosedDraw]] = []
        self._think: dict[int, float] = {}  # closed-loop request index -> think after it
        self._limits: dict[int, int] = {}  # queued request index -> the engine's max_tokens
        for ci, client in enumerate(workload.closed):
            self._sizes.append(client.sizes(workload.seed, ci))
            for _ in range(client.concurrency):
                self._due(client.start, ci)
        self.done = 0
        self.max_engine_waiting = 0
        #: engine feedback, as the live gateway reads it (limits.feedback_interval_s)
        self._feedback_s = config.feedback_s
        self._feedback_at = config.feedback_s if config.feedback_s > 0 else float("inf")
        self._preempted_seen = 0
        self.slot_seconds: dict[str, float] = {}
        self._slot_mark = 0.0

    # -- arrivals ----------------------------------------------------------------------------
    def _due(self, t: float, client: int) -> None:
        if t < self.workload.closed_end(self.workload.closed[client]):
            self._order += 1
            heapq.heappush(self.closed_due, (t, self._order, client))

    def next_closed(self) -> float | None:
        return self.closed_due[0][0] if self.closed_due else None

    def arrive_closed(self) -> None:
        t, _, ci = heapq.heappop(self.closed_due)
        draw = next(self._sizes[ci])
        index = len(self.records)
        self.records.append(draw.record(self.workload.closed[ci].name, t))
        self.owner[index] = ci
        self._think[index] = draw.think
        self._submit(index, t)

    def arrive(self, index: int) -> None:
        self._submit(index, self.workload.requests[index].arrival_s)

    def _submit(self, index: int, t: float) -> None:
        self._account_slots(t)
        self.now = t
        rec = self.records[index]
        prompt = rec.prompt_tokens
        try:  # vLLM's rule: max_tokens (unset: the rest of the context) lowered to fit it
            limit = output_cap(prompt, rec.max_tokens, self.cfg.max_model_len)
        except ContextError:
            limit = 0
        # the gateway books that cap, as the live one does (rec.max_tokens: what was sent)
        reserve = reserved_output(prompt, limit, self.cfg.max_model_len)
        job = Job(rec.tenant, prompt, reserve, t, MODEL)
        job.payload = index
        if self.engine.check_request(prompt, limit) is not None or (
            not self.admission.can_ever_fit(MODEL, prompt + reserve)
        ):
            self._end(index, "error")  # the gateway answers 400: never queued
            return
        rec.output_tokens = min(rec.output_tokens, limit)
        self._limits[index] = limit
        replica = self._route(rec.tenant, index)
        self.replica_of[index] = replica
        core = self.cores[replica]
        try:
            core.submit(job)
        except QueueRejected as exc:
            self._end(index, "rejected", exc.retry_after)
            return
        core.pump(MODEL)
        self._settle()

    def _end(self, index: int, status: str, retry_after: float = 0.0) -> None:
        """Record the outcome; a closed-loop client sends its next request ``think`` seconds
        later (a rejected one no sooner than ``retry_after``; one that can never run ends that
        client's loop)."""
        rec = self.records[index]
        rec.status = status
        self.done += 1
        ci = self.owner.pop(index, None)
        if ci is not None:
            think = self._think.pop(index)
            if status == "error":
                return
            end = rec.finish_s if rec.finish_s is not None else self.now
            self._due(end + max(think, retry_after), ci)

    def _granted(self, job: Job, grant: Grant) -> None:
        index: int = job.payload
        self.jobs[index] = (job, grant)
        rec = self.records[index]
        limit = self._limits.pop(index)
        self.engine.add_request(str(index), job.prompt_tokens, limit, rec.output_tokens, self.now)

    def _account_slots(self, t: float) -> None:
        """Integrate each tenant's running requests over time (slot-seconds)."""
        dt = t - self._slot_mark
        if dt > 0:
            acc = self.slot_seconds
            for core in self.cores:
                for tenant, n in core.running.items():
                    if n:
                        acc[tenant] = acc.get(tenant, 0.0) + n * dt
            self._slot_mark = t

    def _settle(self) -> None:
        """Shared order: deliver the wake-ups its last operations published."""
        if self.shared is not None:
            self.shared.settle()

    # -- engine ------------------------------------------------------------------------------
    def step(self, now: float, next_arrival: int) -> tuple[float, int]:
        """Run one engine step from ``now``; returns (end time, index of the next arrival)."""
        res = self.engine.step(now)
        end = res.end
        i = self.arrive_until(next_arrival, end, inclusive=False)
        self._account_slots(end)
        self.now = end
        for core in self.cores:
            core.expire_holds(end)
        self._settle()
        records, cores, replica_of = self.records, self.cores, self.replica_of
        # shared order with sync_s = 0: every charge reaches it as it is made
        flush = self.shared is not None and not self.shared.sync_s
        for out in res.outputs:
            index = int(out.req_id)
            job, grant = self.jobs[index]
            rec = records[index]
            core = cores[replica_of[index]]
            if out.first_token:
                rec.first_token_s = end
            if out.new_tokens:
                core.on_output(job, grant, out.new_tokens)
                if flush:
                    cast(ReplicaCore, core).sync()
            if out.finished:
                rec.finish_s = end
                rec.output_tokens = job.output_tokens
                del self.jobs[index]
                core.release(job, grant)
                self._settle()
                self._end(index, "ok")
        if end >= self._feedback_at:
            self._feedback(end)
        if self.shared is not None:
            # replicas claim on their own events, wake-ups and sync ticks, as live ones do
            self.shared.tick(end)
        else:
            for core in self.cores:
                core.pump(MODEL)
        waiting = self.engine.num_waiting
        if waiting > self.max_engine_waiting and self.engine.num_running:
            self.max_engine_waiting = waiting
        return end, i

    def _feedback(self, now: float) -> None:
        """What the live gateway's feedback loop does every ``feedback_s``: read the engine's
        queue, preemptions and KV use and adapt each replica's ``"predict"`` budget."""
        engine = self.engine
        preempted = engine.num_preemptions - self._preempted_seen
        self._preempted_seen = engine.num_preemptions
        for core in self.cores:
            for backend in core.admission.backends():
                adapt_kv_scale(
                    backend,
                    waiting=engine.num_waiting,
                    preempted=preempted,
                    kv_usage=engine.kv_usage,
                    gateway_queued=core.total_queued(),
                    running=engine.num_running,
                )
        while self._feedback_at <= now:
            self._feedback_at += self._feedback_s

    def arrive_until(self, i: int, t: float, inclusive: bool = True) -> int:
        """Handle every arrival before ``t`` (at ``t`` too when ``inclusive``), in time order;
        returns the index of the next open-loop arrival."""
        reqs = self.workload.requests
        n = len(reqs)
        while True:
            open_t = reqs[i].arrival_s if i < n else None
            closed_t = self.next_closed()
            if open_t is not None and (closed_t is None or open_t <= closed_t):
                if open_t > t or (open_t == t and not inclusive):
                    return i
                self._expire(open_t)
                self.arrive(i)
                i += 1
            elif closed_t is not None:
                if closed_t > t or (closed_t == t and not inclusive):
                    return i
                self._expire(closed_t)
                self.arrive_closed()
            else:
                return i

    def _next_hold_expiry(self) -> float | None:
        times = [t for c in self.cores if (t := c.next_hold_expiry()) is not None]
        return min(times) if times else None

    def _expire(self, t: float) -> None:
        nxt = self._next_hold_expiry()
        if nxt is not None and nxt <= t:
            self._account_slots(nxt)
            self.now = nxt
            for core in self.cores:
                core.expire_holds(nxt)
            self._settle()

    def next_arrival(self, i: int) -> float | None:
        """The next event while the engine is idle: an arrival or a held slot lapsing."""
        reqs = self.workload.requests
        times = [reqs[i].arrival_s] if i < len(reqs) else []
        for t in (self.next_closed(), self._next_hold_expiry()):
            if t is not None:
                times.append(t)
        return min(times) if times else None


def simulate(
    workload: Workload,
    policy: str,
    config: SimConfig | None = None,
    progress: ProgressFn | None = None,
) -> SimResult:
    """Run ``workload`` under ``policy`` to completion; one record per workload request (the
    open-loop ones first, in workload order, then closed-loop requests in arrival order)."""
    config = config or SimConfig()
    started = time.perf_counter()
    if workload.quota_tpm is not None:  # a hosted API's rate budget: gateway.lab.quota
        from .quota import QuotaRun

        run: _Run = QuotaRun(workload, policy, config)
    else:
        run = _Run(workload, policy, config)
    n = len(workload.requests)
    now = 0.0
    i = 0
    steps = 0
    engine = run.engine
    while True:
        i = run.arrive_until(i, now)
        if engine.has_unfinished():
            now, i = run.step(now, i)
            steps += 1
            if progress is not None and steps % 2000 == 0:
                progress(run.done, max(n, len(run.records)))
        else:
            nxt = run.next_arrival(i)
            if nxt is None:
                break
            now = nxt
            run._expire(now)
    if any(c.total_queued() for c in run.cores):  # pragma: no cover - dispatch invariant
        raise RuntimeError("simulation ended with requests still queued in the scheduler")
    if progress is not None:
        progress(run.done, len(run.records))
    run._account_slots(now)
    return SimResult(
        policy=policy,
        records=run.records,
        kv_cache_tokens=run.cfg.kv_cache_tokens,
        steps=steps,
        preemptions=engine.num_preemptions,
        end_time=now,
        wall_seconds=time.perf_counter() - started,
        max_engine_waiting=run.max_engine_waiting,
        lifts=_merged_lifts(run.cores),
        slot_seconds=run.slot_seconds,
        shared=run.shared.stats if run.shared is not None else None,
    )


def configure_tenants(core: DispatchCore, workload: Workload) -> None:
    """The workload's tenants on ``core``: the tree's groups (parents first), weights, tiers
    and caps when it has one; tenants outside the tree at the top level."""
    nodes = {n.name: n for n in workload.tree}
    for node in workload.tree:
        if not node.leaf:
            t = node.config
            core.set_group(t.name, t.weight, t.max_in_flight, node.priority, node.parent)
    for tenant, weight in workload.tenants.items():
        leaf = nodes.get(tenant)
        if leaf is None:
            core.set_tenant(tenant, weight)
        else:
            t = leaf.config
            core.set_tenant(tenant, weight, t.max_in_flight, leaf.priority, leaf.parent)


def _merged_lifts(cores: list[DispatchCore]) -> dict[str, tuple[int, float]]:
    out: dict[str, tuple[int, float]] = {}
    for core in cores:
        for tenant, (count, units) in core.pool(MODEL).lift_stats().items():
            c, u = out.get(tenant, (0, 0.0))
            out[tenant] = (c + count, u + units)
    return out


def _ingress(spec: str, tenants: list[str], replicas: int) -> Callable[[str, int], int]:
    """``(tenant, request index) -> replica`` for an ingress spec (see :class:`SimConfig`)."""
    if replicas == 1:
        return lambda tenant, index: 0
    if spec == "uniform":
        return lambda tenant, index: index % replicas
    if spec == "skewed":
        pinned = {t: i % replicas for i, t in enumerate(tenants)}
        return lambda tenant, index: pinned.get(tenant, 0)
    mapping: dict[str, int] = {}
    for item in spec.split(","):
        tenant, sep, replica = item.partition("=")
        if not sep or not replica.strip().isdigit() or int(replica) >= replicas:
            raise ValueError(
                f"ingress {spec!r}: expected uniform, skewed or TENANT=R,... with R < {replicas}"
            )
        mapping[tenant.strip()] = int(replica)
    return lambda tenant, index: mapping.get(tenant, index % replicas)


def simulate_many(
    workload: Workload,
    policies: Sequence[str],
    config: SimConfig | None = None,
    progress: Callable[[str], ProgressFn | None] | None = None,
) -> dict[str, SimResult]:
    """The same workload under several policies, side by side."""
    return {
        p: simulate(workload, p, config, progress(p) if progress is not None else None)
        for p in policies
    }
