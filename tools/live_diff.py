"""``vtc-gateway bench live-diff``: closed-loop scenarios in the lab and live, side by side.

A *scenario* is a population of closed-loop streaming clients (:class:`Scenario`): per tenant a
weight, a concurrency (requests kept outstanding), prompt and output lengths (fixed or drawn
from a range) and a client turnaround (seconds between the end of an answer and the next
request, drawn from a range), on a simulated backend of ``slots`` sequences.
:func:`generate` draws one from a seed (2-4 tenants, weights 1-4, concurrency 0.5-3x the
tenant's fair share of the slots, 4-32 slots, fixed or varied output lengths, 0-30 ms
turnaround).

Each scenario runs

* in the lab (:func:`run_lab`): :func:`gateway.lab.simulate.simulate` on the same population,
  the gateway's dispatch core in virtual time;
* live (:func:`run_live`): the simulated backend (``python -m backends.sim``), the gateway
  (``vtc-gateway serve``) and the clients each in their own process, the backend at
  ``--speed`` (workload seconds = wall seconds x speed, the clients' turnaround and the
  gateway's ``hold_ms`` scaled to match).

Service of a request is ``prompt + 2 x output`` from the usage the client received, spread over
[first token, end] (:func:`gateway.lab.metrics.service_in`), counted in the same window of
workload time in both runs. Each tenant's *share* is its fraction of the service in the window;
its *expected* share comes from weighted water-filling of the slots (:func:`expected_shares`):
a tenant asking for fewer slots than its weighted part gets what it asks for, the others split
the rest by weight. A scenario passes when, in both runs, every tenant's share over its
expected share lies within ``--tolerance`` of the others' (max/min <= 1 + tolerance) and the
two runs agree per tenant within the same tolerance::

    vtc-gateway bench live-diff --seeds 1-10 --policy vtc --duration 30 --speed 2

Both runs can record the dispatch core's decisions (:class:`Recorder`: arrivals with their
lift, grants, releases, slots held and how each hold ended) and print per-tenant counts side by
side (``--trace``), the way the lab and the live gateway were compared to find where they
diverge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.lab.metrics import RequestRecord, service_in
from gateway.scheduler import Prices

from .procs import Service, running, start_service, stop_process

MODEL = "sim-llama-3-8b"
PROFILE = "h100-llama3-8b"
PRICES = Prices()


# ---------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TenantSpec:
    """One tenant's closed-loop clients."""

    name: str
    weight: float
    concurrency: int
    prompt_tokens: int | tuple[int, int] = 256
    output_tokens: int | tuple[int, int] = 250
    think: tuple[float, float] = (0.0, 0.01)  # seconds, drawn uniformly per request


@dataclass(frozen=True, slots=True)
class Scenario:
    seed: int
    slots: int
    tenants: tuple[TenantSpec, ...]
    replicas: int = 1  # 2: tenants dealt alternately to two gateways sharing Redis

    def describe(self) -> str:
        parts = []
        for t in self.tenants:
            out = t.output_tokens
            o = f"{out}" if isinstance(out, int) else f"{out[0]}-{out[1]}"
            p = t.prompt_tokens
            pr = f"{p}" if isinstance(p, int) else f"{p[0]}-{p[1]}"
            parts.append(f"{t.name}:{t.concurrency}xw{t.weight:g}/p{pr}/o{o}")
        think = max(t.think[1] for t in self.tenants) * 1000
        return f"{self.slots} slots, " + " ".join(parts) + f", think<={think:.0f}ms"


def generate(seed: int, replicas: int = 1) -> Scenario:
    """A seeded closed-loop scenario: 2-4 tenants, weights 1-4, each tenant's concurrency
    0.5-3x its weighted share of 4-32 slots, fixed or varied output lengths, a client
    turnaround of up to 0-30 ms."""
    rng = random.Random(f"live-diff:{seed}")
    n = rng.randint(2, 4)
    slots = rng.randint(4, 32)
    weights = [rng.randint(1, 4) for _ in range(n)]
    total = sum(weights)
    varied = rng.random() < 0.5
    top = rng.choice((0.0, 0.01, 0.02, 0.03))
    tenants = []
    for i, w in enumerate(weights):
        share = slots * w / total
        conc = max(1, round(share * rng.uniform(0.5, 3.0)))
        prompt = rng.choice((32, 80, 128, 256))
        if varied:
            lo = rng.randint(50, 200)
            output: int | tuple[int, int] = (lo, lo + rng.randint(50, 300))
        else:
            output = rng.choice((100, 150, 200, 250))
        tenants.append(TenantSpec(chr(ord("a") + i), float(w), conc, prompt, output, (0.0, top)))
    return Scenario(seed, slots, tuple(tenants), replicas)


