"""``vtc-gateway bench quota``: fair shares of a hosted API's quota (tokens per window).

The simulated backend plays a rate-limited provider (its own process)::

    python -m backends.sim --provider --tpm TPM --rate-window-s WINDOW

and one gateway process fronts it with a quota backend (``kind: openai``, ``tpm: TPM``,
``quota_window_s: WINDOW``), tenants ``a`` (weight 1), ``b`` (weight 3) and ``c`` (weight 1),
policy ``vtc``. This process runs the clients: per tenant ``--clients`` closed-loop streaming
chat clients that send what SDK users send (no ``max_tokens``, no ``ignore_eos``, prompts of
50-300 seeded random words, ``include_usage``), the next request as soon as the answer ends.
Three phases: ``a`` alone, then ``a`` and ``b`` (weights 1:3), then ``c`` arrives as well.

Each request is counted as the provider counts it: prompt + output tokens (the answer's
``usage``), at the moment it reached the provider (its response headers reached the client).
Per phase, over whole windows after its first (so that they hold only that phase's traffic; a
sliding window lets a stretch that is not a whole number of windows run above the quota's pace):

* ``util``: tokens served per window as a fraction of ``tpm`` (lone tenant: want >= 0.95);
* ``shares``: each tenant's fraction of those tokens, and ``b/a`` against the weights' 3;
* ``c 1st``: the shares in ``c``'s first window (lifted to the others' level, not starved);
* ``maxwin``: the most tokens any sliding window held, as a fraction of ``tpm`` (want
  <= 1.02), from the client records (their arrival times carry the relay's jitter, so a window
  may count a request the provider's did not), and ``prov``: the provider's own
  ``window_tokens``, sampled every 0.25 s;
* 429s the clients saw (want 0) and the provider's refusals (through the gateway: the
  gateway's, which requeued each refused request).

After the last phase no request is sent; those already sent (queued in the gateway) finish.
The ``direct`` row is the same clients straight at the provider: what the teams get without
the gateway (their shares, and the 429s in their own hands; a refused client waits the
``Retry-After`` it was given, as the ``openai`` SDK does, and sends again)::

    vtc-gateway bench quota          # ~6 minutes: direct, then the gateway
    vtc-gateway bench quota --no-direct --phases 20,30,30 --tpm 6000 --clients 6  # quick look

A benchmark, not a test: it prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gateway.backend_pool import retry_after
from gateway.lab.quota import max_window, measured

from .loadgen import MODEL, start_gateway, start_sim, word_range
from .parity_bench import prompt_stream
from .procs import run_benchmark, running

#: Tenants in order of arrival, and their weights.
TENANTS: tuple[tuple[str, float], ...] = (("a", 1.0), ("b", 3.0), ("c", 1.0))
DIRECT = "direct"
GATEWAY = "gateway"


def api_key(tenant: str) -> str:
    return f"quota-key-{tenant}"


@dataclass(frozen=True, slots=True)
class QuotaOptions:
    #: the provider's tokens per window (prompt + output)
    tpm: int = 20_000
    #: the provider's sliding window in seconds (60 is a real per-minute quota)
    window_s: float = 10.0
    #: seconds of ``a`` alone, ``a`` + ``b``, ``a`` + ``b`` + ``c``
    phases: tuple[float, float, float] = (30.0, 60.0, 60.0)
    #: closed-loop clients per tenant
    clients: int = 12
    prompt_words: tuple[int, int] = (50, 300)
    #: the provider's median output length (log-normal, no ``ignore_eos``)
    median_output_tokens: int = 128
    #: the provider's time scale (1 = the profile's real speed)
    speed: float = 1.0
    seed: int = 42
    #: the gateway's backend kind (``openai``: counts from the stream; ``vllm``: exact)
    kind: str = "openai"
    direct: bool = True
    gateway: bool = True
    #: the gateway's ``scheduler.hold_ms`` (None: its default)
    hold_ms: float | None = None


# ---------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One request as a client saw it (times in seconds from the run's start)."""

    tenant: str
    sent: float
    status: int = 0  # 0: no answer (a transport error, or cancelled at the end)
    started: float | None = None  # response headers arrived: the provider took it
    ended: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_after: float = 0.0  # a 429's Retry-After, seconds

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def chat_body(prompt: str, model: str = MODEL) -> bytes:
    """An SDK user's streaming request: no ``max_tokens``, no ``ignore_eos``, usage asked."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return json.dumps(body).encode()


def usage_of(raw: bytes) -> dict[str, Any] | None:
    """The ``usage`` of the last SSE event that carries one (None if none did)."""
    found: dict[str, Any] | None = None
    for event in raw.split(b"\n\n"):
        event = event.strip()
        if not event.startswith(b"data: {") or b'"usage"' not in event:
            continue
        try:
            usage = json.loads(event[6:]).get("usage")
        except ValueError:
            continue
        if isinstance(usage, dict):
            found = usage
    return found


async def one_request(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    rec: Record,
    clock: Callable[[], float],
) -> None:
    async with session.post(url, data=body, headers=headers) as resp:
        rec.status = resp.status
        if resp.status != 200:
            if resp.status == 429:
                rec.retry_after = retry_after(resp.headers)
            await resp.read()
            rec.ended = clock()
            return
        rec.started = clock()
        raw = await resp.read()
    rec.ended = clock()
    usage = usage_of(raw)
    if usage is not None:
        rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        rec.completion_tokens = int(usage.get("completion_tokens") or 0)


async def closed_client(
    session: aiohttp.ClientSession,
    url: str,
    tenant: str,
    prompts: Callable[[], str],
    start: float,
    end: float,
    clock: Callable[[], float],
    into: list[Record],
    model: str = MODEL,
) -> None:
    """One closed-loop client from ``start`` to ``end`` (run-clock seconds): the next request
    as soon as the previous one ends (after a 429, too: an SDK's retry is another request)."""
    await asyncio.sleep(max(0.0, start - clock()))
    headers = {"Authorization": f"Bearer {api_key(tenant)}", "Content-Type": "application/json"}
    while clock() < end:
        rec = Record(tenant, clock())
        into.append(rec)
        try:
            await one_request(session, url, chat_body(prompts(), model), headers, rec, clock)
        except (aiohttp.ClientError, TimeoutError):
            rec.ended = clock()
        if rec.status == 429:
            # as the openai SDK does: wait what the provider asked before trying again
            await asyncio.sleep(max(rec.retry_after, 0.01))


def phase_starts(phases: Sequence[float]) -> list[float]:
    """When each tenant's clients start (run-clock seconds): ``a`` at 0, then one per phase."""
    out = [0.0]
    for p in phases[:-1]:
        out.append(out[-1] + p)
    return out


async def drive(
    url: str,
    opts: QuotaOptions,
    provider_url: str | None = None,
    model: str = MODEL,
    endpoint: str = "/v1/chat/completions",
) -> dict[str, Any]:
    """Run the three phases against ``url``; the records, and the provider's window samples
    (``provider_url``'s ``/sim/stats`` every 0.25 s)."""
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    end = sum(opts.phases)
    starts = phase_starts(opts.phases)
    records: list[Record] = []
    samples: list[tuple[float, int]] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=timeout
    ) as session:
        stats0 = await _sim_stats(session, provider_url)
        clients = [
            asyncio.create_task(
                closed_client(
                    session,
                    url + endpoint,
                    tenant,
                    prompt_stream(opts.seed, 1000 * k + i, opts.prompt_words),
                    start + 0.05 * i,  # staggered by a little, as real clients are
                    end,
                    clock,
                    records,
                    model,
                )
            )
            for k, ((tenant, _), start) in enumerate(zip(TENANTS, starts, strict=True))
            for i in range(opts.clients)
        ]
        # no request is sent after ``end``; those sent before it may finish (the gateway's
        # queue drains at the quota's pace) for up to two windows, then they are abandoned
        drain = end + 2 * opts.window_s + 10.0
        while clock() < drain and not all(task.done() for task in clients):
            await asyncio.sleep(0.25)
            stats = await _sim_stats(session, provider_url)
            if stats is not None:
                samples.append((clock(), int(stats["window_tokens"])))
        stats1 = await _sim_stats(session, provider_url)
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    return {
        "records": records,
        "provider_samples": samples,
        "provider": _provider_delta(stats0, stats1),
    }


