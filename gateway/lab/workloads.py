"""Workloads of the fairness lab: the VTC paper's suite by name, plus user-supplied files.

A :class:`Workload` is a name, a duration, tenants with weights and a list of requests sorted by
arrival time. Everything is deterministic for a given seed (``random.Random``, no global state).

Built-in workloads (the VTC paper's evaluation suite, ``docs/lab.md``; arrival processes follow
the paper's artifact: ``uniform`` = constant inter-arrival ``1/rate`` starting at a seeded random
offset in ``[0, 1/rate)``; on/off clients send only during even periods
``int(t // period) % 2 == 0``):

==================== =====================================================================
overload             2 clients, 1.5/s and 3/s, 256/256 tokens, 360 s
proportional         3 clients, 0.25, 0.5, 1.5 /s, 256/256, 600 s
on_off_less          client-1 0.5/s on/off every 60 s; client-2 2/s; 256/256, 600 s
on_off_overload      client-1 2/s on/off every 60 s; client-2 3/s; 256/256, 600 s
poisson_short_long   Poisson: 8/s at 64/64, 1.5/s at 256/256, 600 s
poisson_short_long_2 Poisson: 8/s at 512 in/32 out, 1.5/s at 32 in/512 out, 600 s
increase             client-1 0.5/s; client-2 rising linearly 0.2 -> 2 /s, 600 s
dist_shift           300 s phases (0.5 on/off, 2) -> (1, 1) -> (0.5, 1.5), 900 s
overload_multi       8 clients: 3 x 0.4/s, 5 x 0.6/s, 256/256, 360 s
overload_weighted    4 clients at 0.8, 0.8, 1.2, 1.6 /s, weights 1, 2, 3, 4, 360 s
arena_trace          data/arena_trace_600s.csv (1,500 real requests, 27 clients; data/README.md)
==================== =====================================================================

plus the closed-loop cases (:data:`CLOSED_LOOP`), ``sdk_mix`` (:func:`_sdk_mix`: clients
that send what SDK users send, most without ``max_tokens``) and ``quota`` (:func:`_quota`: three
teams joining one after another on a hosted API's tokens per minute, :mod:`gateway.lab.quota`).

User formats (:func:`load_workload` picks by file extension):

* CSV with a header ``arrival_s,tenant,prompt_tokens,output_tokens`` (extra columns ignored);
  every tenant has weight 1 unless ``weights`` is given.
* YAML describing synthetic clients::

      name: my-traffic            # optional, default: the file name
      duration: 600               # seconds
      seed: 42                    # optional
      clients:
        - name: alice
          weight: 2               # optional, default 1
          rate: 1.5               # requests/s (start rate when rate_end is given)
          rate_end: 3.0           # optional: rate rises/falls linearly to this at `end`
          arrival: uniform        # uniform (constant rate) | poisson
          prompt_tokens: 256      # an int, or [lo, hi] drawn uniformly (inclusive)
          output_tokens: [64, 512]  # or {median: 128, sigma: 0.8}: log-normal, as the
                                    # simulated backend draws lengths without ignore_eos
          max_tokens: exact       # what the client sends (default exact: the output length,
                                  # with ignore_eos); none (unset: the rest of the context),
                                  # a cap (4096: outputs above it are cut), or a seeded mix:
                                  # {none: 0.6, 4096: 0.3, exact: 0.1}
          on_off: 60              # optional: on for 60 s, off for 60 s, ...
          start: 0                # optional window of activity within the workload
          end: 600

  A client with ``concurrency`` instead of ``rate`` is *closed-loop*, the way SDK clients and
  batch jobs with N workers behave: it keeps ``concurrency`` requests outstanding, sending the
  next one ``think`` seconds after one completes (an int/float, or ``[lo, hi]`` drawn
  uniformly), from ``start`` until ``end``::

        - name: batch-job
          weight: 2
          concurrency: 8          # requests outstanding at once
          think: 0.0              # seconds between a response and the next request
          prompt_tokens: 256
          output_tokens: 250

  A top-level ``tenants`` list, in the gateway config's format, sets weights, tiers, caps and
  a hierarchy of groups (clients are its leaves; a client not in it is a top-level tenant;
  API keys are not needed)::

      tenants:
        - name: org-a
          weight: 3
          tenants: [{name: a1}, {name: a2}]
        - {name: org-b, tier: batch, tenants: [{name: b, max_in_flight: 4}]}

  ``max_num_seqs: 7`` at the top level sets the backend's batch slots for ``lab simulate``
  (``--max-num-seqs`` overrides it).

Closed-loop requests exist only as the run unfolds (their arrival depends on when earlier ones
finished), so a workload holds them as :class:`ClosedClient` specs; ``lab simulate`` and
``lab replay`` both generate them, each request's sizes drawn from the client's own seeded
stream in order, so the n-th request of a client has the same sizes in every run.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, TenantNode, parse_tenant_tree
from .metrics import RequestRecord

#: Workload data shipped with the package (``data/README.md`` says where each file comes from).
DATA_DIR = Path(__file__).resolve().parent / "data"
ARENA_TRACE_FILE = "arena_trace_600s.csv"


#: ``max_tokens`` equal to the request's own output length: the paper's clients, which know the
#: length and send ``ignore_eos`` (a tight bound).
EXACT: Literal["exact"] = "exact"

#: What a client sends as ``max_tokens``: a cap, ``None`` (unset: the rest of the context) or
#: :data:`EXACT`.
MaxTokens = int | None | Literal["exact"]

#: A mix of :data:`MaxTokens` choices with their shares (summing to 1), drawn per request.
MaxTokensMix = tuple[tuple[MaxTokens, float], ...]

#: Every request sends ``max_tokens`` = its output length (the paper's setting; the default).
EXACT_ONLY: MaxTokensMix = ((EXACT, 1.0),)


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Output lengths drawn as the simulated backend draws them without ``ignore_eos``
    (:mod:`backends.sim.textgen`): ``int(lognormvariate(ln median, sigma)) + 1``."""

    median: float = 128.0
    sigma: float = 0.8

    def draw(self, rng: random.Random) -> int:
        return int(rng.lognormvariate(math.log(self.median), self.sigma)) + 1