def issue_scenario(prompt_tokens: int = 80) -> Scenario:
    """Weights 1:4, 16 vs 16 clients on 16 slots, 250 output tokens (issue 21's case: its
    clients sent 80-word prompts, 80 tokens here)."""
    return Scenario(
        0,
        16,
        (
            TenantSpec("a", 1.0, 16, prompt_tokens, 250, (0.0, 0.01)),
            TenantSpec("b", 4.0, 16, prompt_tokens, 250, (0.0, 0.01)),
        ),
    )


def _mean(spec: int | tuple[int, int]) -> float:
    return spec if isinstance(spec, int) else (spec[0] + spec[1]) / 2


def _rate(t: TenantSpec) -> float:
    """Service per output token of ``t``'s requests (mean lengths): a running request makes
    output at the same rate whoever owns it, so a slot of ``t`` yields service at this rate
    (up to a common factor)."""
    out = _mean(t.output_tokens)
    return (PRICES.input * _mean(t.prompt_tokens) + PRICES.output * out) / out


def fair_slots(sc: Scenario) -> dict[str, float]:
    """Slots per tenant under VTC's rule: backlogged tenants get equal service per weight,
    a tenant asking for less gets what it asks for (weighted water-filling)."""
    rate = {t.name: _rate(t) for t in sc.tenants}
    conc = {t.name: float(t.concurrency) for t in sc.tenants}
    weight = {t.name: t.weight for t in sc.tenants}
    if sum(conc.values()) <= sc.slots:
        return conc

    def used(level: float) -> float:
        return sum(min(conc[n], weight[n] * level / rate[n]) for n in conc)

    lo, hi = 0.0, max(conc[n] * rate[n] / weight[n] for n in conc)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if used(mid) <= sc.slots else (lo, mid)
    return {n: min(conc[n], weight[n] * lo / rate[n]) for n in conc}


def expected_shares(sc: Scenario) -> dict[str, float]:
    """Each tenant's fair fraction of the service (:func:`fair_slots` times its rate)."""
    slots = fair_slots(sc)
    service = {t.name: slots[t.name] * _rate(t) for t in sc.tenants}
    total = sum(service.values())
    return {n: s / total for n, s in service.items()}


def backlogged(sc: Scenario) -> dict[str, bool]:
    """Tenants whose concurrency exceeds their fair slots (they keep a queue)."""
    slots = fair_slots(sc)
    return {t.name: t.concurrency > slots[t.name] + 1e-6 for t in sc.tenants}


def window(duration: float) -> tuple[float, float]:
    """The measured window of a run of ``duration`` workload seconds: after a quarter of it
    (start-up, a full batch, the busy-tenant detection settle), until 95 % of it."""
    return 0.25 * duration, 0.95 * duration


def shares(
    records: Sequence[RequestRecord], tenants: Sequence[str], t0: float, t1: float
) -> dict[str, float]:
    """Each tenant's fraction of the service in ``[t0, t1]``."""
    svc = dict.fromkeys(tenants, 0.0)
    for r in records:
        if r.tenant in svc:
            svc[r.tenant] += service_in(r, t0, t1, PRICES)
    total = sum(svc.values()) or 1.0
    return {t: s / total for t, s in svc.items()}


# ---------------------------------------------------------------------------------------------
# the dispatch core's decisions
# ---------------------------------------------------------------------------------------------


