"""The VTC paper's fairness metrics, as pure functions over per-request records.

Definitions (the VTC paper's, ``docs/lab.md``; the paper's artifact computes the same):

* **service** of a request = ``w_in * prompt_tokens + w_out * output_tokens``, spread uniformly
  over ``[first_token_s, finish_s]`` (a request whose first token is its last is a point mass at
  ``finish_s``). Only completed requests (``status == "ok"``) count as service.
* **service rate** of a tenant at tick ``x``: its service inside the window
  ``[x - window/2, x + window/2]`` divided by ``window``; **demand rate** ``r``: the cost of the
  requests the tenant *sent* (arrival inside the window, rejected ones included) per second.
* **accumulated service** ``W_i(a, b)``: service of tenant i inside ``[a, b]``.
* **service difference** at a tick: ``sum_j min(max_k s_k - s_j, |r_j - s_j|)``, reported as its
  Max / Avg / Var (population variance) over the ticks.
* **accumulated gap** at time t: over every pair of tenants that are *backlogged* at t (a tenant
  is backlogged while one of its requests has arrived and not yet produced its first token), the
  difference of their accumulated service since the later of the starts of their current backlog
  periods (and the warm-up): ``|W_i(a, t) - W_j(a, t)|``. This is the quantity that VTC bounds by
  ``2U`` (both tenants backlogged throughout ``[a, t]``); for tenants that stay backlogged the
  whole run it is exactly the paper's ``max_i W_i - min_i W_i`` since the warm-up.
* Weighted tenants: service and demand are divided by the tenant's weight before comparing
  (a 1:2 weighting is fair when the service is 1:2); with unit weights nothing changes.
* **throughput** = prompt + output tokens of completed requests / run time, where the run time is
  ``max(duration, last finish)`` (the paper's benchmark time: until the last response).
* the bound ``2U`` with ``U = max(w_in * L_input, w_out * M)``: ``L_input`` the longest prompt,
  ``M`` the token capacity of the running batch (the KV budget).

Ticks, generalising the paper's ``T = 600 s, 30 s warm-up``: for a workload of duration ``T``
the warm-up is ``T / 20``, the window ``min(60, T / 2)`` s and the 19 ticks for Max/Avg/Var sit
at ``warmup + (T - warmup) * i / 20`` for ``i = 1..19``; for ``T = 600`` these are exactly the
artifact's (30 s warm-up, 60 s window, ticks 58.5, 87, ..., 571.5). The maximum accumulated gap
is taken over a finer grid of 100 steps from the warm-up to ``T``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from gateway.scheduler import Prices

STATUSES = ("ok", "rejected", "cancelled", "error")


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request; times in seconds from the workload start."""

    tenant: str
    arrival_s: float
    first_token_s: float | None
    finish_s: float | None
    prompt_tokens: int
    output_tokens: int
    status: str = "ok"
    #: what the client sent as ``max_tokens`` (None: unset, or not recorded)
    max_tokens: int | None = None
    #: when the gateway sent it to the backend (None: not recorded; quota runs record it)
    dispatch_s: float | None = None
    #: times a rate-limited provider refused it with 429 (the gateway requeued it each time)
    refusals: int = 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.dispatch_s is None:  # recorded by quota runs only
            del d["dispatch_s"], d["refusals"]
        return d

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> RequestRecord:
        return cls(
            tenant=str(d["tenant"]),
            arrival_s=float(d["arrival_s"]),
            first_token_s=None if d.get("first_token_s") is None else float(d["first_token_s"]),
            finish_s=None if d.get("finish_s") is None else float(d["finish_s"]),
            prompt_tokens=int(d["prompt_tokens"]),
            output_tokens=int(d["output_tokens"]),
            status=str(d.get("status", "ok")),
            max_tokens=None if d.get("max_tokens") is None else int(d["max_tokens"]),
            dispatch_s=None if d.get("dispatch_s") is None else float(d["dispatch_s"]),
            refusals=int(d.get("refusals", 0)),
        )


@dataclass(frozen=True, slots=True)
class Ticks:
    """Where the windowed metrics are evaluated (see the module docstring)."""

    duration: float
    warmup: float
    window: float
    points: tuple[float, ...]

    @classmethod
    def for_duration(cls, duration: float, num: int = 20) -> Ticks:
        warmup = duration / 20.0
        window = min(60.0, duration / 2.0)
        pts = tuple(warmup + (duration - warmup) * i / num for i in range(1, num))
        return cls(duration, warmup, window, pts)

    def fine(self, steps: int = 100) -> list[float]:
        span = self.duration - self.warmup
        return [self.warmup + span * i / steps for i in range(1, steps + 1)]


@dataclass(frozen=True, slots=True)
class Summary:
    max_diff: float
    avg_diff: float
    diff_var: float
    max_acc_gap: float
    bound_2u: float
    throughput_tok_s: float
    rejected: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


# -- service -----------------------------------------------------------------------------------
def request_cost(r: RequestRecord, prices: Prices) -> float:
    return prices.cost(r.prompt_tokens, r.output_tokens)


