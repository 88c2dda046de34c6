"""A hosted API's quota in the lab: the gateway's rate budget in front of an unlimited engine.

A workload with ``quota_tpm`` (the built-in ``quota``: three teams joining one after another)
runs through :class:`QuotaRun`: the gateway's own :class:`~gateway.core.DispatchCore` with a
:class:`~gateway.admission.Quota` of ``quota_tpm`` tokens per ``quota_window_s`` on its backend,
exactly as a live quota backend has one (booked at dispatch with prompt + the predictor's p90
output, corrected as tokens stream and at the end), and the simulated engine as the provider:
no batch-slot or KV limit (``max_num_seqs`` and the KV cache of the simulator's provider mode),
its step times from the profile's cost model. In front of it sits the provider's own limiter
(:class:`backends.sim.ratelimit.RateLimiter`, as the simulator's provider mode has it): each
request is charged its prompt + real output at dispatch, and one that does not fit is refused
with an exact Retry-After; the gateway then does what the live proxy does with a 429 (the
budget backs off, the booking is voided, the request goes back to its tenant's queue) and the
record counts the refusal. What the provider counted is measured from the records (prompt +
output, at their accepted dispatch).

Time is virtual: the run wakes when the budget can take the fair order's head again
(:meth:`~gateway.admission.Quota.next_change`), as the live gateway's ``quota_loop`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from backends.sim.config import PROVIDER_KV_CACHE_TOKENS, PROVIDER_MAX_NUM_SEQS
from backends.sim.ratelimit import RateLimiter, RateLimits
from gateway.admission import Quota
from gateway.core import Grant
from gateway.scheduler import Job

from .metrics import RequestRecord
from .simulate import DIRECT, LOCAL, MODEL, SimConfig, _Run
from .workloads import Workload

#: A wake-up a hair after the budget changes, so that the window has moved past the booking.
_EPS = 1e-9


class QuotaRun(_Run):
    """One simulation of a quota workload (see the module docstring)."""

    def __init__(self, workload: Workload, policy: str, config: SimConfig) -> None:
        if workload.quota_tpm is None:
            raise ValueError(f"workload {workload.name!r} has no quota_tpm")
        if policy in (DIRECT, LOCAL) or config.replicas > 1:
            raise ValueError("a quota run has one gateway in front of the provider")
        provider = replace(
            config,
            kv_cache_tokens=config.kv_cache_tokens or PROVIDER_KV_CACHE_TOKENS,
            max_num_seqs=config.max_num_seqs or PROVIDER_MAX_NUM_SEQS,
        )
        super().__init__(workload, policy, provider)
        tpm, window = workload.quota_tpm, workload.quota_window_s
        self.quota = Quota(tpm, None, window, lambda: self.now)
        self.admission.get("sim").quota = self.quota
        self.provider = RateLimiter(RateLimits(tpm=tpm, window_s=window))

    def _granted(self, job: Job, grant: Grant) -> None:
        index: int = job.payload
        rec = self.records[index]
        decision = self.provider.admit(self.now, job.prompt_tokens + rec.output_tokens)
        if not decision.accepted:  # a 429: what gateway.server.proxy does with it
            rec.refusals += 1
            self.quota.back_off(decision.retry_after)
            self.admission.void(grant.reservation)
            self.core.release(job, grant, ran=False)
            self.core.submit(job)
            return
        rec.dispatch_s = self.now
        super()._granted(job, grant)

    def _wake(self) -> float | None:
        """When the budget may take the waiting head (None: nothing waits, or no change)."""
        if not self.core.total_queued():
            return None
        wait = self.quota.next_change()
        return None if wait is None else self.now + wait + _EPS

    def next_arrival(self, i: int) -> float | None:
        times = [t for t in (super().next_arrival(i), self._wake()) if t is not None]
        return min(times) if times else None

    def _expire(self, t: float) -> None:
        super()._expire(t)
        if t >= self.now and self.core.total_queued():
            self.now = t
            self.core.pump(MODEL)  # the window moved on: the head may fit now


# ---------------------------------------------------------------------------------------------
# measures: what the provider counts (prompt + output tokens, at dispatch)
# ---------------------------------------------------------------------------------------------


def max_window(points: Sequence[tuple[float, int]], window_s: float) -> int:
    """The most tokens in any sliding window ``(t - window_s, t]`` of ``(t, tokens)`` points."""
    pts = sorted(points)
    best = total = lo = 0
    for t, n in pts:
        total += n
        while pts[lo][0] <= t - window_s:
            total -= pts[lo][1]
            lo += 1
        best = max(best, total)
    return best


def measured(start: float, end: float, window_s: float) -> tuple[float, float]:
    """The part of a phase ``[start, end)`` that is measured: whole windows after its first
    (a sliding window lets the tokens of any stretch that is not a whole number of windows
    exceed the quota's pace)."""
    n = int((end - start) / window_s + 1e-9) - 1
    if n < 1:
        return start, end
    return start + window_s, start + window_s * (n + 1)


def _dispatched(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.status == "ok" and r.dispatch_s is not None]


def phase_bounds(records: Sequence[RequestRecord], end: float) -> list[tuple[float, float]]:
    """Phases of a workload whose tenants join one after another: from each tenant's first
    arrival to the next one's (the last to ``end``)."""
    first: dict[str, float] = {}
    for r in records:
        if r.tenant not in first or r.arrival_s < first[r.tenant]:
            first[r.tenant] = r.arrival_s
    starts = sorted(set(first.values()))
    return list(zip(starts, [*starts[1:], end], strict=True))


def window_tokens(
    records: Sequence[RequestRecord], tenants: Sequence[str], window_s: float, end: float
) -> list[dict[str, int]]:
    """Tokens per tenant dispatched in each consecutive window ``[k*w, (k+1)*w)`` to ``end``."""
    n = max(1, int(end / window_s + 1e-9))
    out = [{t: 0 for t in tenants} for _ in range(n)]
    for r in _dispatched(records):
        assert r.dispatch_s is not None
        k = int(r.dispatch_s / window_s)
        if 0 <= k < n:
            out[k][r.tenant] = out[k].get(r.tenant, 0) + r.prompt_tokens + r.output_tokens
    return out


def quota_summary(
    records: Sequence[RequestRecord],
    weights: dict[str, float],
    tpm: int,
    window_s: float,
    end: float,
) -> dict[str, Any]:
    """Per phase (whole windows after its first): the tokens of each tenant present, their
    shares against the weights', the quota used (``util``); the last tenant's shares in its
    first window; the most tokens any sliding window held, as a fraction of ``tpm``."""
    done = _dispatched(records)
    phases = []
    present: list[str] = []
    bounds = phase_bounds(records, end)
    for start, stop in bounds:
        present += [t for t in weights if t not in present and _joins(records, t, start)]
        lo, hi = measured(start, stop, window_s)
        phases.append(_phase(done, present, weights, lo, hi, tpm, window_s))
    last = bounds[-1][0] if bounds else 0.0
    first = _phase(done, present, weights, last, last + window_s, tpm, window_s)
    peak = max_window(
        [(r.dispatch_s or 0.0, r.prompt_tokens + r.output_tokens) for r in done], window_s
    )
    return {
        "tpm": tpm,
        "window_s": window_s,
        "phases": phases,
        "last_first_window": first,
        "max_window_fraction": peak / tpm,
        "refusals": sum(r.refusals for r in records),
        "requests": len(done),
    }


def _joins(records: Sequence[RequestRecord], tenant: str, at: float) -> bool:
    return any(r.tenant == tenant and r.arrival_s <= at for r in records)


def _phase(
    done: Sequence[RequestRecord],
    tenants: Sequence[str],
    weights: dict[str, float],
    start: float,
    end: float,
    tpm: int,
    window_s: float,
) -> dict[str, Any]:
    tokens = {t: 0 for t in tenants}
    for r in done:
        assert r.dispatch_s is not None
        if start <= r.dispatch_s < end and r.tenant in tokens:
            tokens[r.tenant] += r.prompt_tokens + r.output_tokens
    total = sum(tokens.values())
    wsum = sum(weights[t] for t in tenants)
    return {
        "start": start,
        "end": end,
        "tokens": tokens,
        "util": total / (tpm * (end - start) / window_s) if end > start else 0.0,
        "shares": {t: n / total if total else 0.0 for t, n in tokens.items()},
        "fair": {t: weights[t] / wsum for t in tenants},
    }


def quota_table(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown rows: per policy and phase, the quota used and the shares against the
    weights'; the last tenant's first window; the most tokens in a window."""
    lines = [
        "| policy | phase | quota used | shares (fair) | max window |",
        "|---|---|---|---|---|",
    ]
    for policy, s in summaries.items():
        rows = [(" + ".join(p["tokens"]), p) for p in s["phases"]]
        first = s["last_first_window"]
        rows.append((f"{list(first['tokens'])[-1]}'s first window", first))
        for i, (name, p) in enumerate(rows):
            shares = " / ".join(f"{p['shares'][t]:.2f}" for t in p["tokens"])
            fair = " / ".join(f"{p['fair'][t]:.2f}" for t in p["tokens"])
            peak = f"{s['max_window_fraction'] * 100:.1f} %" if i == 0 else ""
            lines.append(
                f"| {policy if i == 0 else ''} | {name} | {p['util'] * 100:.1f} % | "
                f"{shares} ({fair}) | {peak} |"
            )
    return lines