#: A token count: fixed, ``(lo, hi)`` drawn uniformly (inclusive), or log-normal.
TokensSpec = int | tuple[int, int] | LogNormal


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """One request of a workload; ``arrival_s`` counts from the workload start.

    ``output_tokens`` is how many tokens the request generates (before EOS, or at its cap);
    ``max_tokens`` what its client sends (:data:`MaxTokens`: a cap not below
    ``output_tokens``, ``None`` when unset, or :data:`EXACT`, the default). A request without
    ``max_tokens`` still ends at the context: the simulation caps ``output_tokens`` there.
    """

    arrival_s: float
    tenant: str
    prompt_tokens: int
    output_tokens: int
    max_tokens: MaxTokens = EXACT

    @property
    def sent_max_tokens(self) -> int | None:
        """The ``max_tokens`` the client sends (``None``: unset)."""
        return sent_max_tokens(self.output_tokens, self.max_tokens)


def sent_max_tokens(output_tokens: int, limit: MaxTokens) -> int | None:
    """The ``max_tokens`` a client sends for a request of ``output_tokens`` (``None``: unset)."""
    return output_tokens if isinstance(limit, str) else limit


@dataclass(frozen=True, slots=True)
class ClosedClient:
    """A closed-loop client: ``concurrency`` requests outstanding, the next one sent ``think``
    seconds after one completes, between ``start`` and ``end`` (None: the workload's end)."""

    name: str
    concurrency: int
    think: float | tuple[float, float] = 0.0
    prompt_tokens: int | tuple[int, int] = 256
    output_tokens: TokensSpec = 256
    weight: float = 1.0
    start: float = 0.0
    end: float | None = None
    max_tokens: MaxTokensMix = EXACT_ONLY

    def sizes(self, seed: int, index: int = 0) -> Iterator[ClosedDraw]:
        """(prompt, output, max_tokens, think after it) of this client's requests, in order;
        seeded by the workload seed and the client's position ``index`` among the workload's
        clients."""
        rng = random.Random(f"{seed}:closed:{index}:{self.name}")
        while True:
            think = self.think
            pause = think if isinstance(think, int | float) else rng.uniform(*think)
            prompt = _draw(self.prompt_tokens, rng)
            output, limit = _draw_limited(self.output_tokens, self.max_tokens, rng)
            yield ClosedDraw(prompt, output, limit, float(pause))


@dataclass(frozen=True, slots=True)
class ClosedDraw:
    """One request of a closed-loop client (see :meth:`ClosedClient.sizes`)."""

    prompt_tokens: int
    output_tokens: int
    max_tokens: MaxTokens
    think: float

    def record(self, tenant: str, arrival_s: float) -> RequestRecord:
        """The record of this request, sent by ``tenant`` at ``arrival_s``, not yet served."""
        sent = sent_max_tokens(self.output_tokens, self.max_tokens)
        return RequestRecord(
            tenant, arrival_s, None, None, self.prompt_tokens, self.output_tokens, "ok", sent
        )


