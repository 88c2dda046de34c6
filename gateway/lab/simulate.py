"""Discrete-event simulation in virtual time: the gateway's own code on a simulated engine.

No HTTP, no sleeping, no asyncio. One run wires together exactly the pure pieces that the live
system uses:

* the gateway's scheduler (:func:`gateway.scheduler.make_scheduler`) holds the per-tenant queues;
* the gateway's admission controller (:class:`gateway.admission.AdmissionController`) decides
  when the backend has room (``max_num_seqs`` and a KV-token budget, each request reserving
  ``prompt + max_tokens`` capped by the context length, checked as a sum (``"reserve"``) or as
  S-LoRA's peak-future-memory estimate (``"peak"``): ``SimConfig.kv_admission``, by default the
  profile's own engine mode, used by the engine too);
* the simulated backend's engine core (:class:`backends.sim.engine.EngineCore`) batches, fills
  the KV cache, preempts and times each step with the profile's cost model.

Events, in virtual time:

* an **arrival** is submitted to the scheduler at its arrival time (``QueueRejected`` -> the
  request is recorded as ``rejected``; a request that can never fit -> ``error``), then the
  dispatcher runs;
* the **dispatcher** (run whenever capacity may have freed) pops jobs while ``peek()`` fits the
  admission controller: pop, reserve, hand the request to the engine;
* an **engine step** starting at ``t`` ends at ``t + duration``; its outputs happen then: every
  token goes to ``scheduler.on_output``, a finished request to ``scheduler.finish`` and
  ``admission.release``, then the dispatcher runs. Arrivals during a step are handled at their
  own times (before the step's outputs), as the live gateway would.

The run continues until every request has finished (the paper's benchmark waits for all
responses), so throughput is measured over the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backends.sim.costmodel import Profile, get_profile
from backends.sim.engine import EngineConfig, EngineCore
from gateway.admission import AdmissionController, BackendSlots, KvAdmission, Reservation
from gateway.scheduler import Job, Prices, QueueRejected, make_scheduler

from .metrics import RequestRecord
from .workloads import Workload

MODEL = "sim-model"
DEFAULT_PROFILE = "a10g-llama2-7b"

#: ``progress(done, total)`` is called now and then with finished/total request counts.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything a run needs besides the workload and the policy."""

    profile: str = DEFAULT_PROFILE
    kv_cache_tokens: int | None = None  # None: the profile's
    max_num_seqs: int | None = None  # None: the profile's
    rpm_limit: int = 5
    prices: Prices = field(default_factory=Prices)
    #: KV admission of the gateway *and* the engine; None: the profile's (``"peak"`` for the
    #: paper's a10g-llama2-7b; a vLLM-like ``"blocks"`` engine gets ``"reserve"`` in front)
    kv_admission: KvAdmission | None = None

    def engine_config(self) -> tuple[Profile, EngineConfig]:
        profile = get_profile(self.profile)
        cfg = EngineConfig.from_profile(
            profile,
            kv_cache_tokens=self.kv_cache_tokens,
            max_num_seqs=self.max_num_seqs,
            kv_admission=self.kv_admission,
        )
        return profile, cfg

    def gateway_admission(self) -> KvAdmission:
        """The gateway's KV admission mode in this run."""
        if self.kv_admission is not None:
            return self.kv_admission
        return "peak" if get_profile(self.profile).kv_admission == "peak" else "reserve"


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


