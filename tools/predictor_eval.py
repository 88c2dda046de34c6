"""Output-length prediction for KV admission: does a learned model beat the per-tenant p90?

    python -m tools.predictor_eval [--trace arena,synthetic,FILE.csv] [--out FILE]
                                   [--no-learned] [--no-lab]

``kv_admission: predict`` plans each running request's KV memory for a predicted output: the
bound of :class:`gateway.scheduler.predictor.OutputPredictor`, the 90th percentile of the last
128 lengths of the request's tenant, model and endpoint. This script measures that estimator
against the alternatives on traces whose lengths vary by tenant:

* ``global``: the same p90 over everyone's lengths (no tenant);
* ``tenant`` (as shipped): ``OutputPredictor.bound``, per tenant with the model's history as the
  fallback below 8 lengths;
* ``tenant+prompt``: per tenant and prompt-length bucket (``< 64``, ``< 256``, ``< 1024``, more),
  falling back to the tenant, then to everyone; no learning;
* ``learned``: quantile regression (pinball loss at 0.9, on ``log1p`` of the length) by a tiny
  MLP in torch (CPU) on ``log1p(prompt)``, a one-hot of the tenant and the tenant's and
  everyone's recent statistics; trained online: first fit once 256 requests have finished, a
  fresh fit every 128 after, each on the features every finished request had when it arrived.
  Only where torch imports (``pip install torch``, or the vLLM venv's interpreter); skipped
  otherwise.

**Online, in arrival order.** A request's prediction uses only requests that finished before
it arrived, a request finishing :data:`SECONDS_PER_TOKEN` seconds per output token after its
arrival (a 50 tokens/s stream; queueing ignored). Clients send no ``max_tokens``: the cap is the
rest of a :data:`CONTEXT`-token context, the predictor's default answers (1,024 tokens for a key
never seen) included. Every estimator is scored on the same requests: those arriving after the
first ``--skip`` of the trace (0.3 by default: every estimator, the learned one included, has
history by then).

**Metrics** (over the scored requests): ``coverage``, the fraction whose output fits the bound
(target 0.9: a request past its bound is a candidate for preemption); ``over-plan``, the mean of
``bound - actual`` over the covered ones (KV memory planned and never used, in tokens);
``short``, the mean of ``actual - bound`` over the others; ``planned``, the mean bound (the KV
plan per request); ``pinball``, the mean pinball loss at 0.9 (one score for both sides, lower is
better); and the worst coverage of a tenant with at least 20 scored requests.

**The lab** (unless ``--no-lab``): ``gateway.lab.simulate`` on each trace with clients that send
no ``max_tokens``, the paper's a10g-llama2-7b profile, a 10,000-token KV cache, the gateway's
``predict`` admission under ``vtc`` and an engine with vLLM's block admission (it preempts when
the cache runs out), once per estimator (the core's ``expect`` answered by the estimator, which
learns at each release) and once for the engine alone (``direct``): output tokens/s,
preemptions, latency.

Traces: ``arena`` (the shipped 600 s Chatbot Arena trace, 27 tenants), ``synthetic`` (four
tenants, see :func:`synthetic_trace`) or a CSV in the lab's format.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import platform
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from unittest import mock

from gateway.scheduler.predictor import DEFAULT_PRIOR, OutputPredictor

#: Seconds per output token from arrival to finish (when a length becomes known).
SECONDS_PER_TOKEN = 0.02
#: Context of the model: a request may generate up to ``CONTEXT - prompt`` tokens.
CONTEXT = 4096
QUANTILE = 0.9
WINDOW = 128
MIN_SAMPLES = 8
#: Prompt-length bucket edges of ``tenant+prompt`` (tokens).
PROMPT_EDGES = (64, 256, 1024)
#: Tenants with fewer scored requests are left out of the worst-tenant column.
MIN_TENANT_REQUESTS = 20
_MODEL, _ENDPOINT = "m", "chat"


@dataclass(frozen=True, slots=True)
class Request:
    arrival_s: float
    tenant: str
    prompt_tokens: int
    output_tokens: int


# -- traces ------------------------------------------------------------------------------------
def arena_trace() -> list[Request]:
    """The lab's Chatbot Arena trace (1,500 requests, 27 tenants, 600 s)."""
    from gateway.lab.workloads import arena_trace_path

    return csv_trace(arena_trace_path())