@dataclass(slots=True)
class Workload:
    name: str
    duration_s: float
    tenants: dict[str, float]  # tenant -> weight, in a stable display order
    requests: list[WorkloadRequest] = field(default_factory=list)
    closed: list[ClosedClient] = field(default_factory=list)
    seed: int = 42
    #: batch slots this workload is meant for (closed-loop cases); None: the backend's own
    max_num_seqs: int | None = None
    #: the tenant tree (groups, tiers, caps) when the file has a ``tenants`` list
    tree: tuple[TenantNode, ...] = ()
    #: a hosted API's rate budget in front of the engine (``lab simulate``: the gateway's
    #: quota backend, the engine an unlimited provider): tokens per ``quota_window_s``
    quota_tpm: int | None = None
    quota_window_s: float = 60.0

    def paths(self) -> dict[str, str]:
        """Tenant -> its path in the tree (``org/team/tenant``; the name when not nested)."""
        nested = {n.name: n.path for n in self.tree if n.leaf}
        return {t: nested.get(t, t) for t in self.tenants}

    def truncated(self, duration_s: float) -> Workload:
        """The same workload cut to its first ``duration_s`` seconds (for quick runs)."""
        reqs = [r for r in self.requests if r.arrival_s < duration_s]
        end = min(duration_s, self.duration_s)
        return replace(
            self,
            duration_s=end,
            tenants=dict(self.tenants),
            requests=reqs,
            closed=list(self.closed),
        )

    def with_max_tokens(self, mix: MaxTokensMix) -> Workload:
        """The same traffic from clients whose ``max_tokens`` is drawn from ``mix`` (seeded,
        per request): each request keeps its output length, cut by a smaller cap."""
        rng = random.Random(f"{self.seed}:max_tokens")
        reqs = []
        for r in self.requests:
            limit = _pick(mix, rng)
            reqs.append(
                replace(r, output_tokens=_limited(r.output_tokens, limit), max_tokens=limit)
            )
        closed = [replace(c, max_tokens=mix) for c in self.closed]
        return replace(self, requests=reqs, closed=closed)

    def new_records(self) -> list[RequestRecord]:
        """One record per open-loop request, in order, not yet served."""
        return [
            RequestRecord(
                r.tenant,
                r.arrival_s,
                None,
                None,
                r.prompt_tokens,
                r.output_tokens,
                "ok",
                r.sent_max_tokens,
            )
            for r in self.requests
        ]

    def longest_prompt(self) -> int:
        longest = max((r.prompt_tokens for r in self.requests), default=0)
        for c in self.closed:
            p = c.prompt_tokens
            longest = max(longest, p if isinstance(p, int) else p[1])
        return longest

    def closed_end(self, client: ClosedClient) -> float:
        """When ``client`` stops sending new requests."""
        return self.duration_s if client.end is None else min(client.end, self.duration_s)


@dataclass(frozen=True, slots=True)
class ClientSpec:
    """A synthetic client (the YAML format and the built-in workloads share it)."""

    name: str
    rate: float
    prompt_tokens: int | tuple[int, int] = 256
    output_tokens: TokensSpec = 256
    weight: float = 1.0
    arrival: str = "uniform"  # uniform | poisson
    rate_end: float | None = None
    on_off: float | None = None
    start: float = 0.0
    end: float | None = None
    max_tokens: MaxTokensMix = EXACT_ONLY


# -- arrival processes -------------------------------------------------------------------------
def _draw(spec: TokensSpec, rng: random.Random) -> int:
    if isinstance(spec, int):
        return spec
    if isinstance(spec, LogNormal):
        return spec.draw(rng)
    lo, hi = spec
    return rng.randint(lo, hi)


def _pick(mix: MaxTokensMix, rng: random.Random) -> MaxTokens:
    """One choice of ``mix`` (no draw when it has one choice, so workloads without a mix keep
    their random streams)."""
    if len(mix) == 1:
        return mix[0][0]
    x = rng.random()
    for choice, share in mix:
        x -= share
        if x < 0:
            return choice
    return mix[-1][0]


def _limited(output: int, limit: MaxTokens) -> int:
    """The output length of a request that would generate ``output`` tokens, capped by a
    ``max_tokens`` of ``limit``."""
    return min(output, limit) if isinstance(limit, int) else output


def _draw_limited(
    output: TokensSpec, mix: MaxTokensMix, rng: random.Random
) -> tuple[int, MaxTokens]:
    """(output length, max_tokens sent) of one request."""
    limit = _pick(mix, rng)
    return _limited(_draw(output, rng), limit), limit


def _arrivals(c: ClientSpec, duration: float, rng: random.Random) -> Iterator[float]:
    """Arrival times of one client in ``[start, end)``."""
    end = duration if c.end is None else min(c.end, duration)
    if c.arrival == "poisson":
        yield from _poisson_arrivals(c, end, rng)
    elif c.arrival == "uniform":
        yield from _uniform_arrivals(c, end, rng)
    else:
        raise ValueError(f"client {c.name!r}: arrival must be 'uniform' or 'poisson'")


