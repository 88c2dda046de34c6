"""The live dispatcher and the lab take the same decisions: one dispatch core under both.

A seeded script of events (requests arriving, output tokens, requests ending, a request
withdrawn while queued) is played twice: straight into :class:`gateway.core.DispatchCore`, as
``lab simulate`` drives it, and through the asyncio :class:`gateway.dispatcher.Dispatcher`,
with one handler task per request awaiting its grant, as the live gateway does. The two must
grant the same requests to the same backends in the same order and end with the same counters.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from gateway.admission import AdmissionController, BackendSlots
from gateway.core import CoreOptions, DispatchCore, Grant
from gateway.dispatcher import Dispatcher
from gateway.scheduler import Job

TENANTS = {"a": 1.0, "b": 2.0, "c": 1.0}


@dataclass(frozen=True)
class Event:
    kind: str  # arrive | output | finish | withdraw
    rid: int
    tenant: str = ""
    prompt: int = 0
    max_tokens: int = 0
    n: int = 0


def script(seed: int, steps: int = 300) -> list[Event]:
    rng = random.Random(seed)
    events: list[Event] = []
    alive: list[int] = []
    rid = 0
    for _ in range(steps):
        op = rng.random()
        if op < 0.4 or not alive:
            rid += 1
            t = rng.choice(list(TENANTS))
            events.append(Event("arrive", rid, t, rng.randint(5, 60), rng.randint(1, 40)))
            alive.append(rid)
        elif op < 0.75:
            events.append(Event("output", rng.choice(alive), n=rng.randint(1, 5)))
        elif op < 0.95:
            r = alive.pop(rng.randrange(len(alive)))
            events.append(Event("finish", r))
        else:
            r = alive.pop(rng.randrange(len(alive)))
            events.append(Event("withdraw", r))
    return events


def backends() -> AdmissionController:
    return AdmissionController(
        [
            BackendSlots("x", frozenset({"m"}), max_num_seqs=3, max_kv_tokens=200),
            BackendSlots("y", frozenset({"m"}), max_num_seqs=2, max_kv_tokens=150),
        ]
    )


Decisions = tuple[list[tuple[int, str]], dict[str, float]]


def run_core(events: list[Event], policy: str) -> Decisions:
    """The lab's way: the pure core, grants as callbacks."""
    now = [0.0]
    granted: list[tuple[int, str]] = []
    grants: dict[int, Grant] = {}

    def on_grant(job: Job, grant: Grant) -> None:
        granted.append((job.payload, grant.backend.name))
        grants[job.payload] = grant

    core = DispatchCore(backends(), on_grant, CoreOptions(policy=policy), clock=lambda: now[0])
    for t, w in TENANTS.items():
        core.set_tenant(t, w)
    jobs: dict[int, Job] = {}
    for ev in events:
        now[0] += 0.5
        if ev.kind == "arrive":
            job = jobs[ev.rid] = Job(ev.tenant, ev.prompt, ev.max_tokens, now[0], "m")
            job.payload = ev.rid
            core.submit(job)
            core.pump("m")
        elif ev.rid in grants:
            job, grant = jobs[ev.rid], grants[ev.rid]
            if ev.kind == "output":
                core.on_output(job, grant, ev.n)
            else:  # finish, or the client left while it ran
                core.release(job, grant, ran=True)
                del grants[ev.rid]
        elif ev.kind in ("finish", "withdraw"):  # still queued: it leaves the queue
            core.cancel(jobs[ev.rid])
    counters = {t: core.pool("m").counter(t) for t in TENANTS}
    return granted, counters


async def run_dispatcher(events: list[Event], policy: str) -> Decisions:
    """The live gateway's way: a handler task per request awaits its grant."""
    now = [0.0]
    d = Dispatcher(backends(), CoreOptions(policy=policy), clock=lambda: now[0])
    for t, w in TENANTS.items():
        d.core.set_tenant(t, w, max_queued=1000)
    order: list[int] = []
    rid_of: dict[int, int] = {}
    d.on_dispatch = lambda job: order.append(rid_of[id(job)])
    tasks: dict[int, asyncio.Task[Grant]] = {}
    jobs: dict[int, Job] = {}
    backend_of: dict[int, str] = {}

    async def settle() -> None:
        for _ in range(3):  # let the handlers run up to their next await
            await asyncio.sleep(0)
        for rid, task in tasks.items():
            if task.done() and not task.cancelled() and rid not in backend_of:
                backend_of[rid] = task.result().backend.name

    for ev in events:
        now[0] += 0.5
        if ev.kind == "arrive":
            job = jobs[ev.rid] = Job(ev.tenant, ev.prompt, ev.max_tokens, now[0], "m")
            rid_of[id(job)] = ev.rid
            tasks[ev.rid] = asyncio.ensure_future(d.acquire(job, queue_timeout=3600))
        else:
            task = tasks.pop(ev.rid) if ev.kind != "output" else tasks[ev.rid]
            if task.done():
                grant, job = task.result(), jobs[ev.rid]
                if ev.kind == "output":
                    d.core.on_output(job, grant, ev.n)
                else:  # finish, or the client left while it ran
                    d.core.release(job, grant, ran=True)
            elif ev.kind in ("finish", "withdraw"):
                task.cancel()  # the client went away while queued
                await asyncio.gather(task, return_exceptions=True)
        await settle()
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    counters = {t: d.core.pool("m").counter(t) for t in TENANTS}
    return [(rid, backend_of[rid]) for rid in order], counters


@pytest.mark.parametrize("policy", ["vtc", "vtc-predict", "fcfs", "lcf"])
@pytest.mark.parametrize("seed", range(6))
async def test_live_dispatcher_and_lab_core_take_identical_decisions(
    policy: str, seed: int
) -> None:
    events = script(seed)
    core_granted, core_counters = run_core(events, policy)
    live_granted, live_counters = await run_dispatcher(events, policy)
    assert len(core_granted) > 10
    assert core_granted == live_granted
    assert core_counters == live_counters


def test_the_comparison_has_teeth() -> None:
    """The scripts make requests contend for slots: another policy decides differently."""
    events = script(0)
    assert run_core(events, "vtc")[0] != run_core(events, "fcfs")[0]