def csv_trace(path: str | Path) -> list[Request]:
    """A trace in the lab's CSV format (``arrival_s,tenant,prompt_tokens,output_tokens``)."""
    from gateway.lab.workloads import load_csv

    wl = load_csv(path)
    return [Request(r.arrival_s, r.tenant, r.prompt_tokens, r.output_tokens) for r in wl.requests]


@dataclass(frozen=True, slots=True)
class SyntheticTenant:
    """Poisson arrivals at ``rate``/s, log-uniform prompts in ``prompt``; output log-normal
    with median ``median`` tokens, or ``per_prompt`` x the prompt when that is set."""

    name: str
    rate: float
    prompt: tuple[int, int]
    sigma: float
    median: float = 0.0
    per_prompt: float = 0.0


#: Four tenants with different lengths, two of them following their prompt's length.
SYNTHETIC: tuple[SyntheticTenant, ...] = (
    SyntheticTenant("chat", 1.0, (16, 512), 0.8, median=80),
    SyntheticTenant("code", 0.25, (64, 1024), 0.5, median=400),
    SyntheticTenant("summarize", 0.15, (512, 2560), 0.35, per_prompt=0.12),
    SyntheticTenant("rewrite", 0.2, (32, 1024), 0.2, per_prompt=1.0),
)


def synthetic_trace(
    tenants: Sequence[SyntheticTenant] = SYNTHETIC, duration_s: float = 600.0, seed: int = 42
) -> list[Request]:
    """Requests of ``tenants`` over ``duration_s``, in arrival order; outputs end at the
    context."""
    out: list[Request] = []
    for i, spec in enumerate(tenants):
        rng = random.Random(f"{seed}:{i}:{spec.name}")
        t = rng.expovariate(spec.rate)
        lo, hi = spec.prompt
        while t < duration_s:
            prompt = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
            median = spec.per_prompt * prompt if spec.per_prompt else spec.median
            output = max(1, round(median * math.exp(rng.gauss(0.0, spec.sigma))))
            out.append(Request(t, spec.name, prompt, min(output, CONTEXT - prompt)))
            t += rng.expovariate(spec.rate)
    out.sort(key=lambda r: r.arrival_s)
    return out


def load_trace(spec: str) -> tuple[str, list[Request]]:
    if spec == "arena":
        return "arena", arena_trace()
    if spec == "synthetic":
        return "synthetic", synthetic_trace()
    if spec.startswith("synthetic:"):  # another seed
        return spec, synthetic_trace(seed=int(spec.split(":", 1)[1]))
    if spec.endswith(".csv"):
        return Path(spec).stem, csv_trace(spec)
    raise ValueError(f"unknown trace {spec!r}: arena, synthetic[:SEED] or a .csv file")