def _rate_at(c: ClientSpec, end: float, t: float) -> float:
    """The client's rate at ``t``: ``rate``, or linear from ``rate`` at its start to
    ``rate_end`` at ``end``."""
    span = end - c.start
    if c.rate_end is None or span <= 0:
        return c.rate
    return c.rate + (c.rate_end - c.rate) * (t - c.start) / span


def _poisson_arrivals(c: ClientSpec, end: float, rng: random.Random) -> Iterator[float]:
    # Thinning (Lewis & Shedler) handles a linearly varying rate exactly.
    peak = max(c.rate, c.rate_end if c.rate_end is not None else c.rate)
    if peak <= 0:
        return
    t = c.start
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return
        if rng.random() * peak <= _rate_at(c, end, t):
            yield t


def _uniform_arrivals(c: ClientSpec, end: float, rng: random.Random) -> Iterator[float]:
    if c.rate <= 0:
        return
    if c.rate_end is None:  # int(rate * span) requests, evenly spaced, random phase
        offset = c.start + rng.random() / c.rate
        for k in range(int(c.rate * (end - c.start) + 1e-9)):
            yield offset + k / c.rate
        return
    t = c.start
    while True:
        r = _rate_at(c, end, t)
        if r <= 0:
            return
        t += 1.0 / r
        if t >= end:
            return
        yield t


