"""Baseline policies for side-by-side comparison with VTC.

* ``fcfs``: one global queue in arrival order (what vLLM does on its own); with priority tiers,
  one such queue per tier, a higher tier first (strict priority bands, FCFS inside). A job
  stays in the tier its tenant had when it arrived.
* ``rpm``: FCFS plus a per-tenant cap of requests per sliding minute; requests over the cap are
  rejected at submit with :class:`QueueRejected` (the usual rate-limit answer, 429).

Counters are still kept (the ledger of :class:`Scheduler`) so metrics look the same under every
policy; they just do not influence the order.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from .interface import Job, Prices, QueueRejected, Scheduler


class FCFSScheduler(Scheduler):
    name = "fcfs"
    counts_order = False

    def __init__(self, prices: Prices | None = None) -> None:
        super().__init__(prices)
        self._bands: dict[int, OrderedDict[int, Job]] = {}  # tier -> its jobs in arrival order
        self._levels: list[int] = []  # tiers with a band, highest first
        self._per_tenant: dict[str, int] = {}
        self._total = 0

    def _admit(self, job: Job, now: float) -> None:
        tier = self.tier(job.tenant)
        band = self._bands.get(tier)
        if band is None:
            band = self._bands[tier] = OrderedDict()
            self._levels = sorted(self._bands, reverse=True)
        band[job.seq] = job
        self._per_tenant[job.tenant] = self._per_tenant.get(job.tenant, 0) + 1
        self._total += 1

    def peek(self, now: float) -> Job | None:
        paused = self._paused
        for tier in self._levels:
            band = self._bands[tier]
            if not paused:
                if band:
                    return next(iter(band.values()))
                continue
            # passes over paused tenants' jobs: a baseline, so a scan is acceptable here
            job = next((j for j in band.values() if j.tenant not in paused), None)
            if job is not None:
                return job
        return None

    def pop(self, now: float) -> Job | None:
        job = self.peek(now)
        if job is None:
            return None
        self._remove(job)
        self._dispatched(job, now)
        return job

    def _remove(self, job: Job) -> bool:
        for band in self._bands.values():
            if band.pop(job.seq, None) is not None:
                self._per_tenant[job.tenant] -= 1
                self._total -= 1
                return True
        return False

    def cancel(self, job: Job, now: float) -> bool:
        return self._remove(job)

    def queued(self, tenant: str) -> int:
        return self._per_tenant.get(tenant, 0)

    def total_queued(self) -> int:
        return self._total

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
        #: requests of a tenant admitted in the window elsewhere (other cluster replicas, as
        #: their last sync said); they count against the limit too
        self.elsewhere: Callable[[str], int] | None = None

    def _window(self, tenant: str, now: float) -> deque[float]:
        """The tenant's admission times within the last minute."""
        recent = self._recent.get(tenant)
        if recent is None:
            recent = self._recent[tenant] = deque()
        horizon = now - self.window_s
        while recent and recent[0] <= horizon:
            recent.popleft()
        return recent

    def admitted(self, now: float) -> dict[str, int]:
        """Per tenant, its requests admitted here within the last minute (those with any)."""
        out = {t: len(self._window(t, now)) for t in list(self._recent)}
        return {t: n for t, n in out.items() if n}

    def _admit(self, job: Job, now: float) -> None:
        recent = self._window(job.tenant, now)
        others = self.elsewhere(job.tenant) if self.elsewhere is not None else 0
        if len(recent) + others >= self.rpm_limit:
            # (when only other replicas' admissions fill the window, their times are unknown
            # here: the average spacing the limit allows)
            wait = recent[0] + self.window_s - now if recent else self.window_s / self.rpm_limit
            raise QueueRejected(
                f"tenant {job.tenant!r} is over its limit of {self.rpm_limit} requests per minute",
                retry_after=wait,
            )
        recent.append(now)
        super()._admit(job, now)
