"""``vtc-gateway bench cluster``: one gateway process vs ``serve --workers N`` sharing Redis.

One invocation starts a real ``redis-server`` on a free loopback port (persistence off), the
simulated backend at max rate (``--speed 0``) and, in turn, the gateway in each mode::

    single   one process, no ``cluster:`` section (the reference)
    wN       ``serve --workers N`` with ``cluster:`` on that Redis (N = each of ``--workers``)

Each mode serves two tenants, ``a`` (weight 1) and ``b`` (weight 2), each with
``--concurrency`` looping streaming clients on a backend of ``--max-num-seqs`` sequences, so
both stay backlogged. Per mode it reports (modes interleaved over ``--rounds``, since a shared
machine drifts):

* aggregate streamed tokens/s and the ratio of each ``wN`` to ``w1`` (the scaling target:
  >= 1.6x for ``--workers 2`` on 2 free cores) and to ``single``;
* tenant b's share of the tokens (fair: 2/3);
* Redis operations per streamed token, from ``INFO commandstats`` deltas over the measured
  window: script calls (``EVALSHA``: what crosses the network) and all commands (including
  those the scripts run inside Redis);
* TTFT p50 on idle gateways: every mode runs side by side and ``--ttft-requests`` requests,
  one at a time, alternate between them (so all see the same machine); what the shared
  dispatch adds is the median of the paired differences to ``single`` (target <= 0.5 ms);
* the CPU of the gateway processes (parent and workers), of the simulator and of the load
  generator, the busy share of each core and the load average, so a saturated machine shows.

The load generator, the simulator and Redis share the machine with the workers: on 2 cores
the workers cannot have 2 cores to themselves, and the CPU columns say how much they got.
A benchmark, not a test: it prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from redis import asyncio as aioredis

from .loadgen import (
    MODEL,
    TOKEN_MARK,
    LoadWindow,
    fmt,
    ints,
    pct_ms,
    request_body,
    start_sim,
    worker,
    write_config,
)
from .procs import (
    Service,
    busy_shares,
    cpu_times,
    free_port,
    proc_sample,
    run_benchmark,
    running,
    stop_process,
)

TENANT_WEIGHTS = {"a": 1.0, "b": 2.0}


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    workers: tuple[int, ...] = (1, 2)
    single: bool = True
    rounds: int = 2
    concurrency: int = 48  # per tenant
    max_tokens: int = 128
    max_num_seqs: int = 32
    duration: float = 8.0
    warmup: float = 2.0
    ttft_requests: int = 200
    ttft_max_tokens: int = 16
    sync_ms: float = 10.0
    lease_s: float = 5.0


# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def redis_server(binary: str) -> Any:
    """A ``redis-server`` on a free loopback port, persistence off; yields its URL."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary,
        *("--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
        *("--protected-mode", "yes", "--loglevel", "warning"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = aioredis.Redis.from_url(url)
        try:
            deadline = time.monotonic() + 10
            while True:  # ready when it answers PING (bounded)
                try:
                    await client.ping()
                    break
                except (OSError, aioredis.RedisError):
                    if proc.returncode is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {port}") from None
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()
        yield url
    finally:
        await stop_process(proc)


def cluster_config(
    sim_url: str, opts: ClusterOptions, redis_url: str | None, replica: str
) -> dict[str, Any]:
    """Two tenants (:data:`TENANT_WEIGHTS`), one backend of ``max_num_seqs`` sequences;
    with ``redis_url`` a ``cluster:`` section and per-worker admin ports."""
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0, "admin_port": 0},
        "backends": [
            {
                "name": "sim",
                "url": sim_url,
                "models": [MODEL],
                "max_num_seqs": opts.max_num_seqs,
                "max_kv_tokens": 100_000_000,
                "max_model_len": 8192,
            }
        ],
        "tenants": [
            {"name": t, "weight": w, "api_keys": [f"bench-key-{t}"], "max_queued": 1_000_000}
            for t, w in TENANT_WEIGHTS.items()
        ],
        "scheduler": {"policy": "vtc"},
        "limits": {"queue_timeout_s": 3600, "health_interval_s": 5},
    }
    if redis_url is not None:
        config["cluster"] = {
            "url": redis_url,
            "sync_interval_s": opts.sync_ms / 1000,
            "lease_s": opts.lease_s,
            "replica_id": replica,
        }
    return config