def synthesize(name: str, duration: float, clients: list[ClientSpec], seed: int = 42) -> Workload:
    """Generate a workload from client specs; one independent seeded stream per client."""
    requests: list[WorkloadRequest] = []
    for i, c in enumerate(clients):
        rng = random.Random(f"{seed}:{i}:{c.name}")
        for t in _arrivals(c, duration, rng):
            if c.on_off is not None and int(t // c.on_off) % 2 == 1:
                continue
            prompt = _draw(c.prompt_tokens, rng)
            output, limit = _draw_limited(c.output_tokens, c.max_tokens, rng)
            requests.append(WorkloadRequest(t, c.name, prompt, output, limit))
    requests.sort(key=lambda r: (r.arrival_s, r.tenant))
    tenants: dict[str, float] = {}
    for c in clients:
        tenants[c.name] = c.weight
    return Workload(name, duration, tenants, requests)


# -- the paper's suite -------------------------------------------------------------------------
def _c(i: int, rate: float, **kw: Any) -> ClientSpec:
    return ClientSpec(name=f"client-{i}", rate=rate, **kw)


def _overload(seed: int) -> Workload:
    return synthesize("overload", 360, [_c(1, 1.5), _c(2, 3.0)], seed)


def _proportional(seed: int) -> Workload:
    return synthesize("proportional", 600, [_c(1, 0.25), _c(2, 0.5), _c(3, 1.5)], seed)


def _on_off_less(seed: int) -> Workload:
    return synthesize("on_off_less", 600, [_c(1, 0.5, on_off=60), _c(2, 2.0)], seed)


def _on_off_overload(seed: int) -> Workload:
    return synthesize("on_off_overload", 600, [_c(1, 2.0, on_off=60), _c(2, 3.0)], seed)


def _poisson_short_long(seed: int) -> Workload:
    clients = [
        _c(1, 8.0, arrival="poisson", prompt_tokens=64, output_tokens=64),
        _c(2, 1.5, arrival="poisson", prompt_tokens=256, output_tokens=256),
    ]
    return synthesize("poisson_short_long", 600, clients, seed)


def _poisson_short_long_2(seed: int) -> Workload:
    clients = [
        _c(1, 8.0, arrival="poisson", prompt_tokens=512, output_tokens=32),
        _c(2, 1.5, arrival="poisson", prompt_tokens=32, output_tokens=512),
    ]
    return synthesize("poisson_short_long_2", 600, clients, seed)


def _increase(seed: int) -> Workload:
    return synthesize("increase", 600, [_c(1, 0.5), _c(2, 0.2, rate_end=2.0)], seed)


def _dist_shift(seed: int) -> Workload:
    phases = [((0.5, 60.0), (2.0, None)), ((1.0, None), (1.0, None)), ((0.5, None), (1.5, None))]
    clients: list[ClientSpec] = []
    for p, pair in enumerate(phases):
        for i, (rate, on_off) in enumerate(pair, start=1):
            clients.append(_c(i, rate, on_off=on_off, start=300.0 * p, end=300.0 * (p + 1)))
    wl = synthesize("dist_shift", 900, clients, seed)
    wl.tenants = {"client-1": 1.0, "client-2": 1.0}
    return wl


def _overload_multi(seed: int) -> Workload:
    rates = [0.4] * 3 + [0.6] * 5
    return synthesize("overload_multi", 360, [_c(i, r) for i, r in enumerate(rates, 1)], seed)


def _overload_weighted(seed: int) -> Workload:
    spec = [(0.8, 1.0), (0.8, 2.0), (1.2, 3.0), (1.6, 4.0)]
    clients = [_c(i, r, weight=w) for i, (r, w) in enumerate(spec, 1)]
    return synthesize("overload_weighted", 360, clients, seed)


# -- closed-loop cases: concurrency-limited clients (SDKs, batch jobs with N workers) ---------
def _closed(
    name: str, slots: int, duration: float, clients: list[tuple[str, float, int]], **kw: Any
) -> Workload:
    """Every client keeps ``n`` requests of 256 prompt / 250 output tokens outstanding (one
    size: requests finish in the order they started, the hard case) and sends the next one
    0-10 ms after a response ends (a client's turnaround)."""
    kw.setdefault("think", (0.0, 0.01))
    specs = [
        ClosedClient(t, n, weight=w, prompt_tokens=256, output_tokens=250, **kw)
        for t, w, n in clients
    ]
    return Workload(
        name, duration, {c.name: c.weight for c in specs}, closed=specs, max_num_seqs=slots
    )


def _closed_orgs(seed: int) -> Workload:
    """Org A (weight 3: teams a1, a2 at 1:1) and org B (weight 1: team b), 8 clients each on
    8 slots; a2 stops halfway: 3/8, 3/8, 2/8 of the service, then 3/4 and 1/4."""
    wl = _closed("closed_orgs", 8, 300, [("a1", 1, 8), ("a2", 1, 8), ("b", 1, 8)])
    a2 = wl.closed[1]
    wl.closed[1] = ClosedClient(
        a2.name, a2.concurrency, a2.think, a2.prompt_tokens, a2.output_tokens, end=150.0
    )
    wl.tree = parse_tenant_tree(
        [
            {"name": "org-a", "weight": 3, "tenants": [{"name": "a1"}, {"name": "a2"}]},
            {"name": "org-b", "weight": 1, "tenants": [{"name": "b"}]},
        ]
    )
    return wl


def _closed_1to2_8v8(seed: int) -> Workload:
    return _closed("closed_1to2_8v8", 7, 300, [("a", 1, 8), ("b", 2, 8)])


def _closed_1to2_16v16(seed: int) -> Workload:
    return _closed("closed_1to2_16v16", 16, 300, [("a", 1, 16), ("b", 2, 16)])


def _closed_1to2_12v12(seed: int) -> Workload:
    return _closed("closed_1to2_12v12", 16, 300, [("a", 1, 12), ("b", 2, 12)])


def _closed_1to2_6v24(seed: int) -> Workload:
    return _closed("closed_1to2_6v24", 16, 300, [("a", 1, 6), ("b", 2, 24)])


def _closed_equal_10v22(seed: int) -> Workload:
    return _closed("closed_equal_10v22", 16, 300, [("a", 1, 10), ("b", 1, 22)])


def _closed_1to1to2(seed: int) -> Workload:
    return _closed("closed_1to1to2", 8, 300, [("a", 1, 4), ("b", 1, 6), ("c", 2, 12)])


def _closed_trickle_burst(seed: int) -> Workload:
    """Tenant a keeps one request in flight for 120 s, then bursts with 16; b floods with 16
    throughout. a must not starve b after its quiet period for longer than the bound."""
    specs = [
        ClosedClient("a", 1, (0.0, 0.01), output_tokens=250, end=120.0),
        ClosedClient("a", 16, (0.0, 0.01), output_tokens=250, start=120.0),
        ClosedClient("b", 16, (0.0, 0.01), output_tokens=250),
    ]
    return Workload(
        "closed_trickle_burst", 240, {"a": 1.0, "b": 1.0}, closed=specs, max_num_seqs=16
    )


#: What SDK users send as ``max_tokens``: 60 % nothing (the OpenAI SDK's default, most chat UIs),
#: 30 % a generous 4,096 (agent frameworks), 10 % exactly what they get (a tight bound).
SDK_MAX_TOKENS: MaxTokensMix = ((None, 0.6), (4096, 0.3), (EXACT, 0.1))


def _sdk_mix(seed: int) -> Workload:
    """4 tenants with 24 closed-loop clients each (96 outstanding requests), prompts of
    100-1,500 tokens, outputs as the simulated backend draws them without ``ignore_eos``
    (log-normal, median 128), ``max_tokens`` from :data:`SDK_MAX_TOKENS`; 120 s."""
    specs = [
        ClosedClient(
            f"client-{i}",
            24,
            (0.0, 0.01),
            prompt_tokens=(100, 1500),
            output_tokens=LogNormal(128.0, 0.8),
            max_tokens=SDK_MAX_TOKENS,
        )
        for i in range(1, 5)
    ]
    return Workload("sdk_mix", 120, {c.name: c.weight for c in specs}, closed=specs)


def _quota(seed: int) -> Workload:
    """A hosted account's tokens per minute shared by three teams: ``a`` (weight 1) alone from
    0 s, ``b`` (weight 3) from 180 s, ``c`` (weight 1) from 420 s until 660 s, each with 24
    closed-loop SDK clients (no ``max_tokens``, prompts of 50-300 tokens, outputs log-normal
    with median 128) that ask for far more than the quota of 60,000 tokens per 60 s."""
    specs = [
        ClosedClient(
            name,
            24,
            (0.0, 0.01),
            prompt_tokens=(50, 300),
            output_tokens=LogNormal(128.0, 0.8),
            weight=weight,
            start=start,
            max_tokens=((None, 1.0),),
        )
        for name, weight, start in (("a", 1.0, 0.0), ("b", 3.0, 180.0), ("c", 1.0, 420.0))
    ]
    return Workload(
        "quota",
        660,
        {c.name: c.weight for c in specs},
        closed=specs,
        seed=seed,
        quota_tpm=60_000,
        quota_window_s=60.0,
    )


def arena_trace_path() -> Path:
    return DATA_DIR / ARENA_TRACE_FILE


def _arena_trace(seed: int) -> Workload:
    wl = load_csv(arena_trace_path(), name="arena_trace")
    wl.duration_s = max(wl.duration_s, 600.0)
    return wl


BUILTIN: dict[str, Callable[[int], Workload]] = {
    "overload": _overload,
    "proportional": _proportional,
    "on_off_less": _on_off_less,
    "on_off_overload": _on_off_overload,
    "poisson_short_long": _poisson_short_long,
    "poisson_short_long_2": _poisson_short_long_2,
    "increase": _increase,
    "dist_shift": _dist_shift,
    "overload_multi": _overload_multi,
    "overload_weighted": _overload_weighted,
    "arena_trace": _arena_trace,
}

#: Closed-loop cases (concurrency-limited clients), by name.
CLOSED_LOOP: dict[str, Callable[[int], Workload]] = {
    "closed_1to2_8v8": _closed_1to2_8v8,
    "closed_1to2_16v16": _closed_1to2_16v16,
    "closed_1to2_12v12": _closed_1to2_12v12,
    "closed_1to2_6v24": _closed_1to2_6v24,
    "closed_equal_10v22": _closed_equal_10v22,
    "closed_1to1to2": _closed_1to1to2,
    "closed_trickle_burst": _closed_trickle_burst,
    "closed_orgs": _closed_orgs,
}

#: The paper suite in the order the docs present it.
PAPER_SUITE = tuple(BUILTIN)
BUILTIN.update(CLOSED_LOOP)
#: Clients that leave ``max_tokens`` unset or generous (run on a long-context profile).
BUILTIN["sdk_mix"] = _sdk_mix
#: Teams sharing a hosted API's quota (tokens per minute) instead of batch slots.
BUILTIN["quota"] = _quota


# -- user formats ------------------------------------------------------------------------------
def load_csv(
    path: str | Path, name: str | None = None, weights: Mapping[str, float] | None = None
) -> Workload:
    """Read ``arrival_s,tenant,prompt_tokens,output_tokens`` rows (header required); an
    optional ``max_tokens`` column says what each client sent (a number, ``none`` or
    ``exact``, the default when empty; a number below ``output_tokens`` cuts the output)."""
    p = Path(path)
    requests: list[WorkloadRequest] = []
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"arrival_s", "tenant", "prompt_tokens", "output_tokens"}
        missing = need - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{p}: missing column(s) {', '.join(sorted(missing))}")
        for line, row in enumerate(reader, start=2):
            try:
                limit = _max_tokens_choice(row.get("max_tokens") or EXACT, "max_tokens")
                req = WorkloadRequest(
                    float(row["arrival_s"]),
                    row["tenant"],
                    int(row["prompt_tokens"]),
                    _limited(int(row["output_tokens"]), limit),
                    limit,
                )
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{p}:{line}: bad row {row!r}") from exc
            if req.arrival_s < 0 or req.prompt_tokens < 1 or req.output_tokens < 1:
                raise ValueError(f"{p}:{line}: arrival must be >= 0 and token counts >= 1")
            requests.append(req)
    requests.sort(key=lambda r: r.arrival_s)
    tenants = {t: 1.0 for t in sorted({r.tenant for r in requests})}
    for t, w in (weights or {}).items():
        tenants[t] = float(w)
    last = requests[-1].arrival_s if requests else 0.0
    duration = float(max(1, math.ceil(last)))
    return Workload(name or p.stem, duration, tenants, requests)