class Recorder:
    """Records the decisions of every :class:`~gateway.core.DispatchCore` made while it is
    installed (:meth:`installed`): wraps the class's ``submit``, ``commit``, ``release`` and
    hold ending, so the lab's cores and the live gateway's (a subclass in cluster mode) are
    traced alike. Events carry the core's clock; :meth:`summary` counts them per tenant over a
    window."""

    def __init__(self) -> None:
        #: (kind, time, tenant, *values): ``arrive`` (queue was empty, lifts, units lifted,
        #: seconds since its oldest release not yet followed by an arrival, or -1),
        #: ``grant``, ``release`` (an expectation of its next request began: 0/1),
        #: ``hold`` (a held slot ended; used by the request: 0/1)
        self.events: list[tuple[Any, ...]] = []
        self._released: dict[str, list[float]] = {}  # tenant -> releases awaiting an arrival

    @contextlib.contextmanager
    def installed(self) -> Iterator[Recorder]:
        from gateway.core import DispatchCore

        events = self.events
        released = self._released
        orig = {n: getattr(DispatchCore, n) for n in ("submit", "commit", "release", "_end_hold")}

        def submit(core: Any, job: Any) -> None:
            pool = core.pool(job.model)
            queued = pool.queued(job.tenant)
            n0, u0 = pool.lift_stats().get(job.tenant, (0, 0.0))
            orig["submit"](core, job)
            now = core.clock()
            n1, u1 = pool.lift_stats().get(job.tenant, (0, 0.0))
            pending = released.get(job.tenant)
            gap = now - pending.pop(0) if pending else -1.0
            events.append(("arrive", now, job.tenant, int(queued == 0), n1 - n0, u1 - u0, gap))

        def commit(core: Any, sched: Any, job: Any, backend: Any, now: float, *a: Any) -> None:
            orig["commit"](core, sched, job, backend, now, *a)
            events.append(("grant", now, job.tenant))

        def release(core: Any, job: Any, grant: Any, *args: Any, **kw: Any) -> None:
            holds = len(core._holds)
            orig["release"](core, job, grant, *args, **kw)
            now = core.clock()
            released.setdefault(job.tenant, []).append(now)
            events.append(("release", now, job.tenant, int(len(core._holds) > holds)))

        def end_hold(core: Any, hold: Any, used: bool) -> None:
            held = hold.grant is not None
            orig["_end_hold"](core, hold, used)
            if held:
                events.append(("hold", core.clock(), hold.job.tenant, int(used)))

        patched = {"submit": submit, "commit": commit, "release": release, "_end_hold": end_hold}
        for name, fn in patched.items():
            setattr(DispatchCore, name, fn)
        try:
            yield self
        finally:
            for name, fn in orig.items():
                setattr(DispatchCore, name, fn)

    def summary(
        self, t0: float = float("-inf"), t1: float = float("inf"), scale: float = 1.0
    ) -> dict[str, dict[str, Any]]:
        """Per tenant, the decisions in ``[t0, t1]`` (core clock); gaps in milliseconds of
        workload time (core seconds times ``scale``)."""
        return summarize_events(self.events, t0, t1, scale)