async def start_gateways(
    config: dict[str, Any], workdir: Path, workers: int | None
) -> tuple[Service, list[str]]:
    """``serve`` (``workers`` None) or ``serve --workers N``; returns once every worker
    listens, with the admin URLs (``/metrics``) of the workers. The service's pid is the
    parent's (the supervisor with workers)."""
    path = write_config(config, workdir)
    argv = [sys.executable, "-m", "gateway", "--log-level", "WARNING", "serve"]
    argv += ["--config", str(path), "--port", "0", "--no-watch"]
    if workers is not None:
        argv += ["--workers", str(workers)]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    url = None
    admins: list[str] = []
    try:
        while len(admins) < (workers or 1):
            line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
            if not line:
                raise RuntimeError("the gateway exited before listening")
            if line.startswith("admin listening on "):  # after the worker's main port
                admins.append(line.split()[-1].rstrip("/"))
            elif line.startswith("listening on "):
                url = line.split()[-1].rstrip("/")
    except BaseException:
        await stop_process(proc)
        raise
    assert url is not None
    return Service(f"gateway-{workers or 'single'}", proc, url), admins


async def worker_stats(admins: list[str]) -> dict[str, float | None]:
    """From each worker's ``/metrics``, summed: the mean round trip to Redis over the workers'
    lifetime (``vtc_cluster_redis_rtt_seconds``, in ms), the round trips and the requests
    granted without one (``vtc_cluster_grants_alone_total``)."""
    sums = {"vtc_cluster_redis_rtt_seconds_sum": 0.0, "vtc_cluster_redis_rtt_seconds_count": 0.0,
            "vtc_cluster_grants_alone_total": 0.0}  # fmt: skip
    async with aiohttp.ClientSession() as session:
        for admin in admins:
            async with session.get(admin + "/metrics") as resp:
                text = await resp.text()
            for line in text.splitlines():
                name = line.partition("{")[0]
                if name in sums:
                    sums[name] += float(line.split()[-1])
    count = sums["vtc_cluster_redis_rtt_seconds_count"]
    return {
        "redis_rtt_ms": sums["vtc_cluster_redis_rtt_seconds_sum"] / count * 1000 if count else None,
        "round_trips": count,
        "grants_alone": sums["vtc_cluster_grants_alone_total"],
    }