def _tokens_spec(value: Any, where: str) -> int | tuple[int, int]:
    if isinstance(value, int) and value >= 1:
        return value
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        lo, hi = value
        if 1 <= lo <= hi:
            return (lo, hi)
    raise ValueError(f"{where}: expected a token count >= 1 or [lo, hi], got {value!r}")


def _output_spec(value: Any, where: str) -> TokensSpec:
    """An output length: a token count, ``[lo, hi]`` or ``{median: M, sigma: S}``."""
    if isinstance(value, dict):
        median, sigma = value.get("median"), value.get("sigma", 0.8)
        if (
            set(value) <= {"median", "sigma"}
            and isinstance(median, int | float)
            and median >= 1
            and isinstance(sigma, int | float)
            and sigma >= 0
        ):
            return LogNormal(float(median), float(sigma))
        raise ValueError(f"{where}: expected {{median: M >= 1, sigma: S >= 0}}, got {value!r}")
    return _tokens_spec(value, where)


def _max_tokens_choice(value: Any, where: str) -> MaxTokens:
    if value is None or value == "none":
        return None
    if value == EXACT:
        return EXACT
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"{where}: expected none, exact or a token count >= 1, got {value!r}")


def parse_max_tokens(value: Any, where: str = "max_tokens") -> MaxTokensMix:
    """What clients send as ``max_tokens``: ``none``, ``exact``, a count, or a mix of these
    with shares summing to 1, as a mapping (``{none: 0.6, 4096: 0.3, exact: 0.1}``) or a
    string (``none:0.6,4096:0.3,exact:0.1``)."""
    if isinstance(value, str) and (":" in value or "," in value):
        items: dict[Any, Any] = {}
        for part in value.split(","):
            key, sep, share = part.strip().partition(":")
            try:
                items[key] = float(share) if sep else math.nan
            except ValueError:
                items[key] = math.nan
        value = items
    if not isinstance(value, dict):
        return ((_max_tokens_choice(value, where), 1.0),)
    mix: list[tuple[MaxTokens, float]] = []
    for key, share in value.items():
        choice = _max_tokens_choice(key, where)
        if not isinstance(share, int | float) or not share > 0:
            raise ValueError(f"{where}: the share of {key!r} must be > 0, got {share!r}")
        mix.append((choice, float(share)))
    total = sum(share for _, share in mix)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}: shares must sum to 1, got {total:g}")
    return tuple(mix)