class _Run:
    """State of one simulation (one policy, one workload)."""

    def __init__(self, workload: Workload, policy: str, config: SimConfig) -> None:
        profile, cfg = config.engine_config()
        self.cfg = cfg
        self.engine = EngineCore(cfg, profile.cost)
        self.sched = make_scheduler(policy, config.prices, rpm_limit=config.rpm_limit)
        for tenant, weight in workload.tenants.items():
            self.sched.set_tenant(tenant, weight)
        self.backend = BackendSlots(
            "sim",
            frozenset({MODEL}),
            cfg.max_num_seqs,
            cfg.kv_cache_tokens,
            kv_admission=config.gateway_admission(),
        )
        self.admission = AdmissionController([self.backend])
        self.workload = workload
        self.records = [
            RequestRecord(r.tenant, r.arrival_s, None, None, r.prompt_tokens, r.output_tokens, "ok")
            for r in workload.requests
        ]
        self.jobs: dict[str, tuple[Job, Reservation, int]] = {}
        self.done = 0
        self.max_engine_waiting = 0

    def reserve_tokens(self, job: Job) -> int:
        """What the gateway reserves: prompt + max_tokens, capped by the context length."""
        room = max(0, self.cfg.max_model_len - job.prompt_tokens)
        return job.prompt_tokens + min(job.max_tokens, room)

    def arrive(self, index: int) -> None:
        req = self.workload.requests[index]
        rec = self.records[index]
        job = Job(req.tenant, req.prompt_tokens, req.output_tokens, req.arrival_s, MODEL)
        job.payload = index
        if self.engine.check_request(req.prompt_tokens, req.output_tokens) is not None or (
            not self.admission.can_ever_fit(MODEL, self.reserve_tokens(job))
        ):
            rec.status = "error"  # the gateway answers 400: never queued
            self.done += 1
            return
        try:
            self.sched.submit(job, req.arrival_s)
        except QueueRejected:
            rec.status = "rejected"
            self.done += 1
            return
        self.dispatch(req.arrival_s)

    def dispatch(self, now: float) -> None:
        sched, admission = self.sched, self.admission
        while True:
            job = sched.peek(now)
            if job is None:
                return
            tokens = self.reserve_tokens(job)
            backend = admission.place(MODEL, tokens, prompt=job.prompt_tokens)
            if backend is None:
                return
            popped = sched.pop(now)
            assert popped is job, "peek() and pop() disagree"
            reservation = admission.reserve(backend, tokens, job.prompt_tokens)
            index: int = job.payload
            req_id = str(index)
            self.jobs[req_id] = (job, reservation, index)
            self.engine.add_request(req_id, job.prompt_tokens, job.max_tokens, job.max_tokens, now)

    def step(self, now: float, next_arrival: int) -> tuple[float, int]:
        """Run one engine step from ``now``; returns (end time, index of the next arrival)."""
        res = self.engine.step(now)
        end = res.end
        i = next_arrival
        reqs = self.workload.requests
        while i < len(reqs) and reqs[i].arrival_s < end:
            self.arrive(i)
            i += 1
        sched, records = self.sched, self.records
        for out in res.outputs:
            job, reservation, index = self.jobs[out.req_id]
            rec = records[index]
            if out.first_token:
                rec.first_token_s = end
            if out.new_tokens:
                sched.on_output(job, out.new_tokens, end)
                self.admission.note_output(reservation, out.new_tokens)
            if out.finished:
                rec.finish_s = end
                rec.output_tokens = job.output_tokens
                sched.finish(job, end)
                self.admission.release(reservation)
                del self.jobs[out.req_id]
                self.done += 1
        self.dispatch(end)
        waiting = self.engine.num_waiting
        if waiting > self.max_engine_waiting and self.engine.num_running:
            self.max_engine_waiting = waiting
        return end, i


def simulate(
    workload: Workload,
    policy: str,
    config: SimConfig | None = None,
    progress: ProgressFn | None = None,
) -> SimResult:
    """Run ``workload`` under ``policy`` to completion; one record per workload request."""
    config = config or SimConfig()
    started = time.perf_counter()
    run = _Run(workload, policy, config)
    reqs = workload.requests
    n = len(reqs)
    now = 0.0
    i = 0
    steps = 0
    engine = run.engine
    while True:
        while i < n and reqs[i].arrival_s <= now:
            run.arrive(i)
            i += 1
        if engine.has_unfinished():
            now, i = run.step(now, i)
            steps += 1
            if progress is not None and steps % 2000 == 0:
                progress(run.done, n)
        elif i < n:
            now = reqs[i].arrival_s
        else:
            break
    if run.sched.total_queued():  # pragma: no cover - dispatch invariant
        raise RuntimeError("simulation ended with requests still queued in the scheduler")
    if progress is not None:
        progress(run.done, n)
    return SimResult(
        policy=policy,
        records=run.records,
        kv_cache_tokens=run.cfg.kv_cache_tokens,
        steps=steps,
        preemptions=engine.num_preemptions,
        end_time=now,
        wall_seconds=time.perf_counter() - started,
        max_engine_waiting=run.max_engine_waiting,
    )


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