def family(pid: int) -> list[int]:
    """``pid`` and its children (the workers of ``serve --workers``), from ``/proc``."""
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_sample(pid).cpu_s
    return total


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the last reset (``INFO commandstats``)."""
    info = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------


async def two_tenant_load(
    url: str,
    *,
    concurrency: int,
    max_tokens: int,
    warmup: float,
    duration: float,
    pids: dict[str, list[int]],
    redis: aioredis.Redis | None,
) -> dict[str, Any]:
    """``concurrency`` looping clients per tenant; per-tenant tokens over the window, CPU
    per process group, Redis commands over the same window."""
    body = request_body(max_tokens, "plain")
    endpoint = url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    now = time.perf_counter()
    windows = {
        t: LoadWindow(start=now + warmup, end=now + warmup + duration) for t in TENANT_WEIGHTS
    }
    budget = [1 << 62]
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(
                worker(
                    session,
                    endpoint,
                    body,
                    {"Authorization": f"Bearer bench-key-{t}", "Content-Type": "application/json"},
                    max_tokens,
                    w,
                    budget,
                    warmup * i / concurrency / 2,
                )
            )
            for t, w in windows.items()
            for i in range(concurrency)
        ]
        start = windows["a"].start
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        cpu0 = {k: _cpu(v) for k, v in pids.items()}
        client0 = proc_sample()
        cores0 = cpu_times()
        stats0 = await commandstats(redis) if redis is not None else {}
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        await asyncio.wait(tasks, timeout=max(0.0, windows["a"].end - time.perf_counter()))
        t1 = time.perf_counter()
        stats1 = await commandstats(redis) if redis is not None else {}
        cpu1 = {k: _cpu(v) for k, v in pids.items()}
        client1 = proc_sample()
        cores = busy_shares(cores0, cpu_times())
        load1 = os.getloadavg()[0]
        budget[0] = 0  # every client ends after its current request
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(60.0, 2 * duration))
    seconds = max(t1 - t0, 1e-9)
    tokens = {t: w.tokens for t, w in windows.items()}
    total = sum(tokens.values())
    ttft = [x for w in windows.values() for x in w.ttft]
    errors: dict[str, int] = {}
    for w in windows.values():
        for k, v in w.errors.items():
            errors[k] = errors.get(k, 0) + v
    out: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "tokens_per_s": total / seconds,
        "tokens": tokens,
        "share_b": tokens["b"] / total if total else None,
        "requests": sum(w.requests for w in windows.values()),
        "ttft_ms": {"p50": pct_ms(ttft, 0.5), "p99": pct_ms(ttft, 0.99), "n": len(ttft)},
        "errors": errors,
        "bad_token_counts": sum(w.bad_counts for w in windows.values()),
        "cpu_share": {k: round((cpu1[k] - cpu0[k]) / seconds, 3) for k in pids},
        "core_busy": cores,
        "loadavg_1m": [round(load0, 2), round(load1, 2)],
    }
    out["cpu_share"]["client"] = round((client1.cpu_s - client0.cpu_s) / seconds, 3)
    if redis is not None:
        delta = {k: v - stats0.get(k, 0) for k, v in stats1.items()}
        delta = {k: v for k, v in delta.items() if v and not k.startswith(("info", "config"))}
        scripts = delta.get("evalsha", 0) + delta.get("eval", 0)
        out["redis"] = {
            "script_calls": scripts,
            "commands": sum(delta.values()),
            "script_calls_per_token": scripts / total if total else None,
            "commands_per_token": sum(delta.values()) / total if total else None,
            "by_command": delta,
        }
    return out


async def _ttft_once(session: aiohttp.ClientSession, url: str, body: bytes) -> float | None:
    """Seconds to the first output token of one streaming request (None on an error)."""
    headers = {"Authorization": "Bearer bench-key-a", "Content-Type": "application/json"}
    t0 = time.perf_counter()
    first = None
    async with session.post(url + "/v1/chat/completions", data=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            return None
        async for data in resp.content.iter_any():
            if first is None and TOKEN_MARK in data:
                first = time.perf_counter() - t0
    return first


async def paired_ttft(urls: dict[str, str], opts: ClusterOptions) -> dict[str, Any]:
    """TTFT on idle gateways, one request at a time, alternating between the modes (all
    running at once), so that every mode sees the same machine: per mode the p50, and per
    cluster mode the median of its paired differences to ``single``."""
    body = request_body(opts.ttft_max_tokens, "plain")
    samples: dict[str, list[float | None]] = {m: [] for m in urls}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for url in urls.values():  # warm up: connections, first-use paths
            for _ in range(5):
                await _ttft_once(session, url, body)
        for i in range(opts.ttft_requests):
            order = list(urls.items())
            if i % 2:
                order.reverse()
            for m, url in order:
                samples[m].append(await _ttft_once(session, url, body))
    out: dict[str, Any] = {"requests": opts.ttft_requests, "max_tokens": opts.ttft_max_tokens}
    for m, xs in samples.items():
        ok = [x for x in xs if x is not None]
        out[m] = {"p50": pct_ms(ok, 0.5), "p90": pct_ms(ok, 0.9), "n": len(ok)}
        if m != "single" and "single" in samples:
            diffs = [
                x - y
                for x, y in zip(xs, samples["single"], strict=True)
                if x is not None and y is not None
            ]
            out[m]["added_p50"] = pct_ms(diffs, 0.5)
    return out


# ---------------------------------------------------------------------------------------------
# the benchmark
# ---------------------------------------------------------------------------------------------


async def cluster_benchmark(opts: ClusterOptions, log: Any = print) -> dict[str, Any]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    modes: list[int | None] = ([None] if opts.single else []) + list(opts.workers)
    results: dict[str, Any] = {
        "meta": {
            "options": {k: getattr(opts, k) for k in opts.__dataclass_fields__},
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="vtc-bench-cluster-") as tmp:
        workdir = Path(tmp)
        big = ("--max-num-seqs", "4096", "--kv-cache-tokens", "100000000")
        async with (
            redis_server(binary) as redis_url,
            running(start_sim(None, "--speed", "0", *big)) as (sim,),
        ):
            redis = aioredis.Redis.from_url(redis_url)
            try:
                for rnd in range(opts.rounds if opts.duration > 0 else 0):
                    for mode in modes:
                        await redis.flushall()
                        await redis.config_resetstat()
                        url = None if mode is None else redis_url
                        config = cluster_config(sim.url, opts, url, f"bench-{rnd}")
                        gw, _ = await start_gateways(config, workdir, mode)
                        try:
                            pids = {"gateway": family(gw.pid), "sim": [sim.pid]}
                            row = await two_tenant_load(
                                gw.url,
                                concurrency=opts.concurrency,
                                max_tokens=opts.max_tokens,
                                warmup=opts.warmup,
                                duration=opts.duration,
                                pids=pids,
                                redis=redis if mode is not None else None,
                            )
                        finally:
                            await stop_process(gw.proc)
                        row = {"round": rnd, "mode": _mode(mode), **row}
                        results["runs"].append(row)
                        log(_line(row))
                if opts.ttft_requests > 0:
                    await redis.flushall()
                    results["ttft_idle_ms"] = await _ttft_phase(sim.url, redis_url, workdir, opts)
                    log(_ttft_line(results["ttft_idle_ms"]))
            finally:
                await redis.aclose()
    results["summary"] = summarize(results["runs"], opts)
    for line in _summary_lines(results["summary"]):
        log(line)
    return results


async def _ttft_phase(
    sim_url: str, redis_url: str, workdir: Path, opts: ClusterOptions
) -> dict[str, Any]:
    """Start ``single`` and each ``wN`` side by side (separate Redis prefixes) and measure."""
    async with contextlib.AsyncExitStack() as stack:
        urls: dict[str, str] = {}
        admins: dict[str, list[str]] = {}
        for mode in [None, *opts.workers]:
            config = cluster_config(sim_url, opts, None if mode is None else redis_url, "ttft")
            if mode is not None:
                config["cluster"]["prefix"] = f"{{vtc-ttft-{mode}}}"
            gw, admins[_mode(mode)] = await start_gateways(config, workdir, mode)
            stack.push_async_callback(stop_process, gw.proc)
            urls[_mode(mode)] = gw.url
        out = await paired_ttft(urls, opts)
        for mode in opts.workers:
            out[_mode(mode)].update(await worker_stats(admins[_mode(mode)]))
        return out


def _ttft_line(t: dict[str, Any]) -> str:
    parts = [f"idle TTFT ({t['requests']} requests each, alternating):"]
    for m, v in t.items():
        if isinstance(v, dict):
            part = f"{m} p50 {fmt(v['p50'])} ms"
            if "added_p50" in v:
                part += f" (+{fmt(v['added_p50'])} ms paired, target <= 0.5"
                part += f"; mean Redis round trip {fmt(v.get('redis_rtt_ms'))} ms"
                part += f"; {v.get('grants_alone', 0):.0f} granted alone"
                part += f", {v.get('round_trips', 0):.0f} round trips)"
            parts.append(part)
    return " ".join(parts[:1]) + " " + ", ".join(parts[1:])


def _mode(workers: int | None) -> str:
    return "single" if workers is None else f"w{workers}"


def _range(xs: list[float | None]) -> list[float] | None:
    ys = [x for x in xs if x is not None]
    return [min(ys), max(ys)] if ys else None


def summarize(runs: list[dict[str, Any]], opts: ClusterOptions) -> dict[str, Any]:
    """Per mode: ranges over the rounds; ratios per round (same round = same machine state)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["mode"], []).append(r)
    out: dict[str, Any] = {}
    for mode, rows in by.items():
        redis = [r.get("redis") or {} for r in rows]
        out[mode] = {
            "tokens_per_s": _range([r.get("tokens_per_s") for r in rows]),
            "share_b": _range([r.get("share_b") for r in rows]),
            "script_calls_per_token": _range([x.get("script_calls_per_token") for x in redis]),
            "commands_per_token": _range([x.get("commands_per_token") for x in redis]),
            "gateway_cpu": _range([r.get("cpu_share", {}).get("gateway") for r in rows]),
            "loadavg_1m": _range([x for r in rows for x in r.get("loadavg_1m", ())]),
        }

    def per_round(mode: str, ref: str, key: Any) -> list[float] | None:
        vals = []
        for rnd in range(opts.rounds):
            a = next((r for r in by.get(mode, []) if r["round"] == rnd), None)
            b = next((r for r in by.get(ref, []) if r["round"] == rnd), None)
            if a is not None and b is not None:
                x = key(a, b)
                if x is not None:
                    vals.append(x)
        return _range(vals)

    def ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        x, y = a.get("tokens_per_s"), b.get("tokens_per_s")
        return x / y if x is not None and y else None

    for mode in list(out):
        if mode != "w1" and mode.startswith("w"):
            out[mode]["tokens_per_s_vs_w1"] = per_round(mode, "w1", ratio)
        if mode != "single":
            out[mode]["tokens_per_s_vs_single"] = per_round(mode, "single", ratio)
    return out


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------