_CLIENT_KEYS = {
    "name",
    "weight",
    "rate",
    "rate_end",
    "arrival",
    "prompt_tokens",
    "output_tokens",
    "on_off",
    "start",
    "end",
    "max_tokens",
}


def load_yaml(path: str | Path, seed: int | None = None) -> Workload:
    """Read the synthetic-clients YAML format described in the module docstring."""
    import yaml

    p = Path(path)
    doc = yaml.safe_load(p.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("clients"), list):
        raise ValueError(f"{p}: expected a mapping with a 'clients' list")
    unknown = set(doc) - {"name", "duration", "seed", "clients", "max_num_seqs", "tenants"}
    if unknown:
        raise ValueError(f"{p}: unknown key(s) {', '.join(sorted(unknown))}")
    duration = doc.get("duration")
    if not isinstance(duration, int | float) or duration <= 0:
        raise ValueError(f"{p}: 'duration' must be a positive number, got {duration!r}")
    slots = doc.get("max_num_seqs")
    if slots is not None and (not isinstance(slots, int) or slots < 1):
        raise ValueError(f"{p}: 'max_num_seqs' must be an integer >= 1, got {slots!r}")
    clients: list[ClientSpec] = []
    closed: list[ClosedClient] = []
    for i, raw in enumerate(doc["clients"]):
        where = f"{p}: clients[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a mapping")
        if "concurrency" in raw:
            closed.append(_closed_client(raw, i, where))
        else:
            clients.append(_open_client(raw, i, where))
    use_seed = seed if seed is not None else int(doc.get("seed", 42))
    wl = synthesize(str(doc.get("name", p.stem)), float(duration), clients, use_seed)
    for c in closed:
        wl.tenants.setdefault(c.name, c.weight)
    wl.closed, wl.seed, wl.max_num_seqs = closed, use_seed, slots
    if doc.get("tenants") is not None:
        _set_tree(wl, doc["tenants"], p)
    return wl


