"""A tiny continuous-batching loop that drives a scheduler tick by tick (the tests' fake engine).

Each tick: (1) dispatch while the scheduler's pick fits the batch (head-of-line: the pick waits
for room, later jobs wait behind it, as in the gateway's dispatcher); (2) every running job
generates one output token (``on_output(job, 1)``); (3) jobs that reached their length finish
and free their room. Time is the tick number.

A job's true output length travels in ``job.payload`` and is also its ``max_tokens``, like the
paper's clients (``max_tokens = output_len``, ``ignore_eos``). Service is measured the paper's
way, independently of the scheduler's ledger: ``w_in * prompt`` when the job is dispatched
(prefilled), ``w_out`` per output token as it is generated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.scheduler import Job, Scheduler

Refill = Callable[[str, int], Job | None]  # (tenant, tick) -> a new job for that tenant, or None


@dataclass
class BatchLoop:
    sched: Scheduler
    max_seqs: int | None = None  # concurrent jobs
    kv_tokens: int | None = None  # sum of prompt + max_tokens over running jobs
    refill: Refill | None = None  # called after each pop, to keep a tenant backlogged
    keep_queued: int = 2  # refill while a tenant has fewer queued jobs than this
    now: int = 0
    running: list[Job] = field(default_factory=list)
    reserved: int = 0
    service: dict[str, float] = field(default_factory=dict)
    dispatched: list[Job] = field(default_factory=list)

    def _fits(self, job: Job) -> bool:
        if self.max_seqs is not None and len(self.running) >= self.max_seqs:
            return False
        need = job.prompt_tokens + job.max_tokens
        return self.kv_tokens is None or self.reserved + need <= self.kv_tokens

    def dispatch(self) -> None:
        sched = self.sched
        while (job := sched.peek(self.now)) is not None and self._fits(job):
            popped = sched.pop(self.now)
            assert popped is job, "peek() and pop() disagree"
            self.running.append(job)
            self.dispatched.append(job)
            self.reserved += job.prompt_tokens + job.max_tokens
            self.service[job.tenant] = (
                self.service.get(job.tenant, 0.0) + sched.prices.input * job.prompt_tokens
            )
            if self.refill is not None and sched.queued(job.tenant) < self.keep_queued:
                new = self.refill(job.tenant, self.now)
                if new is not None:
                    sched.submit(new, self.now)

    def generate(self) -> None:
        sched = self.sched
        still: list[Job] = []
        for job in self.running:
            if job.output_tokens < job.payload:
                sched.on_output(job, 1, self.now)
                self.service[job.tenant] += sched.prices.output
            if job.output_tokens >= job.payload:
                sched.finish(job, self.now)
                self.reserved -= job.prompt_tokens + job.max_tokens
            else:
                still.append(job)
        self.running = still

    def tick(self) -> None:
        self.dispatch()
        self.generate()
        self.now += 1


def make_job(tenant: str, prompt: int, output: int, now: float = 0.0) -> Job:
    """A job whose true output length (``payload``) equals its ``max_tokens``."""
    return Job(tenant=tenant, prompt_tokens=prompt, max_tokens=output, arrival=now, payload=output)