HEADER = (
    f"{'round':<6}{'mode':<7}{'tok/s':>8}{'b share':>8}{'scr/tok':>8}{'cmd/tok':>8}"
    f"{'ttft50':>8}{'gw cpu':>7}{'sim':>5}{'cli':>5}{'cores%':>8}{'load':>11}"
)


def _line(r: dict[str, Any]) -> str:
    redis = r.get("redis") or {}
    cpu = r["cpu_share"]
    return (
        f"{r['round']:<6}{r['mode']:<7}{r['tokens_per_s']:>8.0f}{fmt(r['share_b'], '.3f'):>8}"
        f"{fmt(redis.get('script_calls_per_token'), '.4f'):>8}"
        f"{fmt(redis.get('commands_per_token'), '.3f'):>8}"
        f"{fmt(r['ttft_ms']['p50']):>8}"
        f"{cpu['gateway']:>7.2f}{cpu['sim']:>5.2f}{cpu['client']:>5.2f}"
        f"{'/'.join(f'{v * 100:.0f}' for v in r['core_busy'].values())[:7]:>8}"
        f"{'-'.join(f'{x:.2f}' for x in r['loadavg_1m']):>11}"
        + (f"  errors={r['errors']}" if r["errors"] else "")
        + (f"  bad_counts={r['bad_token_counts']}" if r["bad_token_counts"] else "")
    )