def _open_client(raw: dict[str, Any], i: int, where: str) -> ClientSpec:
    """An open-loop client of the YAML format (requests at a ``rate``)."""
    bad = set(raw) - _CLIENT_KEYS
    if bad:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
    rate = raw.get("rate")
    if not isinstance(rate, int | float) or rate < 0:
        raise ValueError(f"{where}.rate: expected requests/s >= 0, got {rate!r}")
    weight = raw.get("weight", 1.0)
    if not isinstance(weight, int | float) or weight <= 0:
        raise ValueError(f"{where}.weight: expected > 0, got {weight!r}")
    return ClientSpec(
        name=str(raw.get("name", f"client-{i + 1}")),
        rate=float(rate),
        prompt_tokens=_tokens_spec(raw.get("prompt_tokens", 256), f"{where}.prompt_tokens"),
        output_tokens=_output_spec(raw.get("output_tokens", 256), f"{where}.output_tokens"),
        weight=float(weight),
        max_tokens=parse_max_tokens(raw.get("max_tokens", EXACT), f"{where}.max_tokens"),
        arrival=str(raw.get("arrival", "uniform")),
        rate_end=None if raw.get("rate_end") is None else float(raw["rate_end"]),
        on_off=None if raw.get("on_off") is None else float(raw["on_off"]),
        start=float(raw.get("start", 0.0)),
        end=None if raw.get("end") is None else float(raw["end"]),
    )


def _set_tree(wl: Workload, raw: Any, p: Path) -> None:
    """The workload file's ``tenants`` list: ``wl``'s tree, and its leaves' weights."""
    try:
        wl.tree = parse_tenant_tree(raw)
    except ConfigError as exc:
        raise ValueError(f"{p}: " + "; ".join(exc.problems)) from exc
    for node in wl.tree:
        if node.leaf:
            wl.tenants[node.name] = node.config.weight


_CLOSED_KEYS = {
    "name",
    "weight",
    "concurrency",
    "think",
    "prompt_tokens",
    "output_tokens",
    "max_tokens",
}


def _closed_client(raw: dict[str, Any], i: int, where: str) -> ClosedClient:
    """A closed-loop client of the YAML format (a client with ``concurrency``)."""
    bad = set(raw) - _CLOSED_KEYS - {"start", "end"}
    if bad:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(bad))}")
    n = raw["concurrency"]
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}.concurrency: expected an integer >= 1, got {n!r}")
    weight = raw.get("weight", 1.0)
    if not isinstance(weight, int | float) or weight <= 0:
        raise ValueError(f"{where}.weight: expected > 0, got {weight!r}")
    think = raw.get("think", 0.0)
    ok = isinstance(think, int | float) and think >= 0
    if isinstance(think, list) and len(think) == 2:
        ok = all(isinstance(v, int | float) and v >= 0 for v in think) and think[0] <= think[1]
        think = (float(think[0]), float(think[1]))
    if not ok:
        raise ValueError(f"{where}.think: expected seconds >= 0 or [lo, hi], got {think!r}")
    return ClosedClient(
        name=str(raw.get("name", f"client-{i + 1}")),
        concurrency=n,
        think=think if isinstance(think, tuple) else float(think),
        prompt_tokens=_tokens_spec(raw.get("prompt_tokens", 256), f"{where}.prompt_tokens"),
        output_tokens=_output_spec(raw.get("output_tokens", 256), f"{where}.output_tokens"),
        weight=float(weight),
        max_tokens=parse_max_tokens(raw.get("max_tokens", EXACT), f"{where}.max_tokens"),
        start=float(raw.get("start", 0.0)),
        end=None if raw.get("end") is None else float(raw["end"]),
    )


def load_workload(
    spec: str, seed: int | None = None, weights: Mapping[str, float] | None = None
) -> Workload:
    """A built-in workload by name, or a ``.csv`` / ``.yaml`` / ``.yml`` file.

    ``seed`` (default 42, or the YAML file's own ``seed``) makes synthetic arrivals reproducible.
    """
    if spec in BUILTIN:
        wl = BUILTIN[spec](42 if seed is None else seed)
        wl.seed = 42 if seed is None else seed
    elif spec.endswith(".csv"):
        wl = load_csv(spec)
    elif spec.endswith((".yaml", ".yml")):
        wl = load_yaml(spec, seed=seed)
    else:
        known = ", ".join(BUILTIN)
        raise ValueError(f"unknown workload {spec!r}: a name ({known}) or a .csv/.yaml file")
    for t, w in (weights or {}).items():
        if not w > 0:
            raise ValueError(f"weight of tenant {t!r} must be > 0, got {w!r}")
        wl.tenants[t] = float(w)
    return wl