def summarize_events(
    events: Sequence[Sequence[Any]], t0: float, t1: float, scale: float = 1.0
) -> dict[str, dict[str, Any]]:
    """Counts per tenant of :class:`Recorder` events in ``[t0, t1]``."""
    out: dict[str, dict[str, Any]] = {}
    gaps: dict[str, list[float]] = {}
    for ev in events:
        kind, t, tenant = ev[0], ev[1], ev[2]
        if not t0 <= t <= t1:
            continue
        s = out.get(tenant)
        if s is None:
            s = out[tenant] = dict.fromkeys(
                (
                    "arrivals",
                    "to_empty",
                    "lifts",
                    "lifted",
                    "grants",
                    "releases",
                    "expected",
                    "holds",
                    "holds_used",
                ),
                0,
            )
            gaps[tenant] = []
        if kind == "arrive":
            s["arrivals"] += 1
            s["to_empty"] += ev[3]
            s["lifts"] += ev[4]
            s["lifted"] += ev[5]
            if ev[6] >= 0:
                gaps[tenant].append(ev[6] * scale * 1000)
        elif kind == "grant":
            s["grants"] += 1
        elif kind == "release":
            s["releases"] += 1
            s["expected"] += ev[3]
        elif kind == "hold":
            s["holds"] += 1
            s["holds_used"] += ev[3]
    for tenant, g in gaps.items():
        g.sort()
        s = out[tenant]
        s["lifted"] = round(s["lifted"])
        s["gap_p50_ms"] = round(g[len(g) // 2], 1) if g else None
        s["gap_p90_ms"] = round(g[int(0.9 * len(g))], 1) if g else None
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# the lab
# ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    shares: dict[str, float]
    records: list[RequestRecord]
    trace: dict[str, dict[str, Any]] = field(default_factory=dict)
    throughput: float = 0.0  # prompt + output tokens/s in the window
    extra: dict[str, Any] = field(default_factory=dict)


def workload(sc: Scenario, duration: float) -> Any:
    """The scenario as a lab workload of closed-loop clients."""
    from gateway.lab.workloads import ClosedClient, Workload

    clients = [
        ClosedClient(
            t.name, t.concurrency, t.think, t.prompt_tokens, t.output_tokens, weight=t.weight
        )
        for t in sc.tenants
    ]
    return Workload(
        f"live-diff-{sc.seed}",
        duration,
        {t.name: t.weight for t in sc.tenants},
        closed=clients,
        seed=sc.seed,
        max_num_seqs=sc.slots,
    )


def _throughput(records: Sequence[RequestRecord], t0: float, t1: float) -> float:
    tokens = Prices(1.0, 1.0)
    return sum(service_in(r, t0, t1, tokens) for r in records) / (t1 - t0)


def run_lab(
    sc: Scenario,
    policy: str,
    duration: float,
    hold_ms: float = 50.0,
    trace: bool = False,
    profile: str = PROFILE,
    span: tuple[float, float] | None = None,
) -> RunResult:
    """The scenario in the lab's virtual time (``hold_ms`` in workload milliseconds), measured
    over ``span`` (workload seconds; default :func:`window`)."""
    from gateway.lab.simulate import SimConfig, simulate

    config = SimConfig(
        profile=profile,
        kv_admission="predict",
        hold_s=hold_ms / 1000,
        replicas=sc.replicas,
        ingress="skewed" if sc.replicas > 1 else "uniform",
    )
    t0, t1 = span or window(duration)
    rec = Recorder()
    with rec.installed() if trace else contextlib.nullcontext(rec):
        res = simulate(workload(sc, duration), policy, config)
    names = [t.name for t in sc.tenants]
    return RunResult(
        shares(res.records, names, t0, t1),
        res.records,
        rec.summary(t0, t1) if trace else {},
        _throughput(res.records, t0, t1),
    )


# ---------------------------------------------------------------------------------------------
# live: backend, gateway(s) and clients in their own processes
# ---------------------------------------------------------------------------------------------

#: Runs ``vtc-gateway`` recording its dispatch core's decisions (written at exit).
_GATEWAY_LAUNCHER = """
import atexit, json, os, sys
from tools.live_diff import Recorder
rec = Recorder()
installed = rec.installed()  # kept: a collected generator would restore the originals
installed.__enter__()
def _dump(path=os.environ["VTC_LIVE_DIFF_TRACE"]):
    with open(path, "w") as f:
        json.dump(rec.events, f)
atexit.register(_dump)
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


def gateway_config(
    sc: Scenario,
    sim_url: str,
    policy: str,
    hold_ms: float | None,
    redis_url: str | None = None,
    replica: int = 0,
) -> dict[str, Any]:
    """One backend of ``sc.slots`` sequences, the scenario's tenants (key ``key-NAME``)."""
    scheduler: dict[str, Any] = {"policy": policy}
    if hold_ms is not None:
        scheduler["hold_ms"] = hold_ms
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "backends": [{"name": "sim", "url": sim_url, "models": [MODEL], "max_num_seqs": sc.slots}],
        "tenants": [
            {
                "name": t.name,
                "weight": t.weight,
                "api_keys": [f"key-{t.name}"],
                "max_queued": 100_000,
            }
            for t in sc.tenants
        ],
        "scheduler": scheduler,
        "limits": {"queue_timeout_s": 3600, "health_interval_s": 5},
    }
    if redis_url is not None:
        config["cluster"] = {"url": redis_url, "replica_id": f"live-diff-{replica}"}
    return config


async def _start_gateway(config: dict[str, Any], workdir: Path, trace: Path) -> Service:
    fd, name = tempfile.mkstemp(prefix="gateway-", suffix=".yaml", dir=workdir)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f)
    argv = [sys.executable, "-c", _GATEWAY_LAUNCHER, "--log-level", "WARNING", "serve"]
    argv += ["--config", name, "--port", "0", "--no-watch"]
    return await start_service("gateway", argv, {"VTC_LIVE_DIFF_TRACE": str(trace)})


