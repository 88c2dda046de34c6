"""``vtc-gateway soak``: a bounded soak run that checks nothing leaks and nothing is lost.

It starts the simulated backend (with probabilistic faults: refusals, 500s, dropped and
malformed streams) and a gateway in front of it (several tenants, a small ``max_num_seqs`` so
requests queue), then keeps ``--concurrency`` client loops busy for ``--duration`` seconds. Each
loop picks a tenant, streams or not, and sometimes walks away: before sending, while queued,
or mid-stream. At the end it waits for the gateway to go idle and checks:

* no leaked slot: the gateway's in-flight and reserved tokens, and the backend's running and
  waiting requests, are all zero;
* no stuck request: every client call returned (bounded by the client timeout);
* every request accounted for: per tenant, the gateway's ``vtc_requests_total`` outcomes sum to
  at least the requests the clients saw answered and at most those plus the ones they walked
  away from (a request abandoned before it reached the gateway is not counted there, one
  abandoned as it finished may be counted ``ok``: the client cannot tell which);
* memory: the gateway's RSS after warm-up and at the end (it should stay flat).

Prints a summary and writes JSON (``--out``); exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .procs import Service, proc_sample, start_service, stop_process

MODEL = "sim-model"
FAULTS = (
    "refuse;p=0.01",
    "error_500;p=0.01",
    "drop_mid;p=0.01;after=5",
    "malformed_sse;p=0.005;after=3",
    "error_mid;p=0.005;after=4",
)
_REQ_RE = re.compile(r'^vtc_requests_total\{outcome="([^"]+)",tenant="([^"]+)"\} (\S+)$', re.M)
_REQ_RE2 = re.compile(r'^vtc_requests_total\{tenant="([^"]+)",outcome="([^"]+)"\} (\S+)$', re.M)


@dataclass
class SoakOptions:
    duration_s: float = 600.0
    concurrency: int = 200
    tenants: int = 4
    max_num_seqs: int = 64
    sim_speed: float = 1.0
    abandon_p: float = 0.1
    seed: int = 0
    faults: tuple[str, ...] = FAULTS
    out: str | None = None


@dataclass
class ClientTally:
    answered: Counter[str] = field(default_factory=Counter)  # per tenant, read to the end
    abandoned: Counter[str] = field(default_factory=Counter)  # per tenant, walked away
    statuses: Counter[str] = field(default_factory=Counter)
    errors: int = 0


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    tenant: str,
    rng: random.Random,
    tally: ClientTally,
    abandon_p: float,
) -> None:
    stream = rng.random() < 0.7
    body = {
        "model": MODEL,
        "prompt": "soak " * rng.randint(1, 200),
        "max_tokens": rng.randint(1, 96),
        "ignore_eos": rng.random() < 0.8,
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer key-{tenant}"}
    abandon_after = rng.choice((0.0, 0.01, 0.2, 1.0)) if rng.random() < abandon_p else None
    task = asyncio.ensure_future(_consume(session, url, body, headers, tally))
    try:
        if abandon_after is None:
            await task
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), abandon_after)
            if not task.done():
                task.cancel()
                tally.abandoned[tenant] += 1
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                return
    except aiohttp.ClientError:
        tally.errors += 1
    tally.answered[tenant] += 1


async def _consume(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    tally: ClientTally,
) -> None:
    async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
        tally.statuses[str(resp.status)] += 1
        async for _ in resp.content.iter_any():
            pass


async def _loop(
    i: int,
    session: aiohttp.ClientSession,
    url: str,
    opts: SoakOptions,
    deadline: float,
    tally: ClientTally,
) -> None:
    rng = random.Random(f"{opts.seed}:{i}")
    while time.monotonic() < deadline:
        tenant = f"t{rng.randrange(opts.tenants)}"
        await _one(session, url, tenant, rng, tally, opts.abandon_p)


def _outcomes(metrics: str) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for outcome, tenant, v in _REQ_RE.findall(metrics):
        out.setdefault(tenant, Counter())[outcome] += int(float(v))
    for tenant, outcome, v in _REQ_RE2.findall(metrics):
        out.setdefault(tenant, Counter())[outcome] += int(float(v))
    return out


def _gauge_sum(metrics: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", metrics, re.M))


async def soak(opts: SoakOptions, log: Any = print) -> dict[str, Any]:
    """Run the soak; the gateway's config lives in a temporary directory removed at the end."""
    with tempfile.TemporaryDirectory(prefix="vtc-soak-") as tmp:
        return await _soak(opts, Path(tmp), log)


