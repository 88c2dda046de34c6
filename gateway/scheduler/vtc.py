"""Virtual Token Counter (Sheng et al., OSDI 2024) and its relatives ``lcf`` and ``vtc-predict``.

Each tenant t has a counter c[t]; dispatch serves the backlogged tenant with the smallest counter
and charges ``w_in * prompt / weight`` (plus the prediction for ``vtc-predict``); every output
token charges ``w_out / weight``. A tenant whose queue was empty is lifted on arrival:

* others backlogged: ``c[t] = max(c[t], min(c[k] for backlogged k))``;
* none backlogged:   ``c[t] = max(c[t], c[last])``, ``last`` the tenant that most recently left
  the backlogged set (its counter now).

A *busy* tenant is not an idle one. Concurrency-limited clients (an SDK with N requests in
flight, a batch job with N workers) send their next request a moment after one finishes; their
queue empties not because they stopped asking but because everything they sent was dispatched.
Lifting such a tenant to the floor on every arrival would throw away, again and again, the
lead its weight earned it. So the lift keeps a bounded credit for a tenant that *resubmits*:
one whose arrivals mostly come within ``follow_s`` (the dispatcher's hold time) of one of its
own requests finishing (a moving average over its arrivals, > 1/2), or whose arrival takes over
a slot held for it (see :class:`gateway.core.DispatchCore`):

* ``c[t] = max(c[t], floor - credit[t])`` with ``credit[t]`` the expected cost of t's requests
  in flight and of those whose next request is expected (``(w_in * prompt + w_out * expected
  output) / weight`` each, booked at dispatch; the expected output is the tenant's recent
  average, at most ``max_tokens``); every other arrival to an empty queue gets the paper's
  lift (credit 0).

A tenant can therefore never be more than the cost of its own in-flight work behind the floor
when it arrives: after a demand-limited period (one request in flight for a minute, then a
burst) it catches up by at most that much, so the 2U bound between backlogged tenants grows to
at most 2U + C, C <= the cost of what one tenant can have in flight (<= max(w_in, w_out) * M).

``lcf`` (least counter first) is VTC without the lift.

A paused tenant (see :class:`~gateway.scheduler.interface.Scheduler`) stays backlogged but
leaves the heap: its entry is dropped when it reaches the top and ``resume`` pushes a fresh one,
so the order passes over it at O(log T) and never stalls behind it.

Priority tiers: a tenant's tier (``Scheduler.set_tenant(..., tier=)``, higher first) picks its
heap; the head of the order is the least counter of the highest tier with a backlogged tenant,
so a lower tier is served only while no higher-tier request waits in this pool. The lift's
floor (both cases) is taken within the arriving tenant's tier: tiers are fair within
themselves. With one tier everything above is exactly the flat algorithm.

Finding the smallest counter is O(log T): backlogged tenants sit in a heap keyed by
``(counter, seq of head job)``. Output tokens only *raise* counters, which leaves heap keys
stale-but-low; ``_top`` repairs stale entries lazily when they reach the top (a key that is
correct at the top is the true minimum, since every true key is >= its stored key). Changes
that *lower* a key or change the head (refunds, cancelling the head job) push a fresh entry
under a new version and the old one is skipped when met. So a per-token charge is O(1) and a
pick is amortised O(log T); nothing scans all tenants.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Iterable

from .interface import Job, Prices, Scheduler


class _Queue:
    __slots__ = (
        "committed",
        "follows",
        "held",
        "jobs",
        "last_finish",
        "resubmits",
        "running",
        "tier",
        "version",
    )

    def __init__(self, tier: int = 0) -> None:
        self.jobs: OrderedDict[int, Job] = OrderedDict()  # seq -> job, FIFO
        self.tier = tier  # the tenant's priority tier (its heap)
        self.version = 0
        # seq -> expected cost in priced tokens (w_in * prompt + w_out * expected output)
        self.running: dict[int, float] = {}  # dispatched, not finished
        self.held: dict[int, float] = {}  # finished, the tenant's next request expected
        self.committed = 0.0  # sum of both: the credit before dividing by the weight
        self.last_finish = float("-inf")  # when one of the tenant's requests last finished
        #: moving average of "this arrival came right after one of the tenant's finishes"
        self.resubmits = 0.0
        self.follows = False  # the tenant behaves as a closed-loop client (resubmits > 1/2)

    def head(self) -> Job:
        return next(iter(self.jobs.values()))


class VTCScheduler(Scheduler):
    name = "vtc"
    lift = True

    def __init__(self, prices: Prices | None = None, window: int = 10) -> None:
        super().__init__(prices)
        self.window = window
        self._history: dict[str, deque[int]] = {}  # tenant -> recent actual output lengths
        self._lifts: dict[str, list[float]] = {}  # tenant -> [count, units added]
        self._queues: dict[str, _Queue] = {}
        # one heap per priority tier; entries: (counter key, head seq, version, tenant)
        self._heaps: dict[int, list[tuple[float, int, int, str]]] = {}
        self._levels: list[int] = []  # tiers that have a heap, highest first
        self._total = 0
        self._last_left: dict[int, str] = {}  # tier -> its tenant that last left the backlog
        self._share: tuple[int, float] | None = None  # (tier, its minimum share); None: strict
        #: with a share: [counter of that tier, counter of the tiers above it, together]
        self._group = [0.0, 0.0]
        self._tier_queued: dict[int, int] = {}  # tier -> queued jobs

    # -- heap maintenance --------------------------------------------------------------------
    def _heap(self, tier: int) -> list[tuple[float, int, int, str]]:
        heap = self._heaps.get(tier)
        if heap is None:
            heap = self._heaps[tier] = []
            self._levels = sorted(self._heaps, reverse=True)
        return heap

    def _push(self, tenant: str, q: _Queue) -> None:
        q.version += 1
        heap = self._heap(q.tier)
        heapq.heappush(heap, (self._counters[tenant], q.head().seq, q.version, tenant))
        if len(heap) > 2 * max(self._total + 32, len(self._queues)):
            self._compact(q.tier)

    def _compact(self, tier: int) -> None:
        """Drop stale entries (left by churn such as submit/cancel with no pick in between).
        Runs after a heap doubles past max(queued jobs, tenants): amortised O(1) per push."""
        heap = self._heaps[tier] = [
            (self._counters[t], q.head().seq, q.version, t)
            for t, q in self._queues.items()
            if q.jobs and q.tier == tier and t not in self._paused
        ]
        heapq.heapify(heap)

    def _top(self) -> tuple[str, _Queue] | None:
        """The head of the fair order: the least counter of the highest tier with work (or of
        the tier with a minimum share, while it is owed service; see :meth:`set_min_share`)."""
        for tier in self._levels:
            top = self._top_in(tier)
            if top is not None:
                share = self._share
                if share is not None and tier > share[0] and self._group[0] < self._group[1]:
                    low = self._top_in(share[0]) if share[0] in self._heaps else None
                    if low is not None:
                        return low
                return top
        return None

    def set_min_share(self, tier: int, share: float) -> None:
        """Bound the strict priority: while jobs of ``tier`` and of higher tiers both wait,
        ``tier`` gets ``share`` of the service (0 < share < 1; 0 restores strict priority).
        ``tier`` and all tiers above it, together, form two groups ordered by VTC with
        weights ``share : 1 - share`` (group counters charged with every charge, lifted when
        a group's queue fills after it emptied); inside each group tiers and tenants go as
        before. Jobs of tiers below ``tier`` still wait for both groups."""
        if not 0 <= share < 1:
            raise ValueError(f"a minimum share must be in [0, 1), got {share!r}")
        self._share = (tier, share) if share > 0 else None

    def _group_of(self, tier: int) -> int | None:
        share = self._share
        if share is None or tier < share[0]:
            return None
        return 0 if tier == share[0] else 1

    def _queued_in(self, tier: int, n: int) -> None:
        """``n`` more (fewer, if negative) jobs queued in ``tier``; lift its group's counter
        when its queue fills after it emptied."""
        before = self._tier_queued.get(tier, 0)
        self._tier_queued[tier] = before + n
        g = self._group_of(tier)
        if g is not None and n > 0 and not self._group_queued(g, without=(tier, n)):
            self._group[g] = max(self._group)

    def _group_queued(self, g: int, without: tuple[int, int] = (0, 0)) -> bool:
        """Does group ``g`` have queued jobs (not counting ``n`` just added to ``tier``)?"""
        share = self._share
        assert share is not None
        total = 0
        for tier, n in self._tier_queued.items():
            if (tier == share[0]) == (g == 0) and tier >= share[0]:
                total += n - (without[1] if tier == without[0] else 0)
        return total > 0

    def _top_in(self, tier: int) -> tuple[str, _Queue] | None:
        heap = self._heaps[tier]
        while heap:
            key, seq, version, tenant = heap[0]
            q = self._queues.get(tenant)
            if q is None or version != q.version or not q.jobs or tenant in self._paused:
                heapq.heappop(heap)  # stale, or paused (resume pushes a fresh entry)
                continue
            counter = self._counters[tenant]
            if key != counter:
                heapq.heapreplace(heap, (counter, seq, version, tenant))
                continue
            return tenant, q
        return None

    def _on_counter_change(self, tenant: str, delta: float) -> None:
        share = self._share
        if share is not None:  # the groups' counters follow every charge
            tier = self._tiers.get(tenant, 0)
            if tier >= share[0]:
                cost = delta * self._weights.get(tenant, 1.0)
                if tier == share[0]:
                    self._group[0] += cost / share[1]
                else:
                    self._group[1] += cost / (1 - share[1])
        # Raising a counter leaves a stale-low key that _top repairs; lowering needs a new entry.
        if delta < 0:
            q = self._queues.get(tenant)
            if q is not None and q.jobs:
                self._push(tenant, q)

    def _on_tier_change(self, tenant: str, tier: int) -> None:
        q = self._queues.get(tenant)
        if q is not None and q.tier != tier:
            if q.jobs:
                self._queued_in(q.tier, -len(q.jobs))
                self._queued_in(tier, len(q.jobs))
            q.tier = tier
            if q.jobs:
                self._push(tenant, q)  # a fresh entry in its new tier; the old one is stale

    def _on_pause(self, tenant: str, paused: bool) -> None:
        q = self._queues.get(tenant)
        if not paused and q is not None and q.jobs:
            self._push(tenant, q)  # back in the order; a paused one's entry drops at the top

    # -- policy ------------------------------------------------------------------------------
    def _admit(self, job: Job, now: float) -> None:
        tenant = job.tenant
        q = self._queues.get(tenant)
        if q is None:
            q = self._queues[tenant] = _Queue(self.tier(tenant))
        q.resubmits = 0.75 * q.resubmits + (0.25 if now - q.last_finish <= self.follow_s else 0)
        q.follows = q.resubmits > 0.5
        if not q.jobs:
            if self.lift:
                self._lift(tenant, q, now)
            q.jobs[job.seq] = job
            self._push(tenant, q)
        else:
            q.jobs[job.seq] = job
        self._total += 1
        self._queued_in(q.tier, 1)

    def _floor(self, tier: int) -> float | None:
        """The lift's floor in ``tier``: its least backlogged counter, else the counter of its
        tenant that last left the backlog (tiers are fair within themselves only)."""
        top = self._top_in(tier) if tier in self._heaps else None
        if top is not None:
            return self._counters[top[0]]
        last = self._last_left.get(tier)
        if last is not None:
            return self._counters[last]
        return None

    def credit(self, tenant: str, now: float) -> float:
        """Counter units a tenant arriving now may stay below the lift's floor: for one that
        resubmits (see the module docstring), the expected cost of its requests in flight and
        of those whose next request is expected; 0 otherwise. O(1)."""
        q = self._queues.get(tenant)
        if q is None or not (q.held or (q.running and q.follows)):
            return 0.0
        return q.committed / self._weights.get(tenant, 1.0)

    def _lift(self, tenant: str, q: _Queue, now: float) -> None:
        floor = self._floor(q.tier)
        if floor is None:
            return
        target = floor - self.credit(tenant, now)
        delta = target - self._counters[tenant]
        if delta > 0:
            stat = self._lifts.get(tenant)
            if stat is None:
                stat = self._lifts[tenant] = [0, 0.0]
            stat[0] += 1
            stat[1] += delta
            self._counters[tenant] = target

    def lift_stats(self) -> dict[str, tuple[int, float]]:
        return {t: (int(c), u) for t, (c, u) in self._lifts.items()}

    def resubmits(self, tenant: str) -> bool:
        q = self._queues.get(tenant)
        return q is not None and q.follows

    def entitled(self, tenant: str, now: float) -> bool:
        q = self._queues.get(tenant)
        if q is None or q.jobs:
            return False  # its queued work competes in the fair order itself
        if tenant in self._paused:
            return False  # at its cap: a slot held for it would stay unused
        top = self._top()
        if top is None:
            return False  # nobody waits: a free slot stays free for its next request anyway
        if top[1].tier != q.tier:
            return q.tier > top[1].tier  # a higher tier goes first, a lower one after
        head = self._counters[top[0]]
        # its next request is lifted to at least head - credit (see _lift)
        return max(self._counters[tenant], head - self.credit(tenant, now)) < head

    def hold(self, job: Job) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            cost = self.prices.cost(job.prompt_tokens, job.expected_output)
            q.held[job.seq] = cost
            q.committed += cost

    def unhold(self, job: Job) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            q.committed -= q.held.pop(job.seq, 0.0)

    def peek(self, now: float) -> Job | None:
        top = self._top()
        return top[1].head() if top is not None else None

    def pop(self, now: float) -> Job | None:
        top = self._top()
        if top is None:
            return None
        tenant, q = top
        heap = self._heaps[q.tier]  # _top left the tenant's entry at its top
        _, job = q.jobs.popitem(last=False)
        self._total -= 1
        self._queued_in(q.tier, -1)
        self._predict(job)
        self._dispatched(job, now)  # raises the counter: the heap is not touched (lazy)
        cost = self.prices.cost(job.prompt_tokens, job.expected_output)
        q.running[job.seq] = cost
        q.committed += cost
        if q.jobs:  # the tenant stays backlogged: re-key its entry at the top in one sift
            q.version += 1
            heapq.heapreplace(heap, (self._counters[tenant], q.head().seq, q.version, tenant))
        else:
            heapq.heappop(heap)
            self._last_left[q.tier] = tenant
        return job

    def prediction(self, tenant: str, max_tokens: int) -> int:
        """Expected output of a request: the moving average of the tenant's last ``window``
        actual output lengths, at most ``max_tokens`` (``max_tokens`` with no history)."""
        hist = self._history.get(tenant)
        if not hist:
            return max_tokens
        return min(max_tokens, round(sum(hist) / len(hist)))

    def _predict(self, job: Job) -> None:
        """Set the job's expected output (the lift's credit counts it) before dispatch."""
        job.expected_output = self.prediction(job.tenant, job.max_tokens)

    def _finished(self, job: Job, now: float, ran: bool) -> None:
        q = self._queues.get(job.tenant)
        if q is not None:
            q.committed -= q.running.pop(job.seq, 0.0)
            q.last_finish = now
        if not ran:
            return  # refused before it ran: no evidence about the tenant's output lengths
        hist = self._history.get(job.tenant)
        if hist is None:
            hist = self._history[job.tenant] = deque(maxlen=self.window)
        hist.append(job.output_tokens)

    def cancel(self, job: Job, now: float) -> bool:
        q = self._queues.get(job.tenant)
        if q is None or q.jobs.pop(job.seq, None) is None:
            return False
        self._total -= 1
        self._queued_in(q.tier, -1)
        if q.jobs:
            self._push(tenant=job.tenant, q=q)  # the head may have changed
        else:
            q.version += 1
            self._last_left[q.tier] = job.tenant
        return True

    def queued(self, tenant: str) -> int:
        q = self._queues.get(tenant)
        return len(q.jobs) if q is not None else 0

    def total_queued(self) -> int:
        return self._total

    def backlogged(self) -> Iterable[str]:
        return [t for t, q in self._queues.items() if q.jobs]


class LCFScheduler(VTCScheduler):
    """Least counter first: VTC without the counter lift (a returning tenant keeps its low
    counter and is served exclusively until it catches up)."""

    name = "lcf"
    lift = False


class VTCPredictScheduler(VTCScheduler):
    """VTC charging a predicted output length at dispatch; the rest as generated, refund at end.

    The prediction is the moving average of the tenant's last ``window`` actual output lengths,
    bounded by the request's ``max_tokens``; with no history it is ``max_tokens`` (the
    over-charge is refunded when the job finishes). Jobs finished with ``ran=False`` never
    produced output and do not enter the history.
    """

    name = "vtc-predict"

    def _predict(self, job: Job) -> None:
        job.predicted_output = job.expected_output = self.prediction(job.tenant, job.max_tokens)
