"""Baseline policies for side-by-side comparison with VTC.

* ``fcfs``: one global queue in arrival order (what vLLM does on its own).
* ``rpm``: FCFS plus a per-tenant cap of requests per sliding minute; requests over the cap are
  rejected at submit with :class:`QueueRejected` (the usual rate-limit answer, 429).

Counters are still kept (the ledger of :class:`Scheduler`) so metrics look the same under every
policy; they just do not influence the order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable

from .interface import Job, Prices, QueueRejected, Scheduler


class FCFSScheduler(Scheduler):
    name = "fcfs"

    def __init__(self, prices: Prices | None = None) -> None:
        super().__init__(prices)
        self._jobs: OrderedDict[int, Job] = OrderedDict()
        self._per_tenant: dict[str, int] = {}

    def _admit(self, job: Job, now: float) -> None:
        self._jobs[job.seq] = job
        self._per_tenant[job.tenant] = self._per_tenant.get(job.tenant, 0) + 1

    def peek(self, now: float) -> Job | None:
        paused = self._paused
        if not paused:
            return next(iter(self._jobs.values())) if self._jobs else None
        # passes over paused tenants' jobs: a baseline, so a scan is acceptable here
        return next((j for j in self._jobs.values() if j.tenant not in paused), None)

    def pop(self, now: float) -> Job | None:
        job = self.peek(now)
        if job is None:
            return None
        del self._jobs[job.seq]
        self._per_tenant[job.tenant] -= 1
        self._dispatched(job, now)
        return job

    def cancel(self, job: Job, now: float) -> bool:
        if self._jobs.pop(job.seq, None) is None:
            return False
        self._per_tenant[job.tenant] -= 1
        return True

    def queued(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def total_queued(self) -> int:
        return len(self._jobs)

    def backlogged(self) -> Iterable[str]:
        return [t for t, n in self._per_tenant.items() if n > 0]


class RPMScheduler(FCFSScheduler):
    name = "rpm"
    window_s = 60.0

    def __init__(self, prices: Prices | None = None, rpm_limit: int = 60) -> None:
        super().__init__(prices)
        if rpm_limit < 1:
            raise ValueError(f"rpm_limit must be >= 1, got {rpm_limit!r}")
        self.rpm_limit = rpm_limit
        self._recent: dict[str, deque[float]] = {}

    def _admit(self, job: Job, now: float) -> None:
        recent = self._recent.get(job.tenant)
        if recent is None:
            recent = self._recent[job.tenant] = deque()
        horizon = now - self.window_s
        while recent and recent[0] <= horizon:
            recent.popleft()
        if len(recent) >= self.rpm_limit:
            raise QueueRejected(
                f"tenant {job.tenant!r} is over its limit of {self.rpm_limit} requests per minute",
                retry_after=recent[0] + self.window_s - now,
            )
        recent.append(now)
        super()._admit(job, now)