async def _sim_stats(session: aiohttp.ClientSession, url: str | None) -> dict[str, Any] | None:
    if url is None:
        return None
    try:
        async with session.get(url + "/sim/stats") as resp:
            doc = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    rl = doc.get("ratelimit")
    return rl if isinstance(rl, dict) else None


def _provider_delta(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    if a is None or b is None:
        return None
    refused = {k: v - a["refused"].get(k, 0) for k, v in b["refused"].items()}
    return {
        "accepted_requests": b["accepted_requests"] - a["accepted_requests"],
        "accepted_tokens": b["accepted_tokens"] - a["accepted_tokens"],
        "refused": refused,
        "refused_total": sum(refused.values()),
    }


# ---------------------------------------------------------------------------------------------
# measures (pure)
# ---------------------------------------------------------------------------------------------


def served(records: Sequence[Record]) -> list[Record]:
    """Requests the provider took and answered (a usage came back)."""
    return [r for r in records if r.status == 200 and r.started is not None and r.tokens > 0]


@dataclass(slots=True)
class PhaseStats:
    name: str
    start: float
    end: float
    tenants: list[str]
    tokens: dict[str, int] = field(default_factory=dict)
    util: float = 0.0
    shares: dict[str, float] = field(default_factory=dict)
    fair: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def phase_stats(
    records: Sequence[Record],
    name: str,
    start: float,
    end: float,
    tenants: Sequence[str],
    weights: dict[str, float],
    tpm: int,
    window_s: float,
) -> PhaseStats:
    """Tokens started in ``[start, end)`` per tenant, their shares, and the fraction of the
    quota they used (``tpm`` per ``window_s``)."""
    tokens = {t: 0 for t in tenants}
    for r in served(records):
        assert r.started is not None
        if start <= r.started < end:
            tokens[r.tenant] = tokens.get(r.tenant, 0) + r.tokens
    total = sum(tokens.values())
    wsum = sum(weights[t] for t in tenants)
    return PhaseStats(
        name,
        round(start, 3),
        round(end, 3),
        list(tenants),
        tokens,
        util=total / (tpm * (end - start) / window_s) if end > start else 0.0,
        shares={t: n / total if total else 0.0 for t, n in tokens.items()},
        fair={t: weights[t] / wsum for t in tenants},
    )


def per_window(records: Sequence[Record], window_s: float, end: float) -> list[dict[str, Any]]:
    """Tokens per tenant started in each consecutive window ``[k*w, (k+1)*w)`` up to ``end``."""
    n = max(1, int(end / window_s + 1e-9))
    out: list[dict[str, Any]] = [
        {"start": round(k * window_s, 3), "tokens": {t: 0 for t, _ in TENANTS}} for k in range(n)
    ]
    for r in served(records):
        assert r.started is not None
        k = int(r.started / window_s)
        if 0 <= k < n:
            out[k]["tokens"][r.tenant] += r.tokens
    return out


def summarize(run: dict[str, Any], opts: QuotaOptions, path: str) -> dict[str, Any]:
    """Per phase (its first window left out), the whole run's overshoot and its 429s."""
    records: list[Record] = run["records"]
    w = opts.window_s
    weights = dict(TENANTS)
    starts = phase_starts(opts.phases)
    ends = [*starts[1:], sum(opts.phases)]
    names = ["a", "a+b", "a+b+c"]
    phases = [
        phase_stats(
            records,
            names[i],
            *measured(starts[i], ends[i], w),
            [t for t, _ in TENANTS[: i + 1]],
            weights,
            opts.tpm,
            w,
        )
        for i in range(3)
    ]
    first_c = phase_stats(
        records, "c first window", starts[2], starts[2] + w, ["a", "b", "c"], weights, opts.tpm, w
    )
    ok = served(records)
    client_max = max_window([(r.started or 0.0, r.tokens) for r in ok], w)
    provider_max = max((n for _, n in run["provider_samples"]), default=None)
    statuses: dict[str, int] = {}
    for r in records:
        key = str(r.status) if r.status else "none"
        statuses[key] = statuses.get(key, 0) + 1
    ended = [r for r in records if r.ended is not None and r.status == 200]
    provider = run["provider"]
    ab = phases[1].tokens
    return {
        "path": path,
        "phases": [p.to_json() for p in phases],
        "c_first_window": first_c.to_json(),
        "ratio_b_to_a": ab["b"] / ab["a"] if ab.get("a") else None,
        "max_window_tokens": client_max,
        "max_window_fraction": client_max / opts.tpm,
        "provider_max_window_fraction": (
            provider_max / opts.tpm if provider_max is not None else None
        ),
        "client_429": statuses.get("429", 0),
        "client_statuses": statuses,
        "provider": provider,
        "provider_429": provider["refused_total"] if provider else None,
        # through the gateway every refusal is the gateway's: it requeued the request
        "requeued": provider["refused_total"] if provider and path == GATEWAY else 0,
        "requests_ok": len(ended),
        "windows": per_window(records, w, sum(opts.phases)),
    }


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def sim_args(opts: QuotaOptions) -> tuple[str, ...]:
    return (
        "--provider",
        *("--tpm", str(opts.tpm), "--rate-window-s", str(opts.window_s)),
        *("--median-output-tokens", str(opts.median_output_tokens)),
        *("--speed", str(opts.speed), "--seed", str(opts.seed)),
    )


def gateway_config(provider_url: str, opts: QuotaOptions) -> dict[str, Any]:
    """One quota backend, tenants a:b:c at 1:3:1, vtc; prompts and outputs priced alike (the
    quota counts them alike)."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "backends": [
            {
                "name": "provider",
                "url": provider_url,
                "kind": opts.kind,
                "models": [MODEL],
                "tpm": opts.tpm,
                "quota_window_s": opts.window_s,
                "max_num_seqs": 1024,
                "max_kv_tokens": 100_000_000,
            }
        ],
        "tenants": [
            {"name": t, "weight": w, "api_keys": [api_key(t)], "max_queued": 10_000}
            for t, w in TENANTS
        ],
        "scheduler": {
            "policy": "vtc",
            "input_price": 1,
            "output_price": 1,
            **({} if opts.hold_ms is None else {"hold_ms": opts.hold_ms}),
        },
        "limits": {"queue_timeout_s": 3600},
    }


#: How the clients reach the provider: ``front(provider_url, workdir)`` yields the URL they use
#: (the provider itself, a gateway in front of it, another proxy) while it runs.
Front = Callable[[str, Path], contextlib.AbstractAsyncContextManager[str]]


@contextlib.asynccontextmanager
async def direct_front(provider_url: str, workdir: Path) -> AsyncIterator[str]:
    yield provider_url


def gateway_front(opts: QuotaOptions) -> Front:
    """The gateway (its own process) with :func:`gateway_config` in front of the provider."""

    @contextlib.asynccontextmanager
    async def front(provider_url: str, workdir: Path) -> AsyncIterator[str]:
        cfg = gateway_config(provider_url, opts)
        async with running(start_gateway(cfg, workdir, None, True, False)) as (gw,):
            yield gw.url

    return front


async def quota_benchmark(
    opts: QuotaOptions, log: Callable[[str], None], fronts: dict[str, Front] | None = None
) -> dict[str, Any]:
    """Each path (default: ``direct`` and ``gateway`` as ``opts`` says) on a fresh provider;
    the JSON-ready results."""
    if fronts is None:
        fronts = {}
        if opts.direct:
            fronts[DIRECT] = direct_front
        if opts.gateway:
            fronts[GATEWAY] = gateway_front(opts)
    results: dict[str, Any] = {"meta": _meta(opts), "runs": []}
    with tempfile.TemporaryDirectory(prefix="vtc-quota-") as tmp:
        for path, front in fronts.items():
            async with (
                running(start_sim(None, *sim_args(opts))) as (sim,),
                front(sim.url, Path(tmp)) as url,
            ):
                run = await drive(url, opts, sim.url)
            row = summarize(run, opts, path)
            results["runs"].append(row)
            for line in row_lines(row):
                log(line)
    return results


def _meta(opts: QuotaOptions) -> dict[str, Any]:
    return {
        **asdict(opts),
        "tenants": dict(TENANTS),
        "provider": "python -m backends.sim " + " ".join(sim_args(opts)),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

HEADER = (
    f"{'path':<15} {'phase':<7}{'util':>6}  {'shares a/b/c (fair)':<32}{'b/a':>6}"
    f"{'maxwin':>8}{'prov':>6}{'429 cli':>8}{'429 prov':>9}{'requeued':>9}"
)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def row_lines(row: dict[str, Any]) -> list[str]:
    """One line per phase, the run's overshoot and 429s on the first."""
    lines = []
    for i, p in enumerate(row["phases"]):
        shares = "/".join(f"{p['shares'][t]:.2f}" for t in p["tenants"])
        fair = "/".join(f"{p['fair'][t]:.2f}" for t in p["tenants"])
        tok = p["tokens"]
        ratio = "" if "b" not in tok else f"{tok['b'] / tok['a']:.2f}" if tok["a"] else "-"
        tail = ""
        if i == 0:
            tail = (
                f"{_pct(row['max_window_fraction']):>8}"
                f"{_pct(row['provider_max_window_fraction']):>6}{row['client_429']:>8}"
                f"{row['provider_429'] if row['provider_429'] is not None else '-':>9}"
                f"{row['requeued']:>9}"
            )
        lines.append(
            f"{row['path'] if i == 0 else '':<15} {p['name']:<7}{_pct(p['util']):>6}  "
            f"{shares + ' (' + fair + ')':<32}{ratio:>6}{tail}"
        )
    c = row["c_first_window"]
    lines.append(
        f"{'':<15} {'c 1st':<7}{_pct(c['util']):>6}  "
        + "/".join(f"{c['shares'][t]:.2f}" for t in c["tenants"])
    )
    return lines


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _phases(s: str) -> tuple[float, float, float]:
    parts = [float(x) for x in s.split(",") if x.strip()]
    if len(parts) != 3 or any(p <= 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected three positive seconds A,AB,ABC, got {s!r}")
    return parts[0], parts[1], parts[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = QuotaOptions()
    p.add_argument("--tpm", type=int, default=d.tpm, help="tokens per window (the provider's)")
    p.add_argument("--window", type=float, default=d.window_s, help="the quota's window, seconds")
    p.add_argument(
        "--phases",
        type=_phases,
        default=d.phases,
        help="seconds of a alone, a+b, a+b+c (default 30,60,60)",
    )
    p.add_argument("--clients", type=int, default=d.clients, help="closed-loop clients per tenant")
    p.add_argument("--prompt-words", type=word_range, default=d.prompt_words, help="LO-HI words")
    p.add_argument("--median-output-tokens", type=int, default=d.median_output_tokens)
    p.add_argument("--speed", type=float, default=d.speed, help="the provider's time scale")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--kind", choices=("openai", "vllm"), default=d.kind, help="backend kind")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=d.direct)
    p.add_argument("--gateway", action=argparse.BooleanOptionalAction, default=d.gateway)
    p.add_argument("--hold-ms", type=float, help="the gateway's scheduler.hold_ms")
    p.add_argument("--out", default="bench-results/quota.json", help="JSON results file")


def options_from_args(args: argparse.Namespace) -> QuotaOptions:
    return QuotaOptions(
        tpm=args.tpm,
        window_s=args.window,
        phases=args.phases,
        clients=args.clients,
        prompt_words=args.prompt_words,
        median_output_tokens=args.median_output_tokens,
        speed=args.speed,
        seed=args.seed,
        kind=args.kind,
        direct=args.direct,
        gateway=args.gateway,
        hold_ms=args.hold_ms,
    )


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.clients < 1 or opts.tpm < 1 or opts.window_s <= 0:
        print("--clients and --tpm must be >= 1, --window > 0", file=sys.stderr)
        return 2
    return run_benchmark(HEADER, lambda log: quota_benchmark(opts, log), args.out)