async def _soak(opts: SoakOptions, workdir: Path, log: Any) -> dict[str, Any]:
    sim_args = [
        sys.executable,
        "-m",
        "backends.sim",
        "--port",
        "0",
        "--model",
        MODEL,
        "--profile",
        "a10g-llama2-7b",
        "--kv-cache-tokens",
        "100000",
        "--max-num-seqs",
        str(opts.max_num_seqs),
        "--speed",
        str(opts.sim_speed),
        "--seed",
        str(opts.seed),
    ]
    for f in opts.faults:
        sim_args += ["--fault", f]
    sim = await start_service("sim", sim_args)
    gw: Service | None = None
    try:
        cfg = {
            "backends": [{"name": "sim", "url": sim.url, "max_num_seqs": opts.max_num_seqs}],
            "tenants": [
                {"name": f"t{i}", "weight": 1 + i % 3, "api_keys": [f"key-t{i}"], "max_queued": 512}
                for i in range(opts.tenants)
            ],
            "limits": {"read_timeout_s": 10, "queue_timeout_s": 60, "health_interval_s": 1},
        }
        path = workdir / "gateway.yaml"
        path.write_text(yaml.safe_dump(cfg))
        gw = await start_service(
            "gateway",
            [
                sys.executable,
                "-m",
                "gateway",
                "--log-level",
                "ERROR",
                "serve",
                "--config",
                str(path),
                "--port",
                "0",
            ],
        )
        tally = ClientTally()
        timeout = aiohttp.ClientTimeout(total=120)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            warm = time.monotonic() + min(10.0, opts.duration_s / 5)
            deadline = time.monotonic() + opts.duration_s
            loops = [
                asyncio.create_task(_loop(i, session, gw.url, opts, deadline, tally))
                for i in range(opts.concurrency)
            ]
            await asyncio.sleep(max(0.0, warm - time.monotonic()))
            rss_start = proc_sample(gw.pid).rss_kib
            log(
                f"soak: {opts.concurrency} loops for {opts.duration_s:g}s, "
                f"gateway RSS after warm-up {rss_start / 1024:.1f} MiB"
            )
            stuck = 0
            done, pending = await asyncio.wait(loops, timeout=opts.duration_s + 150)
            for t in pending:
                stuck += 1
                t.cancel()
            for t in done:
                if t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            # idle: nothing in flight or queued in the gateway, nothing running in the backend
            idle_deadline = time.monotonic() + 60
            while True:
                async with session.get(gw.url + "/metrics") as r:
                    gm = await r.text()
                async with session.get(sim.url + "/metrics") as r:
                    sm = await r.text()
                busy = (
                    _gauge_sum(gm, "vtc_backend_in_flight")
                    + _gauge_sum(gm, "vtc_backend_reserved_tokens")
                    + _gauge_sum(gm, "vtc_tenant_queued")
                    + _gauge_sum(sm, "vllm:num_requests_running")
                    + _gauge_sum(sm, "vllm:num_requests_waiting")
                )
                if busy == 0 or time.monotonic() > idle_deadline:
                    break
                await asyncio.sleep(0.2)
        rss_end = proc_sample(gw.pid).rss_kib
        outcomes = _outcomes(gm)
        accounted = {t: sum(c.values()) for t, c in outcomes.items()}
        tenants = sorted(set(tally.answered) | set(tally.abandoned) | set(accounted))
        unaccounted = {
            t: (tally.answered[t], accounted.get(t, 0), tally.answered[t] + tally.abandoned[t])
            for t in tenants
            if not tally.answered[t]
            <= accounted.get(t, 0)
            <= tally.answered[t] + tally.abandoned[t]
        }
        result = {
            "options": {k: v for k, v in vars(opts).items() if k != "out"},
            "requests_sent": sum(tally.answered.values()) + sum(tally.abandoned.values()),
            "answered": dict(tally.answered),
            "abandoned": dict(tally.abandoned),
            "gateway_outcomes": {t: dict(c) for t, c in outcomes.items()},
            "unaccounted": unaccounted,
            "client_statuses": dict(tally.statuses),
            "client_errors": tally.errors,
            "stuck": stuck,
            "leaked": {
                "gateway_in_flight": _gauge_sum(gm, "vtc_backend_in_flight"),
                "gateway_reserved_tokens": _gauge_sum(gm, "vtc_backend_reserved_tokens"),
                "gateway_queued": _gauge_sum(gm, "vtc_tenant_queued"),
                "backend_running": _gauge_sum(sm, "vllm:num_requests_running"),
                "backend_waiting": _gauge_sum(sm, "vllm:num_requests_waiting"),
            },
            "rss_kib": {"after_warmup": rss_start, "end": rss_end},
        }
        leaked: dict[str, float] = result["leaked"]  # type: ignore[assignment]
        result["ok"] = (
            stuck == 0
            and all(v == 0 for v in leaked.values())
            and not unaccounted
            and tally.errors == 0
        )
        return result
    finally:
        if gw is not None:
            await stop_process(gw.proc)
        await stop_process(sim.proc)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("soak", help="bounded soak run against the simulated backend")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (600)")
    p.add_argument("--concurrency", type=int, default=200, help="client loops (200)")
    p.add_argument("--tenants", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--sim-speed", type=float, default=1.0)
    p.add_argument("--abandon", type=float, default=0.1, help="share of requests walked away")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-faults", action="store_true", help="no injected backend faults")
    p.add_argument("--out", default="bench-results/soak.json")
    p.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    opts = SoakOptions(
        duration_s=args.duration,
        concurrency=args.concurrency,
        tenants=args.tenants,
        max_num_seqs=args.max_num_seqs,
        sim_speed=args.sim_speed,
        abandon_p=args.abandon,
        seed=args.seed,
        faults=() if args.no_faults else FAULTS,
        out=args.out,
    )
    result = asyncio.run(soak(opts))
    keys = (
        "ok",
        "requests_sent",
        "abandoned",
        "stuck",
        "unaccounted",
        "leaked",
        "rss_kib",
        "client_statuses",
        "client_errors",
    )
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1