def served(r: RequestRecord) -> bool:
    return r.status == "ok" and r.first_token_s is not None and r.finish_s is not None


def service_in(r: RequestRecord, a: float, b: float, prices: Prices) -> float:
    """Service of one request inside ``[a, b]`` (uniform over its streaming interval)."""
    if not served(r) or b <= a:
        return 0.0
    start, end = r.first_token_s, r.finish_s
    assert start is not None and end is not None
    cost = request_cost(r, prices)
    if end - start <= 1e-12:
        return cost if a < end <= b else 0.0
    overlap = min(b, end) - max(a, start)
    return cost * overlap / (end - start) if overlap > 0 else 0.0


def accumulated_service(
    records: Iterable[RequestRecord], tenant: str, a: float, b: float, prices: Prices
) -> float:
    """``W_tenant(a, b)``."""
    return sum(service_in(r, a, b, prices) for r in records if r.tenant == tenant)


def level_shares(
    records: Iterable[RequestRecord],
    paths: Mapping[str, str],
    a: float,
    b: float,
    prices: Prices,
) -> dict[int, dict[str, float]]:
    """Share of the service in ``[a, b]`` of every node of the tenant tree, per level (1: the
    top): ``{level: {path: share}}``; ``paths`` maps a tenant to ``org/team/tenant``."""
    per_tenant: dict[str, float] = {}
    for r in records:
        per_tenant[r.tenant] = per_tenant.get(r.tenant, 0.0) + service_in(r, a, b, prices)
    total = sum(per_tenant.values()) or 1.0
    out: dict[int, dict[str, float]] = {}
    for tenant, path in paths.items():
        parts = path.split("/")
        for level in range(1, len(parts) + 1):
            node = "/".join(parts[:level])
            shares = out.setdefault(level, {})
            shares[node] = shares.get(node, 0.0) + per_tenant.get(tenant, 0.0) / total
    return out


def by_tenant(
    records: Iterable[RequestRecord], tenants: Iterable[str] = ()
) -> dict[str, list[RequestRecord]]:
    out: dict[str, list[RequestRecord]] = {t: [] for t in tenants}
    for r in records:
        out.setdefault(r.tenant, []).append(r)
    return out


def service_rates(
    groups: Mapping[str, Sequence[RequestRecord]],
    ticks: Sequence[float],
    window: float,
    prices: Prices,
) -> dict[str, list[float]]:
    """Service rate (weighted tokens/s) per tenant at each tick, over a centred window."""
    half = window / 2.0
    return {
        t: [sum(service_in(r, x - half, x + half, prices) for r in recs) / window for x in ticks]
        for t, recs in groups.items()
    }


def demand_rates(
    groups: Mapping[str, Sequence[RequestRecord]],
    ticks: Sequence[float],
    window: float,
    prices: Prices,
    include_rejected: bool = True,
) -> dict[str, list[float]]:
    """Demand rate per tenant at each tick: cost of requests sent inside the window per second.

    ``include_rejected=False`` is the artifact's convention (it drops rejected requests before
    computing anything), which makes a rate limiter look fairer than it is.
    """
    half = window / 2.0
    out: dict[str, list[float]] = {}
    for t, recs in groups.items():
        arrivals = sorted(
            (r.arrival_s, request_cost(r, prices))
            for r in recs
            if include_rejected or r.status != "rejected"
        )
        times = [a for a, _ in arrivals]
        prefix = [0.0]
        for _, c in arrivals:
            prefix.append(prefix[-1] + c)
        row = []
        for x in ticks:
            lo = bisect.bisect_left(times, x - half)
            hi = bisect.bisect_right(times, x + half)
            row.append((prefix[hi] - prefix[lo]) / window)
        out[t] = row
    return out


def service_difference(
    service: Mapping[str, Sequence[float]],
    demand: Mapping[str, Sequence[float]],
    weights: Mapping[str, float] | None = None,
) -> list[float]:
    """Per tick: ``sum_j min(max_k s_k - s_j, |r_j - s_j|)`` (rates divided by weights)."""
    w = weights or {}
    names = list(service)
    if not names:
        return []
    n = len(service[names[0]])
    out = []
    for i in range(n):
        s = {t: service[t][i] / w.get(t, 1.0) for t in names}
        top = max(s.values())
        out.append(sum(min(top - s[t], abs(demand[t][i] / w.get(t, 1.0) - s[t])) for t in names))
    return out


def stats(values: Sequence[float]) -> tuple[float, float, float]:
    """(max, mean, population variance); zeros for an empty sequence."""
    if not values:
        return 0.0, 0.0, 0.0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return max(values), mean, var