# -- estimators --------------------------------------------------------------------------------
class Estimator(Protocol):
    name: str

    def predict(self, ident: int, tenant: str, prompt_tokens: int, cap: int) -> int:
        """Output tokens to plan for request ``ident`` (at most ``cap``)."""
        ...

    def observe(self, ident: int, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        """Request ``ident`` finished after ``output_tokens`` tokens."""
        ...


class GlobalP90:
    """The shipped predictor's p90 over everyone's lengths: no tenant."""

    name = "global"

    def __init__(self) -> None:
        self.p = OutputPredictor(quantile=QUANTILE, window=WINDOW, min_samples=MIN_SAMPLES)

    def predict(self, ident: int, tenant: str, prompt_tokens: int, cap: int) -> int:
        return self.p.bound(("", _MODEL, _ENDPOINT), cap)

    def observe(self, ident: int, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        self.p.observe(("", _MODEL, _ENDPOINT), output_tokens)


class TenantP90:
    """:meth:`OutputPredictor.bound` as shipped (per tenant, the model's history below 8)."""

    name = "tenant"

    def __init__(self) -> None:
        self.p = OutputPredictor(quantile=QUANTILE, window=WINDOW, min_samples=MIN_SAMPLES)

    def predict(self, ident: int, tenant: str, prompt_tokens: int, cap: int) -> int:
        return self.p.bound((tenant, _MODEL, _ENDPOINT), cap)

    def observe(self, ident: int, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        self.p.observe((tenant, _MODEL, _ENDPOINT), output_tokens)


class _Window:
    """The last ``size`` values, with the quantile rule of :meth:`OutputPredictor.bound`."""

    __slots__ = ("_sorted", "lengths")

    def __init__(self, size: int = WINDOW) -> None:
        self.lengths: deque[float] = deque(maxlen=size)
        self._sorted: list[float] | None = None

    def add(self, n: float) -> None:
        self.lengths.append(n)
        self._sorted = None

    def __len__(self) -> int:
        return len(self.lengths)

    def quantile(self, q: float) -> float:
        s = self._sorted
        if s is None:
            s = self._sorted = sorted(self.lengths)
        return s[min(len(s) - 1, int(q * len(s)))]

    def bound(self) -> int:
        if len(self.lengths) < MIN_SAMPLES:
            top = int(max(self.lengths))
            return max(top, min(DEFAULT_PRIOR, 2 * top))
        return int(self.quantile(QUANTILE))


def prompt_bucket(prompt_tokens: int) -> int:
    return bisect.bisect_right(PROMPT_EDGES, prompt_tokens)


class TenantPromptP90:
    """p90 per tenant and prompt-length bucket; the tenant's, then everyone's, below 8."""

    name = "tenant+prompt"

    def __init__(self) -> None:
        self.windows: dict[tuple[str, int], _Window] = {}

    def _window(self, key: tuple[str, int]) -> _Window:
        w = self.windows.get(key)
        if w is None:
            w = self.windows[key] = _Window()
        return w

    def predict(self, ident: int, tenant: str, prompt_tokens: int, cap: int) -> int:
        keys = ((tenant, prompt_bucket(prompt_tokens)), (tenant, -1), ("", -1))
        found = [w for k in keys if (w := self.windows.get(k)) is not None and len(w)]
        for w in found:
            if len(w) >= MIN_SAMPLES:
                return min(cap, w.bound())
        return min(cap, found[0].bound() if found else DEFAULT_PRIOR)

    def observe(self, ident: int, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        n = max(0, output_tokens)
        for key in ((tenant, prompt_bucket(prompt_tokens)), (tenant, -1), ("", -1)):
            self._window(key).add(n)


class LearnedQuantile:
    """Quantile regression (pinball loss at 0.9) of ``log1p(output)`` by a small MLP, trained
    online on the features each finished request had when it arrived; the shipped estimator
    answers until the first fit. Needs torch."""

    MAX_TENANTS = 64

    def __init__(
        self,
        *,
        conformal: bool = False,
        first_fit: int = 256,
        refit_every: int = 128,
        hidden: int = 32,
        epochs: int = 400,
        max_rows: int = 4096,
        seed: int = 0,
    ) -> None:
        import torch

        torch.set_num_threads(1)
        self.torch: Any = torch
        self.name = "learned+conformal" if conformal else "learned"
        self.conformal = conformal
        #: out-of-sample log residuals of the fitted models' raw answers (conformal offset)
        self.residuals = _Window(256)
        self.first_fit = first_fit
        self.refit_every = refit_every
        self.hidden = hidden
        self.epochs = epochs
        self.seed = seed
        self.fallback = TenantP90()
        self.tenant_ids: dict[str, int] = {}
        self.tenant_windows: dict[str, _Window] = {}
        self.everyone = _Window()
        self.pending: dict[int, tuple[list[float], float | None]] = {}
        self.rows: deque[tuple[list[float], float]] = deque(maxlen=max_rows)
        self.since_fit = 0
        self.fits = 0
        self.fit_seconds = 0.0
        self.model: Any = None
        self._scale: Any = None  # (mean, std) of the features at the last fit

    def features(self, tenant: str, prompt_tokens: int) -> list[float]:
        tw = self.tenant_windows.get(tenant)
        ev = self.everyone
        src = tw if tw is not None and len(tw) >= MIN_SAMPLES else ev
        if len(src):
            p90, p50 = src.bound(), src.quantile(0.5)
        else:
            p90 = p50 = DEFAULT_PRIOR
        onehot = [0.0] * self.MAX_TENANTS
        tid = self.tenant_ids.setdefault(tenant, min(len(self.tenant_ids), self.MAX_TENANTS - 1))
        onehot[tid] = 1.0
        return [
            math.log1p(prompt_tokens),
            math.log1p(p90),
            math.log1p(p50),
            math.log1p(len(tw) if tw is not None else 0),
            math.log1p(ev.quantile(QUANTILE) if len(ev) else DEFAULT_PRIOR),
            *onehot,
        ]

    def predict(self, ident: int, tenant: str, prompt_tokens: int, cap: int) -> int:
        x = self.features(tenant, prompt_tokens)
        if self.model is None:
            self.pending[ident] = (x, None)
            return self.fallback.predict(ident, tenant, prompt_tokens, cap)
        torch = self.torch
        with torch.no_grad():
            mean, std = self._scale
            y = float(self.model((torch.tensor([x]) - mean) / std)[0, 0])
        self.pending[ident] = (x, y)
        if self.conformal and len(self.residuals) >= MIN_SAMPLES:
            y += self.residuals.quantile(QUANTILE)
        return max(1, min(cap, math.ceil(math.expm1(min(y, 20.0)))))

    def observe(self, ident: int, tenant: str, prompt_tokens: int, output_tokens: int) -> None:
        n = max(0, output_tokens)
        got = self.pending.pop(ident, None)
        # finished without a prediction: its features as of now
        x, raw = got if got is not None else (self.features(tenant, prompt_tokens), None)
        self.rows.append((x, math.log1p(n)))
        if raw is not None:
            self.residuals.add(math.log1p(n) - raw)
        self.fallback.observe(ident, tenant, prompt_tokens, n)
        w = self.tenant_windows.get(tenant)
        if w is None:
            w = self.tenant_windows[tenant] = _Window()
        w.add(n)
        self.everyone.add(n)
        self.since_fit += 1
        if len(self.rows) >= self.first_fit and (
            self.model is None or self.since_fit >= self.refit_every
        ):
            self.fit()

    def fit(self) -> None:
        torch = self.torch
        started = time.perf_counter()
        torch.manual_seed(self.seed + self.fits)
        x = torch.tensor([r[0] for r in self.rows])
        y = torch.tensor([[r[1]] for r in self.rows])
        mean = x.mean(0)
        std = x.std(0).clamp_min(1e-3)
        xs = (x - mean) / std
        nn = torch.nn
        d = x.shape[1]
        model = (
            nn.Sequential(nn.Linear(d, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))
            if self.hidden
            else nn.Linear(d, 1)
        )
        opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=1e-4)
        for _ in range(self.epochs):
            opt.zero_grad()
            err = y - model(xs)
            loss = torch.maximum(QUANTILE * err, (QUANTILE - 1.0) * err).mean()
            loss.backward()
            opt.step()
        model.eval()
        self.model, self._scale = model, (mean, std)
        self.fits += 1
        self.since_fit = 0
        self.fit_seconds += time.perf_counter() - started


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def make_estimators(learned: bool) -> list[Estimator]:
    out: list[Estimator] = [GlobalP90(), TenantP90(), TenantPromptP90()]
    if learned:
        out += [LearnedQuantile(), LearnedQuantile(conformal=True)]
    return out


# -- offline evaluation ------------------------------------------------------------------------
@dataclass(slots=True)
class Scores:
    """Bounds and actual lengths of the scored requests, for one estimator."""

    tenants: list[str] = field(default_factory=list)
    bounds: list[int] = field(default_factory=list)
    actual: list[int] = field(default_factory=list)

    def add(self, tenant: str, bound: int, actual: int) -> None:
        self.tenants.append(tenant)
        self.bounds.append(bound)
        self.actual.append(actual)

    def summary(self) -> dict[str, Any]:
        pairs = list(zip(self.bounds, self.actual, strict=True))
        covered = [b - a for b, a in pairs if a <= b]
        short = [a - b for b, a in pairs if a > b]
        n = len(pairs)
        per: dict[str, list[tuple[int, int]]] = {}
        for t, pair in zip(self.tenants, pairs, strict=True):
            per.setdefault(t, []).append(pair)
        per_tenant = {
            t: {
                "n": len(v),
                "coverage": sum(a <= b for b, a in v) / len(v),
                "planned": statistics.fmean(b for b, _ in v),
                "actual": statistics.fmean(a for _, a in v),
            }
            for t, v in sorted(per.items())
        }
        big = {t: s for t, s in per_tenant.items() if s["n"] >= MIN_TENANT_REQUESTS}
        worst = min(big, key=lambda t: big[t]["coverage"]) if big else None
        return {
            "n": n,
            "coverage": len(covered) / n if n else math.nan,
            "over_plan": statistics.fmean(covered) if covered else 0.0,
            "short": statistics.fmean(short) if short else 0.0,
            "planned": statistics.fmean(self.bounds) if n else math.nan,
            "actual": statistics.fmean(self.actual) if n else math.nan,
            "pinball": statistics.fmean(_pinball(b, a) for b, a in pairs) if n else math.nan,
            "worst_tenant": worst,
            "worst_tenant_coverage": big[worst]["coverage"] if worst else math.nan,
            "per_tenant": per_tenant,
        }


def _pinball(bound: int, actual: int, q: float = QUANTILE) -> float:
    err = actual - bound
    return q * err if err >= 0 else (q - 1.0) * err


def evaluate(
    trace: Sequence[Request],
    estimators: Sequence[Estimator],
    *,
    seconds_per_token: float = SECONDS_PER_TOKEN,
    context: int = CONTEXT,
    skip: float = 0.3,
) -> dict[str, dict[str, Any]]:
    """Replay ``trace`` in arrival order; each estimator predicts every request from the
    requests finished before it arrived (``arrival + output * seconds_per_token``). Requests
    arriving after ``skip`` of the trace's span are scored; returns name -> summary."""
    reqs = sorted(trace, key=lambda r: r.arrival_s)
    if not reqs:
        raise ValueError("empty trace")
    start = reqs[0].arrival_s
    scored_from = start + skip * (reqs[-1].arrival_s - start)
    scores = {e.name: Scores() for e in estimators}
    running: list[tuple[float, int]] = []  # (finish, index)
    for i, r in enumerate(reqs):
        while running and running[0][0] <= r.arrival_s:
            _, j = heapq.heappop(running)
            done = reqs[j]
            for e in estimators:
                e.observe(j, done.tenant, done.prompt_tokens, done.output_tokens)
        cap = max(1, context - r.prompt_tokens)
        for e in estimators:
            bound = e.predict(i, r.tenant, r.prompt_tokens, cap)
            if r.arrival_s >= scored_from:
                scores[e.name].add(r.tenant, bound, r.output_tokens)
        heapq.heappush(running, (r.arrival_s + r.output_tokens * seconds_per_token, i))
    return {name: s.summary() for name, s in scores.items()}


# -- the lab -----------------------------------------------------------------------------------
@contextmanager
def _estimator_in_core(est: Estimator) -> Iterator[list[int]]:
    """Every :class:`DispatchCore` plans with ``est`` (``expect``) and teaches it at release;
    yields the list of the bounds the finished requests were planned with."""
    from gateway.core import DispatchCore

    original_release = DispatchCore.release
    seen: dict[int, int] = {}  # id(job) -> observations when last predicted
    cached: dict[int, int] = {}
    count = [0]
    planned: list[int] = []

    def expect(core: DispatchCore, job: Any) -> int:
        key = id(job)
        if seen.get(key) != count[0]:
            seen[key] = count[0]
            cached[key] = est.predict(key, job.tenant, job.prompt_tokens, job.max_tokens)
        return cached[key]

    def release(
        core: DispatchCore, job: Any, grant: Any, ran: bool = True, output_tokens: Any = None
    ) -> None:
        key = id(job)
        seen.pop(key, None)
        bound = cached.pop(key, None)
        if ran:
            if bound is not None:
                planned.append(bound)
            out = job.output_tokens if output_tokens is None else output_tokens
            est.observe(key, job.tenant, job.prompt_tokens, out)
            count[0] += 1
        original_release(core, job, grant, ran, output_tokens)

    with (
        mock.patch.object(DispatchCore, "expect", expect),
        mock.patch.object(DispatchCore, "release", release),
    ):
        yield planned


def lab_compare(
    name: str,
    trace: Sequence[Request],
    estimators: Callable[[], list[Estimator]],
    *,
    policy: str = "vtc",
) -> list[dict[str, Any]]:
    """The lab on ``trace`` (clients without ``max_tokens``), the engine alone and then the
    gateway with each estimator; one row each."""
    from gateway.lab.metrics import quantile
    from gateway.lab.simulate import SimConfig, simulate
    from gateway.lab.workloads import Workload, WorkloadRequest, parse_max_tokens

    reqs = [WorkloadRequest(r.arrival_s, r.tenant, r.prompt_tokens, r.output_tokens) for r in trace]
    last = max(r.arrival_s for r in trace)
    wl = Workload(
        name,
        float(max(1, math.ceil(last))),
        {t: 1.0 for t in sorted({r.tenant for r in trace})},
        reqs,
    ).with_max_tokens(parse_max_tokens("none"))
    config = SimConfig(
        profile="a10g-llama2-7b",
        kv_cache_tokens=10_000,
        kv_admission="predict",
        engine_kv_admission="blocks",
    )
    runs: list[tuple[str, str, Estimator | None]] = [("direct", "direct", None)]
    runs += [(e.name, policy, e) for e in estimators()]
    rows = []
    for label, pol, est in runs:
        started = time.perf_counter()
        planned: list[int] = []
        if est is None:
            res = simulate(wl, pol, config)
        else:
            with _estimator_in_core(est) as planned:
                res = simulate(wl, pol, config)
        ok = [r for r in res.records if r.status == "ok" and r.finish_s is not None]
        span = max(wl.duration_s, res.end_time)
        lat = [r.finish_s - r.arrival_s for r in ok if r.finish_s is not None]
        ttft = [r.first_token_s - r.arrival_s for r in ok if r.first_token_s is not None]
        rows.append(
            {
                "trace": name,
                "path": label,
                "output_tok_s": sum(r.output_tokens for r in ok) / span,
                "tok_s": sum(r.prompt_tokens + r.output_tokens for r in ok) / span,
                "preemptions": res.preemptions,
                "planned": statistics.fmean(planned) if planned else math.nan,
                "latency_p50": quantile(lat, 0.5),
                "latency_p99": quantile(lat, 0.99),
                "ttft_p50": quantile(ttft, 0.5),
                "completed": len(ok),
                "end_s": res.end_time,
                "wall_s": time.perf_counter() - started,
            }
        )
    return rows


# -- verdict and report ------------------------------------------------------------------------
def beats(candidate: dict[str, Any], base: dict[str, Any]) -> bool:
    """Does ``candidate`` clearly beat ``base``: coverage 0.02 higher at no more over-plan, or
    the same coverage (within 0.01) with a fifth less over-plan?"""
    cov, over = candidate["coverage"], candidate["over_plan"]
    return bool(
        (cov >= base["coverage"] + 0.02 and over <= base["over_plan"])
        or (cov >= base["coverage"] - 0.01 and over <= 0.8 * base["over_plan"])
    )


def verdict(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Per trace, which estimators beat the shipped one (:func:`beats`); a learned variant wins
    only if it was evaluated on every trace and beats the shipped estimator on each."""
    per_trace: dict[str, list[str]] = {}
    for trace, by_name in results.items():
        base = by_name["tenant"]
        per_trace[trace] = [n for n, s in by_name.items() if n != "tenant" and beats(s, base)]
    learned = sorted({n for by_name in results.values() for n in by_name if "learned" in n})
    winners = [
        n
        for n in learned
        if results and all(n in by_name and n in per_trace[t] for t, by_name in results.items())
    ]
    return {
        "beats_tenant": per_trace,
        "learned_evaluated": learned,
        "winner": winners[0] if winners else "tenant",
    }


def format_offline(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| trace | estimator | coverage | over-plan | short | planned | pinball "
        "| worst tenant (coverage) |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for trace, by_name in results.items():
        for name, s in by_name.items():
            worst = (
                f"{s['worst_tenant']} ({s['worst_tenant_coverage']:.2f})"
                if s["worst_tenant"]
                else "-"
            )
            lines.append(
                f"| {trace} | {name} | {s['coverage']:.3f} | {s['over_plan']:.0f} "
                f"| {s['short']:.0f} | {s['planned']:.0f} | {s['pinball']:.1f} | {worst} |"
            )
    return "\n".join(lines)


def format_lab(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| trace | path | output tok/s | tok/s | preemptions | planned | latency p50 / p99 (s) "
        "| TTFT p50 (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['trace']} | {r['path']} | {r['output_tok_s']:.1f} | {r['tok_s']:.1f} "
            f"| {r['preemptions']} | {'-' if math.isnan(r['planned']) else round(r['planned'])} "
            f"| {r['latency_p50']:.2f} / {r['latency_p99']:.2f} "
            f"| {r['ttft_p50']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.predictor_eval", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument(
        "--trace", default="arena,synthetic", help="arena, synthetic, synthetic:SEED, FILE.csv"
    )
    ap.add_argument("--skip", type=float, default=0.3, help="unscored head of each trace")
    ap.add_argument("--no-learned", action="store_true", help="leave the torch model out")
    ap.add_argument("--no-lab", action="store_true", help="offline evaluation only")
    ap.add_argument("--out", type=Path, help="write the results as JSON")
    args = ap.parse_args(argv)

    learned = not args.no_learned and torch_available()
    if not args.no_learned and not learned:
        print("torch is not installed: the learned model is skipped", file=sys.stderr)
    traces = [load_trace(s.strip()) for s in args.trace.split(",") if s.strip()]
    offline: dict[str, dict[str, dict[str, Any]]] = {}
    fits: dict[str, dict[str, dict[str, float]]] = {}
    for name, trace in traces:
        ests = make_estimators(learned)
        offline[name] = evaluate(trace, ests, skip=args.skip)
        for e in ests:
            if isinstance(e, LearnedQuantile):
                fits.setdefault(name, {})[e.name] = {
                    "fits": e.fits,
                    "fit_seconds": round(e.fit_seconds, 2),
                }
    print(format_offline(offline))
    lab: list[dict[str, Any]] = []
    if not args.no_lab:
        for name, trace in traces:
            lab += lab_compare(name, trace, lambda: make_estimators(learned))
        print()
        print(format_lab(lab))
    v = verdict(offline)
    print()
    print(f"beats the shipped per-tenant p90: {v['beats_tenant']}")
    print(f"winner: {v['winner']}" + ("" if learned else " (learned model not evaluated)"))
    if args.out:
        doc = {
            "settings": {
                "seconds_per_token": SECONDS_PER_TOKEN,
                "context": CONTEXT,
                "quantile": QUANTILE,
                "window": WINDOW,
                "skip": args.skip,
                "prompt_edges": PROMPT_EDGES,
                "python": platform.python_version(),
            },
            "traces": {name: len(trace) for name, trace in traces},
            "offline": offline,
            "learned_fits": fits,
            "lab": lab,
            "verdict": v,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
