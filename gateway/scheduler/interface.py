"""The scheduler contract shared by every policy.

A scheduler decides *which waiting request goes next* whenever a backend has room. It is pure:
synchronous, no asyncio or aiohttp, time passed in as ``now`` (seconds, any monotonic origin). The
live gateway and the fairness lab's discrete-event simulator drive the same classes.

Life of a :class:`Job` as seen by a policy::

    submit(job, now)          job waits in its tenant's FIFO queue (may raise QueueRejected);
                              an arrival to an empty queue may lift the tenant's counter
    peek(now) -> job | None   the job that pop() would return next; nothing changes
    pop(now)  -> job | None   dispatch: remove the job and charge what is charged up front
                              (its prompt; its expected output too where the policy says so)
    on_output(job, n, now)    n more output tokens were generated for a running job
    finish(job, now, ran, output_tokens)
                              the job ended (any reason); reconcile its charge with the truth
                              (the backend's output count when given) and teach the predictor
    cancel(job, now) -> bool  a *queued* job left (client gone, timeout): nothing stays charged

Around ``finish``, the dispatch core may keep a finished job's slot for its tenant's next
request (closed-loop clients, ``scheduler.hold_ms``): it asks ``resubmits(tenant)`` whether the
tenant sends its next request right after one ends, calls ``hold(job)`` while it keeps the
slot and ``unhold(job)`` when the next request takes it or the wait lapses, and
``entitled(tenant, now)`` says whether that request would be served before the head of the
order (else the slot goes to the head). ``fcfs`` and ``rpm`` answer False and book nothing.
Scale-out also uses ``dispatch_cost`` (what ``pop`` would charge) and ``set_counter`` (a
counter from the shared order).

Priority tiers: every tenant has one (an integer, 0 by default; :data:`TIERS`). ``peek`` and
``pop`` serve a lower tier only while no job of a higher tier waits (strict priority: a lower
tier can starve under sustained higher-tier load, unless ``set_min_share`` gives it a share,
which the counter policies support), and order tenants within a tier by the policy's own rule.

A tenant may be *paused* (``pause``/``resume``; the dispatch core does it while the tenant has
its ``max_in_flight`` requests running): its jobs keep their place in its queue, but ``peek``
and ``pop`` pass over them, so the next tenant in the order is served instead of everyone
waiting behind a tenant that may not run more now.

Hierarchy (``set_group``, ``set_tenant(..., parent=)``): tenants may sit in a tree of groups
(organisation, team, ...), each node with a weight. Backlogged siblings share their parent's
service by weight at every level; policies that order by counters keep a counter per group
(see :mod:`gateway.scheduler.vtc`). A tenant or group with no parent is a top-level node; a
config without groups is the flat algorithm. Groups are pause targets too (a group at its
``max_in_flight``). A node's tier is its top-level node's tier (callers pass it to every node).

Charging invariant: after ``finish`` a job has been charged exactly the price of its actual
tokens, ``w_in * prompt_tokens + w_out * output_tokens`` (the backend's counts), each part
divided by the tenant's weight *at the time it was charged*, so a weight changed by a reload
re-prices only what comes after it; with a constant weight that is
``(w_in * prompt + w_out * output) / weight`` counter units. A job that never ran upstream
(``finish(ran=False)``) costs nothing. ``job.charged`` (counter units) and
``job.charged_cost`` (priced tokens) always hold what the job has cost so far, so counters stay
consistent on every path.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .predictor import Key, OutputPredictor


@dataclass(slots=True, eq=False)
class Job:
    """One request as the scheduler sees it. Identity is object identity."""

    tenant: str
    prompt_tokens: int
    max_tokens: int
    arrival: float
    model: str = ""
    endpoint: str = ""  # "chat" or "completions" (the output predictor's key)
    seq: int = 0  # global arrival order, set by submit()
    output_tokens: int = 0  # generated so far (caller updates through on_output)
    predicted_output: int = 0  # output charged at dispatch (vtc-predict; vtc: a busy tenant's)
    expected_output: int = 0  # vtc: the tenant's recent average output, at most max_tokens
    charged: float = 0.0  # counter units charged to the tenant for this job so far
    charged_cost: float = 0.0  # the same charges in priced tokens, before dividing by weight
    dispatched_at: float | None = None
    payload: Any = field(default=None, repr=False)  # opaque to the scheduler


def job_key(job: Job) -> Key:
    """Whose output-length history ``job`` belongs to: ``(tenant, model, endpoint)``."""
    return (job.tenant, job.model, job.endpoint)


@dataclass(frozen=True, slots=True)
class Prices:
    """Token prices: a tenant's service is ``input * prompt + output * completion`` tokens."""

    input: float = 1.0
    output: float = 2.0

    def cost(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.input * prompt_tokens + self.output * output_tokens


#: Priority tiers by name (``tenants[].tier``): a higher one is served first.
TIERS = {"interactive": 0, "batch": -1}


class QueueRejected(Exception):
    """submit() refused the job (per-tenant request-rate cap). ``retry_after`` in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class TenantStats:
    name: str
    weight: float
    counter: float
    queued: int
    service: float  # tokens served at their prices: output as generated, prompt at finish


class Scheduler(ABC):
    """Base of every policy: tenants, weights, the tenant tree, pauses and the charging ledger.

    A policy owns its queues and its order. It implements the abstract methods: ``_admit``
    (put a submitted job in its queue: the policy's arrival rule; :meth:`submit` numbers the
    job first), ``peek``, ``pop`` (which calls :meth:`_dispatched` to charge the job), ``cancel``,
    ``queued``, ``total_queued`` and ``backlogged``. It learns of changes through the hooks
    ``_on_counter_change``, ``_on_tier_change``, ``_on_pause``, ``_on_tree_change`` and
    ``_finished``, and overrides what it can answer better than the defaults here (which suit
    a policy without counters in its order, a lift or per-group state): ``queued_jobs``,
    ``queued_under``, ``group_counter``, ``set_min_share``, ``dispatch_cost``, ``resubmits``,
    ``credit``, ``entitled``, ``hold``, ``unhold``, ``lift_stats``. The ledger (how much each
    job and tenant has been charged, :meth:`on_output`, :meth:`finish`) and the output
    predictor live here, so that every policy charges, reports counters and service the same
    way.
    """

    name: str = "base"
    #: whether an arrival to an empty queue lifts the tenant's counter here (the class value:
    #: whether the policy has a lift at all; a cluster replica turns it off on its pools while
    #: the shared order does the lift)
    lift: bool = False
    #: whether the counters decide the order (the policy is fair by them); a cluster shares
    #: the counters of such a policy only, and for the others only tiers and capacity
    counts_order: bool = True
    #: an arrival this soon (seconds) after one of its tenant's requests finished is a
    #: resubmission (a concurrency-limited client sending its next request); 0: none is (the
    #: busy-tenant rules are off)
    follow_s: float = 0.02

    def __init__(self, prices: Prices | None = None) -> None:
        self.prices = prices or Prices()
        self._weights: dict[str, float] = {}
        self._counters: dict[str, float] = {}
        self._service: dict[str, float] = {}
        self._paused: set[str] = set()
        self._tiers: dict[str, int] = {}  # tenant -> priority tier (absent: 0)
        self._parents: dict[str, str] = {}  # tenant or group -> its parent group (absent: top)
        self._group_weights: dict[str, float] = {}  # group -> weight
        self._seq = 0
        #: output lengths of finished jobs (the dispatch core shares one across its pools)
        self.predictor = OutputPredictor()

    # -- tenants -----------------------------------------------------------------------------
    def set_tenant(
        self, tenant: str, weight: float = 1.0, tier: int | None = None, parent: str | None = None
    ) -> None:
        """Add a tenant or change its weight, (unless None) its priority tier and its parent
        group (None: top level); its counter is kept. Tiers are integers, higher served first
        (:data:`TIERS` names two)."""
        if not weight > 0:
            raise ValueError(f"weight of tenant {tenant!r} must be > 0, got {weight!r}")
        if tenant in self._group_weights:
            raise ValueError(f"{tenant!r} is a group, not a tenant")
        self._weights[tenant] = float(weight)
        self._counters.setdefault(tenant, 0.0)
        self._service.setdefault(tenant, 0.0)
        if tier is not None and tier != self._tiers.get(tenant, 0):
            self._tiers[tenant] = tier
            self._on_tier_change(tenant, tier)
        self._set_parent(tenant, parent)

    def set_group(
        self, name: str, weight: float = 1.0, parent: str | None = None, tier: int | None = None
    ) -> None:
        """Add an inner node of the tenant tree (or change its weight, tier, parent). A parent
        must be set before its children; a parent that is a descendant of ``name`` is an
        error. Policies without per-group order (fcfs, rpm) only keep the structure."""
        if not weight > 0:
            raise ValueError(f"weight of group {name!r} must be > 0, got {weight!r}")
        if name in self._weights:
            raise ValueError(f"{name!r} is a tenant, not a group")
        self._group_weights[name] = float(weight)
        if tier is not None and tier != self._tiers.get(name, 0):
            self._tiers[name] = tier
        self._set_parent(name, parent)
        self._on_tree_change(name)

    def _set_parent(self, node: str, parent: str | None) -> None:
        if parent == self._parents.get(node):
            return
        if parent is None:
            del self._parents[node]
        else:
            if parent not in self._group_weights:
                raise ValueError(f"parent {parent!r} of {node!r} is not a group")
            up: str | None = parent
            while up is not None:
                if up == node:
                    raise ValueError(f"group {parent!r} is inside {node!r}: not a tree")
                up = self._parents.get(up)
            self._parents[node] = parent
        self._on_tree_change(node)

    def _on_tree_change(self, node: str) -> None:
        """Hook: ``node``'s place in the tree changed (its parent; a group's weight or tier)."""

    def parent(self, node: str) -> str | None:
        return self._parents.get(node)

    def groups(self) -> Iterable[str]:
        return self._group_weights.keys()

    def queued_under(self, node: str) -> int:
        """Waiting jobs of ``node``'s subtree (a tenant: its own queue)."""
        if node in self._weights:
            return self.queued(node)
        return sum(self.queued(t) for t in self._weights if node in self.path(t))

    def group_counter(self, name: str) -> float:
        """A group's counter (0 for policies without per-group counters)."""
        return 0.0

    def group_weight(self, name: str) -> float:
        return self._group_weights.get(name, 1.0)

    def path(self, node: str) -> tuple[str, ...]:
        """``node`` and its ancestors, top-level node first."""
        out = [node]
        up = self._parents.get(node)
        while up is not None:
            out.append(up)
            up = self._parents.get(up)
        return tuple(reversed(out))

    def tier(self, tenant: str) -> int:
        return self._tiers.get(tenant, 0)

    def set_min_share(self, tier: int, share: float) -> None:
        """Give ``tier`` at least ``share`` of the service while higher tiers wait too (0:
        strict priority). Policies that order by counters implement it; others refuse."""
        if share:
            raise ValueError(f"policy {self.name!r} has no minimum share for a tier")

    def _on_tier_change(self, tenant: str, tier: int) -> None:
        """Hook: a tenant moved to another tier (policies that keep one order per tier)."""

    def weight(self, tenant: str) -> float:
        return self._weights.get(tenant, 1.0)

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def set_counter(self, tenant: str, value: float) -> None:
        """Replace a tenant's counter with the value a shared order holds for it (scale-out);
        what jobs were charged is untouched."""
        if tenant not in self._weights:
            self.set_tenant(tenant)
        delta = value - self._counters[tenant]
        if delta:
            self._counters[tenant] = value
            self._on_counter_change(tenant, delta)

    def node_counter(self, node: str) -> float:
        """A tenant's or a group's counter (a shared order syncs both)."""
        return self.counter(node) if node in self._weights else self.group_counter(node)

    def set_node_counter(self, node: str, value: float) -> None:
        """Set a tenant's or a group's counter to the value a shared order holds for it,
        without moving any other node (a shared order syncs every node itself). Policies
        with per-group counters override it; here a group has none."""
        if node not in self._group_weights:
            self.set_counter(node, value)

    def group_credit(self, name: str) -> float:
        """Counter units a group entering the backlog with a busy tenant may stay below the
        lift's floor (0 for policies without a lift)."""
        return 0.0

    def pause(self, tenant: str) -> None:
        """Pass over ``tenant``'s queued jobs until :meth:`resume` (they stay queued)."""
        if tenant not in self._paused:
            self._paused.add(tenant)
            self._on_pause(tenant, True)

    def resume(self, tenant: str) -> None:
        """``tenant``'s queued jobs compete in the order again."""
        if tenant in self._paused:
            self._paused.discard(tenant)
            self._on_pause(tenant, False)

    def paused(self, tenant: str) -> bool:
        return tenant in self._paused

    def _on_pause(self, tenant: str, paused: bool) -> None:
        """Hook: ``tenant`` was paused (``paused``) or resumed; a policy that indexes tenants
        puts a resumed one back in its order (a paused one may be dropped lazily)."""

    def service(self, tenant: str) -> float:
        return self._service.get(tenant, 0.0)

    def tenants(self) -> Iterable[str]:
        return self._weights.keys()

    def stats(self) -> list[TenantStats]:
        return [
            TenantStats(t, self._weights[t], self._counters[t], self.queued(t), self._service[t])
            for t in self._weights
        ]

    # -- queue operations --------------------------------------------------------------------
    def submit(self, job: Job, now: float) -> None:
        if job.tenant not in self._weights:
            self.set_tenant(job.tenant)
        self._seq += 1
        job.seq = self._seq
        self._admit(job, now)

    @abstractmethod
    def _admit(self, job: Job, now: float) -> None:
        """Put a submitted job in its queue (the policy's arrival rule)."""

    @abstractmethod
    def peek(self, now: float) -> Job | None:
        """The job that ``pop(now)`` would return, or None when nothing waits."""

    @abstractmethod
    def pop(self, now: float) -> Job | None:
        """Dispatch the next job: remove it from its queue and charge its up-front cost."""

    @abstractmethod
    def cancel(self, job: Job, now: float) -> bool:
        """Remove a still-queued job; True if it was queued. Nothing stays charged for it."""

    @abstractmethod
    def queued(self, tenant: str) -> int:
        """Number of waiting jobs of a tenant."""

    def queued_jobs(self, tenant: str, n: int) -> list[Job]:
        """Up to ``n`` of ``tenant``'s waiting jobs, in the order it would be served (empty
        when the policy cannot tell)."""
        return []

    @abstractmethod
    def total_queued(self) -> int: ...

    @abstractmethod
    def backlogged(self) -> Iterable[str]:
        """Tenants with at least one waiting job."""

    # -- charging ----------------------------------------------------------------------------
    def _charge(self, job: Job, cost: float) -> None:
        """Charge ``cost`` priced tokens (negative refunds) at the tenant's current weight."""
        if cost:  # (per output token: kept flat, no further calls)
            units = cost / self._weights.get(job.tenant, 1.0)
            job.charged_cost += cost
            job.charged += units
            self._counters[job.tenant] += units
            self._on_counter_change(job.tenant, units)

    def _add_units(self, job: Job, units: float) -> None:
        if units:
            job.charged += units
            self._counters[job.tenant] += units
            self._on_counter_change(job.tenant, units)

    def _on_counter_change(self, tenant: str, delta: float) -> None:
        """Hook: ``tenant``'s counter moved by ``delta`` units (a charge, a refund when
        negative, or :meth:`set_counter`); for policies that order tenants by counter."""

    def dispatch_cost(self, job: Job) -> float:
        """Priced tokens ``pop`` would charge ``job`` at dispatch if it were popped now: its
        prompt, plus any output charged up front (``vtc-predict``'s prediction; under ``vtc``,
        a resubmitting tenant's expected output). A shared order charges this when it grants
        the slot."""
        return self.prices.cost(job.prompt_tokens, 0)

    def _dispatched(self, job: Job, now: float) -> None:
        """Charge at dispatch (``pop`` calls it): the prompt and ``job.predicted_output``, the
        output the policy set to charge up front (``vtc-predict``: every job's prediction;
        ``vtc``: a resubmitting tenant's expected output; otherwise 0)."""
        job.dispatched_at = now
        self._charge(job, self.prices.cost(job.prompt_tokens, job.predicted_output))

    def on_output(self, job: Job, n: int, now: float) -> None:
        """``n`` more output tokens were generated; charge those beyond any prediction."""
        if n <= 0:
            return
        before = max(job.output_tokens, job.predicted_output)
        job.output_tokens += n
        beyond = max(job.output_tokens, job.predicted_output) - before
        if beyond:
            self._charge(job, self.prices.output * beyond)
        self._service[job.tenant] += self.prices.output * n

    def finish(
        self, job: Job, now: float, ran: bool = True, output_tokens: int | None = None
    ) -> None:
        """Reconcile: the job's total charge becomes the price of its actual tokens.

        ``job.prompt_tokens`` must hold the actual prompt count; ``output_tokens``, when given,
        is the backend's own output count and replaces what ``on_output`` accumulated (it may
        be lower than an estimate). ``ran=False`` means the backend never processed the job
        (refused before streaming): everything charged for it is refunded.
        """
        if job.dispatched_at is None:
            return  # never left the queue: nothing was charged
        if not ran:
            job.charged_cost = 0.0
            self._add_units(job, -job.charged)
        else:
            if output_tokens is not None and output_tokens != job.output_tokens:
                self._service[job.tenant] += self.prices.output * (
                    output_tokens - job.output_tokens
                )
                job.output_tokens = output_tokens
            actual = self.prices.cost(job.prompt_tokens, job.output_tokens)
            self._charge(job, actual - job.charged_cost)
            self._service[job.tenant] += self.prices.input * job.prompt_tokens
            self.predictor.observe(job_key(job), job.output_tokens)
        self._finished(job, now, ran)

    def _finished(self, job: Job, now: float, ran: bool) -> None:
        """Hook: a dispatched job finished, after :meth:`finish` reconciled its charge (and,
        if it ran, the predictor saw its output length): a policy releases what it booked for
        the job (``vtc``: its part of the tenant's credit) here."""

    def resubmits(self, tenant: str) -> bool:
        """Does ``tenant`` behave as a closed-loop client (its next request typically comes
        right after one of its requests finishes)? False for policies that do not track it."""
        return False

    def entitled(self, tenant: str, now: float) -> bool:
        """Would ``tenant``, whose queue is empty, be served before the head of the fair order
        if it had a request waiting? (Decides whether a slot its finished request frees is
        held briefly for its next request; False for policies without such an order.)"""
        return False

    def hold(self, job: Job) -> None:
        """``job`` finished and the dispatcher holds its slot for the tenant's next request;
        the counter policies count that request's expected cost in the tenant's credit (the
        lift's allowance, see :mod:`gateway.scheduler.vtc`) until :meth:`unhold`."""

    def unhold(self, job: Job) -> None:
        """The hold of ``job`` ended (used by the tenant's next request, or lapsed); what
        :meth:`hold` booked is released."""

    def credit(self, tenant: str, now: float) -> float:
        """Counter units ``tenant``, arriving now, may stay below the lift's floor (0 for
        policies without a lift)."""
        return 0.0

    def lift_stats(self) -> dict[str, tuple[int, float]]:
        """tenant -> (times its counter was lifted on arrival, counter units the lifts added).
        Empty for policies without a lift."""
        return {}