@dataclass
class LiveOptions:
    policy: str = "vtc"
    duration: float = 30.0  # workload seconds
    speed: float = 1.0  # the backend's speed; workload seconds per wall second
    hold_ms: float | None = None  # wall milliseconds; None: the gateway's default
    profile: str = PROFILE
    window: tuple[float, float] | None = None  # workload seconds; None: window(duration)


def _to_records(raw: list[list[Any]], start: float, speed: float) -> list[RequestRecord]:
    out = []
    for tenant, sent, first, end, prompt, output, status in raw:
        out.append(
            RequestRecord(
                tenant,
                (sent - start) * speed,
                None if first is None else (first - start) * speed,
                None if end is None else (end - start) * speed,
                prompt,
                output,
                status,
            )
        )
    return out


async def run_live_async(sc: Scenario, opts: LiveOptions) -> RunResult:
    """The scenario live: backend, gateway(s) (``sc.replicas``; two share a Redis, tenants
    dealt alternately) and the clients in a process of their own."""
    with tempfile.TemporaryDirectory(prefix="live-diff-") as tmp:
        work = Path(tmp)
        sim_argv = [sys.executable, "-m", "backends.sim", "--port", "0"]
        sim_argv += ["--profile", opts.profile, "--max-num-seqs", str(sc.slots)]
        sim_argv += ["--speed", f"{opts.speed:g}"]
        async with contextlib.AsyncExitStack() as stack:
            (sim,) = await stack.enter_async_context(running(start_service("sim", sim_argv)))
            redis_url = None
            if sc.replicas > 1:
                from .cluster_bench import redis_server

                redis_url = await stack.enter_async_context(redis_server("redis-server"))
            traces = [work / f"trace-{i}.json" for i in range(sc.replicas)]
            gateways = await stack.enter_async_context(
                running(
                    *(
                        _start_gateway(
                            gateway_config(sc, sim.url, opts.policy, opts.hold_ms, redis_url, i),
                            work,
                            traces[i],
                        )
                        for i in range(sc.replicas)
                    )
                )
            )
            spec = work / "clients.json"
            out = work / "records.json"
            spec.write_text(
                json.dumps(
                    {
                        "urls": {
                            t.name: gateways[i % len(gateways)].url
                            for i, t in enumerate(sc.tenants)
                        },
                        "tenants": [asdict(t) for t in sc.tenants],
                        "seed": sc.seed,
                        "speed": opts.speed,
                        "duration": opts.duration / opts.speed,
                    }
                )
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tools.live_diff",
                "client",
                str(spec),
                str(out),
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                await asyncio.wait_for(proc.wait(), opts.duration / opts.speed + 120)
            finally:
                await stop_process(proc)
            if proc.returncode != 0:
                raise RuntimeError(f"the clients exited with {proc.returncode}")
            for g in gateways:  # the trace is written at exit
                await stop_process(g.proc)
        data = json.loads(out.read_text())
        start = data["start"]
        records = _to_records(data["records"], start, opts.speed)
        events: list[list[Any]] = []
        for path in traces:
            if path.exists():
                events.extend(json.loads(path.read_text()))
    t0, t1 = opts.window or window(opts.duration)
    names = [t.name for t in sc.tenants]
    c0, c1 = start + t0 / opts.speed, start + t1 / opts.speed
    errors = sum(r.status != "ok" for r in records)
    return RunResult(
        shares(records, names, t0, t1),
        records,
        summarize_events(events, c0, c1, opts.speed),
        _throughput(records, t0, t1),
        {"errors": errors},
    )


def run_live(sc: Scenario, opts: LiveOptions) -> RunResult:
    return asyncio.run(run_live_async(sc, opts))


# ---------------------------------------------------------------------------------------------
# verdicts and the table
# ---------------------------------------------------------------------------------------------


def off_weights(got: dict[str, float], sc: Scenario) -> float:
    """How far a run is from the weights: over the tenants whose demand exceeds their share
    (:func:`backlogged`), max/min of share / expected share, less 1 (0 is exact; 0.1: one of
    them got 10 % more than another, relative to their weights). A tenant that asks for less
    than its share counts through what it falls short of its demand (1 - share / expected)."""
    expected = expected_shares(sc)
    busy = backlogged(sc)
    ratios = [got[t] / expected[t] for t in expected if busy[t]]
    off = max(ratios) / min(ratios) - 1 if len(ratios) > 1 and min(ratios) > 0 else 0.0
    short = [1 - got[t] / expected[t] for t in expected if not busy[t]]
    return max([off, *short])


def disagreement(live: dict[str, float], lab: dict[str, float]) -> float:
    """Largest relative difference of a tenant's share, live vs lab."""
    return max(abs(live[t] / lab[t] - 1) if lab[t] > 0 else float("inf") for t in lab)


@dataclass
class Row:
    seed: int
    scenario: Scenario
    expected: dict[str, float]
    lab: RunResult | None = None
    live: RunResult | None = None
    error: str | None = None

    def verdict(self, tolerance: float) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.lab is not None:
            out["lab_off"] = off_weights(self.lab.shares, self.scenario)
        if self.live is not None:
            out["live_off"] = off_weights(self.live.shares, self.scenario)
        if self.lab is not None and self.live is not None:
            out["agree"] = disagreement(self.live.shares, self.lab.shares)
        out["ok"] = self.error is None and all(v <= tolerance for v in out.values())
        return out


def _fmt_shares(shares: dict[str, float]) -> str:
    return " ".join(f"{v:.3f}" for v in shares.values())


def table(rows: Sequence[Row], tolerance: float) -> list[str]:
    """Markdown: per seed the scenario, the expected shares, the lab's and the live shares, how
    far each is from the expected (max/min of share/expected, less 1) and from each other."""
    out = [
        "| seed | scenario | expected | lab | live | lab off | live off | live vs lab | ok |",
        "|---:|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        v = r.verdict(tolerance)

        def pct(key: str, v: dict[str, Any] = v) -> str:
            return f"{100 * v[key]:.1f} %" if key in v else "-"

        out.append(
            f"| {r.seed} | {r.scenario.describe()} | {_fmt_shares(r.expected)} | "
            f"{_fmt_shares(r.lab.shares) if r.lab else '-'} | "
            f"{_fmt_shares(r.live.shares) if r.live else r.error or '-'} | "
            f"{pct('lab_off')} | {pct('live_off')} | {pct('agree')} | "
            f"{'yes' if v['ok'] else 'NO'} |"
        )
    ok = sum(r.verdict(tolerance)["ok"] for r in rows)
    out.append("")
    out.append(f"{ok} of {len(rows)} scenarios within {100 * tolerance:g} %")
    return out


def _seeds(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, sep, hi = part.partition("-")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default="1-5", help="scenario seeds: 1-50, 3,7,9 (default 1-5)")
    p.add_argument("--issue", action="store_true", help="the issue's case instead of seeds")
    p.add_argument("--prompt-tokens", type=int, default=80, help="--issue: prompt length")
    p.add_argument("--policy", default="vtc")
    p.add_argument("--duration", type=float, default=30.0, help="workload seconds per run")
    p.add_argument("--speed", type=float, default=1.0, help="the backend's --speed")
    p.add_argument("--hold-ms", type=float, default=None, help="wall ms (default: gateway's)")
    p.add_argument("--replicas", type=int, default=1, choices=(1, 2))
    p.add_argument(
        "--window",
        default=None,
        help="measured span A,B in workload seconds (default: from a quarter of the run to 95 %%)",
    )
    p.add_argument("--tolerance", type=float, default=0.10)
    p.add_argument("--lab-only", action="store_true", help="skip the live runs")
    p.add_argument("--trace", action="store_true", help="print the decision counts too")
    p.add_argument("--out", default=None, help="write the rows as JSON here")


def run(args: argparse.Namespace) -> int:
    if args.issue:
        base = issue_scenario(args.prompt_tokens)
        scenarios = [Scenario(0, base.slots, base.tenants, args.replicas)]
    else:
        scenarios = [generate(s, args.replicas) for s in _seeds(args.seeds)]
    span: tuple[float, float] | None = None
    if args.window:
        a, b = (float(x) for x in args.window.split(","))
        span = (a, b)
    opts = LiveOptions(args.policy, args.duration, args.speed, args.hold_ms, window=span)
    hold_lab = (50.0 if args.hold_ms is None else args.hold_ms) * args.speed
    rows: list[Row] = []
    for sc in scenarios:
        row = Row(sc.seed, sc, expected_shares(sc))
        row.lab = run_lab(
            sc,
            args.policy,
            args.duration,
            hold_lab,
            trace=args.trace,
            span=span,
        )
        if not args.lab_only:
            try:
                row.live = run_live(sc, opts)
            except (RuntimeError, OSError, TimeoutError) as exc:
                row.error = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        print(table([row], args.tolerance)[2], flush=True)
        if args.trace:
            for name, res in (("lab", row.lab), ("live", row.live)):
                if res is not None:
                    for tenant, counts in res.trace.items():
                        print(f"    {name} {tenant}: {counts}", flush=True)
    print()
    print("\n".join(table(rows, args.tolerance)))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                [
                    {
                        "seed": r.seed,
                        "scenario": asdict(r.scenario),
                        "expected": r.expected,
                        "lab": r.lab.shares if r.lab else None,
                        "live": r.live.shares if r.live else None,
                        "lab_trace": r.lab.trace if r.lab else None,
                        "live_trace": r.live.trace if r.live else None,
                        "error": r.error,
                        **r.verdict(args.tolerance),
                    }
                    for r in rows
                ],
                indent=2,
            )
            + "\n"
        )
    return 0 if all(r.verdict(args.tolerance)["ok"] for r in rows) else 1