def _rng(x: list[float] | None, spec: str) -> str:
    if x is None:
        return "-"
    return format(x[0], spec) if x[0] == x[1] else f"{x[0]:{spec}}-{x[1]:{spec}}"


def _summary_lines(s: dict[str, Any]) -> list[str]:
    lines = ["summary (ranges over rounds):"]
    for mode, v in s.items():
        parts = [
            f"  {mode:<7} tok/s {_rng(v['tokens_per_s'], '.0f')}",
            f"b share {_rng(v['share_b'], '.3f')} (fair 0.667)",
        ]
        if "tokens_per_s_vs_w1" in v:
            parts.append(f"x w1 {_rng(v['tokens_per_s_vs_w1'], '.2f')} (target >= 1.6)")
        if "tokens_per_s_vs_single" in v:
            parts.append(f"x single {_rng(v['tokens_per_s_vs_single'], '.2f')}")
        if v["script_calls_per_token"] is not None:
            parts.append(
                f"Redis scripts/token {_rng(v['script_calls_per_token'], '.4f')}"
                " (target <= 0.02 at 64 tokens a request)"
                f", commands/token {_rng(v['commands_per_token'], '.3f')}"
            )
        parts.append(f"load {_rng(v['loadavg_1m'], '.1f')}")
        lines.append(", ".join(parts))
    return lines


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ClusterOptions()
    p.add_argument("--workers", type=ints, default=d.workers, help="worker counts, e.g. 1,2")
    p.add_argument(
        "--single",
        action=argparse.BooleanOptionalAction,
        default=d.single,
        help="also run one process without cluster: (the reference)",
    )
    p.add_argument("--rounds", type=int, default=d.rounds, help="interleaved repetitions")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="clients per tenant")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument(
        "--duration",
        type=float,
        default=d.duration,
        help="measured seconds of the max-rate load per run (0: only the idle TTFT)",
    )
    p.add_argument("--warmup", type=float, default=d.warmup)
    p.add_argument(
        "--ttft-requests",
        type=int,
        default=d.ttft_requests,
        help="idle TTFT: sequential requests per mode, alternating (0: skip)",
    )
    p.add_argument("--ttft-max-tokens", type=int, default=d.ttft_max_tokens)
    p.add_argument("--sync-ms", type=float, default=d.sync_ms, help="cluster.sync_interval_s")
    p.add_argument("--out", default="bench-results/cluster.json", help="JSON results file")


def run(args: argparse.Namespace) -> int:
    opts = ClusterOptions(
        workers=tuple(args.workers),
        single=args.single,
        rounds=args.rounds,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        max_num_seqs=args.max_num_seqs,
        duration=args.duration,
        warmup=args.warmup,
        ttft_requests=args.ttft_requests,
        ttft_max_tokens=args.ttft_max_tokens,
        sync_ms=args.sync_ms,
    )
    return run_benchmark(HEADER, lambda log: cluster_benchmark(opts, log=log), args.out)