# -- backlog and accumulated gap ---------------------------------------------------------------
def backlog_periods(recs: Iterable[RequestRecord]) -> list[tuple[float, float]]:
    """Merged intervals during which the tenant had a request waiting for its first token."""
    spans = []
    for r in recs:
        if r.status == "rejected":
            continue
        if r.status in ("error", "cancelled") and r.first_token_s is None and r.finish_s is None:
            continue  # refused (400) or gone before it was served: never waiting
        end = r.first_token_s if r.first_token_s is not None else r.finish_s
        if end is None:
            end = math.inf
        if end > r.arrival_s:
            spans.append((r.arrival_s, end))
    spans.sort()
    merged: list[tuple[float, float]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            if e > merged[-1][1]:
                merged[-1] = (merged[-1][0], e)
        else:
            merged.append((s, e))
    return merged


def _backlog_start(periods: Sequence[tuple[float, float]], t: float) -> float | None:
    i = bisect.bisect_right(periods, (t, math.inf)) - 1
    if i >= 0 and periods[i][0] <= t < periods[i][1]:
        return periods[i][0]
    return None


def accumulated_gap(
    groups: Mapping[str, Sequence[RequestRecord]],
    times: Sequence[float],
    prices: Prices,
    weights: Mapping[str, float] | None = None,
    since: float = 0.0,
) -> list[float]:
    """Max over backlogged pairs of ``|W_i(a, t)/w_i - W_j(a, t)/w_j|`` at each time ``t``."""
    w = weights or {}
    periods = {t: backlog_periods(recs) for t, recs in groups.items()}
    out = []
    for t in times:
        starts = {}
        for name, ps in periods.items():
            s = _backlog_start(ps, t)
            if s is not None:
                starts[name] = max(s, since)
        out.append(_max_pair_gap(groups, starts, t, prices, w))
    return out


def _max_pair_gap(
    groups: Mapping[str, Sequence[RequestRecord]],
    starts: Mapping[str, float],
    t: float,
    prices: Prices,
    weights: Mapping[str, float],
) -> float:
    """Max over pairs of backlogged tenants of their weighted service gap since both started."""
    cache: dict[tuple[str, float], float] = {}

    def acc(name: str, a: float) -> float:
        key = (name, a)
        if key not in cache:
            total = sum(service_in(r, a, t, prices) for r in groups[name])
            cache[key] = total / weights.get(name, 1.0)
        return cache[key]

    names = sorted(starts)
    best = 0.0
    for i, a_name in enumerate(names):
        for b_name in names[i + 1 :]:
            a = max(starts[a_name], starts[b_name])
            if a < t:
                best = max(best, abs(acc(a_name, a) - acc(b_name, a)))
    return best


# -- throughput, latency, bound ----------------------------------------------------------------
def run_time(records: Iterable[RequestRecord], duration: float) -> float:
    last = max((r.finish_s for r in records if r.finish_s is not None), default=0.0)
    return max(duration, last)


def throughput(records: Sequence[RequestRecord], duration: float) -> float:
    """Prompt + output tokens of completed requests per second of run time."""
    tokens = sum(r.prompt_tokens + r.output_tokens for r in records if served(r))
    span = run_time(records, duration)
    return tokens / span if span > 0 else 0.0


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def first_token_latencies(recs: Iterable[RequestRecord]) -> list[float]:
    return [r.first_token_s - r.arrival_s for r in recs if r.first_token_s is not None]


def latency_percentiles(
    groups: Mapping[str, Sequence[RequestRecord]],
) -> dict[str, tuple[float, float]]:
    """First-token latency (p50, p99) per tenant, in seconds."""
    out = {}
    for t, recs in groups.items():
        lat = first_token_latencies(recs)
        out[t] = (quantile(lat, 0.5), quantile(lat, 0.99))
    return out


def bound_2u(prices: Prices, longest_prompt: int, batch_tokens: int) -> float:
    """``2 * max(w_in * L_input, w_out * M)``."""
    return 2.0 * max(prices.input * longest_prompt, prices.output * batch_tokens)


def summarize(
    records: Sequence[RequestRecord],
    tenants: Mapping[str, float],
    duration: float,
    prices: Prices,
    batch_tokens: int,
    longest_prompt: int | None = None,
    demand_includes_rejected: bool = True,
) -> Summary:
    """All the table's numbers for one run (``tenants``: name -> weight)."""
    ticks = Ticks.for_duration(duration)
    groups = by_tenant(records, tenants)
    svc = service_rates(groups, ticks.points, ticks.window, prices)
    dem = demand_rates(groups, ticks.points, ticks.window, prices, demand_includes_rejected)
    mx, avg, var = stats(service_difference(svc, dem, tenants))
    gaps = accumulated_gap(groups, ticks.fine(), prices, tenants, since=ticks.warmup)
    if longest_prompt is None:
        longest_prompt = max((r.prompt_tokens for r in records), default=0)
    return Summary(
        max_diff=mx,
        avg_diff=avg,
        diff_var=var,
        max_acc_gap=max(gaps, default=0.0),
        bound_2u=bound_2u(prices, longest_prompt, batch_tokens),
        throughput_tok_s=throughput(records, duration),
        rejected=sum(1 for r in records if r.status == "rejected"),
    )