# ---------------------------------------------------------------------------------------------
# the clients' process
# ---------------------------------------------------------------------------------------------


async def _clients(spec: dict[str, Any]) -> dict[str, Any]:
    """Every tenant's closed-loop clients until ``duration`` (wall seconds) has passed; then
    the requests in flight finish. Records: [tenant, sent, first token, end, prompt tokens,
    output tokens, status] in ``time.monotonic()`` seconds."""
    import aiohttp

    from gateway.lab.replay import PromptSynth

    synth = PromptSynth()
    speed = spec["speed"]
    tenants = [TenantSpec(**{**t, "think": tuple(t["think"])}) for t in spec["tenants"]]
    prompts: dict[str, list[str]] = {}
    for t in tenants:
        lo, hi = (
            (t.prompt_tokens, t.prompt_tokens)
            if isinstance(t.prompt_tokens, int)
            else t.prompt_tokens
        )
        rng = random.Random(f"{spec['seed']}:prompts:{t.name}")
        prompts[t.name] = [
            synth.text(rng.randint(lo, hi), seed=rng.randrange(1 << 30)) for _ in range(32)
        ]
    records: list[list[Any]] = []
    start = time.monotonic()
    stop_at = start + spec["duration"]

    async def client(session: aiohttp.ClientSession, t: TenantSpec, index: int) -> None:
        rng = random.Random(f"{spec['seed']}:client:{t.name}:{index}")
        url = spec["urls"][t.name] + "/v1/completions"
        headers = {"Authorization": f"Bearer key-{t.name}"}
        while time.monotonic() < stop_at:
            out = t.output_tokens
            max_tokens = out if isinstance(out, int) else rng.randint(*out)
            body = {
                "model": MODEL,
                "prompt": rng.choice(prompts[t.name]),
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            sent = time.monotonic()
            first = None
            usage = None
            status = "ok"
            try:
                async with session.post(url, json=body, headers=headers) as resp:
                    if resp.status != 200:
                        await resp.read()
                        status = "error"
                    else:
                        async for line in resp.content:
                            if not line.startswith(b"data: {"):
                                continue
                            if b'"usage":{' in line:
                                usage = json.loads(line[6:])["usage"]
                            elif first is None:
                                first = time.monotonic()
            except (aiohttp.ClientError, TimeoutError):
                status = "error"
            end = time.monotonic()
            if usage is None:
                status = "error"
            prompt_n = usage["prompt_tokens"] if usage else 0
            output_n = usage["completion_tokens"] if usage else 0
            records.append([t.name, sent, first or end, end, prompt_n, output_n, status])
            lo, hi = t.think
            pause = rng.uniform(lo, hi) / speed
            if pause > 0:
                await asyncio.sleep(pause)

    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        await asyncio.gather(
            *(client(session, t, i) for t in tenants for i in range(t.concurrency))
        )
    return {"start": start, "records": records}


def _client_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(_clients(spec))
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "client":
        sys.exit(_client_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: python -m tools.live_diff client SPEC OUT")
