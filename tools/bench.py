"""``vtc-gateway bench proxy``: the gateway side by side with a direct connection to the backend.

One invocation starts the simulated backend (``python -m backends.sim --speed 0``: no step
delays, tokens as fast as it can write) and one gateway process per policy (``vtc``, ``fcfs``),
each from a generated config whose limits never throttle, then drives the same streaming chat
load (a) straight at the simulator and (b, c) through each gateway, interleaved level by level::

    vtc-gateway bench proxy                                  # full run, ~4 minutes
    vtc-gateway bench proxy --concurrency 1,64 --duration 5  # quick subset

With ``--pin`` (default on 2+ cores) the gateway runs on core 0 and the simulator and the load
generator (this process) on core 1, so the gateway/direct ratio shows whether the gateway keeps
up, not how processes share a core. Per path it reports requests/s, streamed tokens/s, TTFT and
inter-token latency p50/p99, the gateway's CPU-seconds per million tokens (utime + stime from
``/proc/PID/stat``) and RSS (``VmRSS``), the CPU share of every process (so a saturated load
generator is visible), and the ratios gateway/direct.

Two checks run after the table (skip them with ``--no-work-conservation`` / ``--no-memory``):

* work conservation: a saturated load through a real-speed simulator (``--wc-profile``,
  ``max_num_seqs`` 64 for the simulator and the gateway), gateway tokens/s vs direct;
* memory: ``--queued`` requests held in the queue in front of a one-slot backend, gateway RSS
  delta per queued request.

Latency samples: TTFT is from sending the request to the first read holding an output token;
inter-token latency is the gap between reads holding tokens, divided evenly over the tokens of
the read. A benchmark, not a test: it prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .loadgen import (
    FORMATS,
    MODEL,
    LoadWindow,
    fmt,
    ints,
    pct_ms,
    request_body,
    start_gateway,
    start_sim,
    worker,
)
from .procs import (
    Service,
    busy_shares,
    cpu_share,
    cpu_times,
    free_port,
    pin_prefix,
    proc_sample,
    run_benchmark,
    running,
    stop_process,
)

TENANTS = 8

# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------


def gateway_config(
    sim_url: str, policy: str, max_num_seqs: int, max_kv_tokens: int = 100_000_000
) -> dict[str, Any]:
    """A config for the benchmark: one backend, :data:`TENANTS` tenants, limits that never
    throttle beyond ``max_num_seqs``."""
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "backends": [
            {
                "name": "sim",
                "url": sim_url,
                "models": [MODEL],
                "max_num_seqs": max_num_seqs,
                "max_kv_tokens": max_kv_tokens,
                "max_model_len": 8192,
            }
        ],
        "tenants": [
            {"name": f"t{i}", "api_keys": [f"bench-key-{i}"], "max_queued": 1_000_000}
            for i in range(TENANTS)
        ],
        "scheduler": {"policy": policy},
        "limits": {"queue_timeout_s": 3600, "health_interval_s": 5},
    }


#: nginx as a reference proxy: one process (``master_process off``, so its CPU time is the
#: whole proxy's), streaming (``proxy_buffering off``), HTTP/1.1 keep-alive upstream.
NGINX_CONF = """\
worker_processes 1;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    upstream backend {{
        server {upstream};
        keepalive 1024;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""

#: Unprivileged account nginx runs as when the benchmark runs as root.
NGINX_USER = "nobody"


def nginx_binary() -> str | None:
    """The nginx executable (``PATH``, then ``/usr/sbin``), or None when not installed."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


async def _wait_listening(proc: asyncio.subprocess.Process, port: int, within_s: float) -> bool:
    """Poll ``port`` until it accepts a connection (True) or ``proc`` exits (False)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return True
    return False


@contextlib.asynccontextmanager
async def running_nginx(
    upstream_url: str, core: int | None, binary: str
) -> AsyncIterator[tuple[Service, Path]]:
    """nginx on a free loopback port in front of ``upstream_url``, its prefix, config, pid and
    logs in a temp dir of its own; stopped and the dir removed on exit, whatever happens."""
    upstream = upstream_url.split("://", 1)[1].rstrip("/")
    prefix = Path(tempfile.mkdtemp(prefix="vtc-bench-nginx-"))
    proc = None
    try:
        kw: dict[str, Any] = {}
        if os.geteuid() == 0:  # never run the reference proxy as root
            account = pwd.getpwnam(NGINX_USER)
            kw = {"user": account.pw_uid, "group": account.pw_gid}
            os.chown(prefix, account.pw_uid, account.pw_gid)
        for _ in range(3):  # the free port may be taken between picking and binding it
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(NGINX_CONF.format(d=prefix, upstream=upstream, port=port))
            argv = [*pin_prefix(core), binary, "-p", str(prefix), "-c", str(conf)]
            argv += ["-e", str(prefix / "error.log")]
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,  # -e: startup errors go to error.log too
                **kw,
            )
            if await _wait_listening(proc, port, 10.0):
                break
            await stop_process(proc)
        else:
            log_path = prefix / "error.log"
            err_text = log_path.read_text(errors="replace")[-500:] if log_path.exists() else ""
            raise RuntimeError(f"nginx did not start: {err_text}")
        yield Service("nginx", proc, f"http://127.0.0.1:{port}"), prefix
    finally:
        if proc is not None:
            await stop_process(proc)
        shutil.rmtree(prefix, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# load generator
# ---------------------------------------------------------------------------------------------


async def run_load(
    url: str,
    *,
    concurrency: int,
    max_tokens: int,
    warmup: float,
    duration: float,
    fmt: str = "plain",
    max_requests: int | None = None,
    gateway_pid: int | None = None,
    sim_pid: int | None = None,
) -> dict[str, Any]:
    """Drive ``concurrency`` looping streaming clients; measure the window after ``warmup``."""
    body = request_body(max_tokens, fmt)
    endpoint = url + "/v1/chat/completions"
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    conn = aiohttp.TCPConnector(limit=0, force_close=False)
    now = time.perf_counter()
    w = LoadWindow(start=now + warmup, end=now + warmup + duration)
    budget = [max_requests if max_requests is not None else 1 << 62]
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        workers = [
            asyncio.create_task(
                worker(
                    session,
                    endpoint,
                    body,
                    {
                        "Authorization": f"Bearer bench-key-{i % TENANTS}",
                        "Content-Type": "application/json",
                    },
                    max_tokens,
                    w,
                    budget,
                    warmup * i / concurrency / 2,
                )
            )
            for i in range(concurrency)
        ]
        await asyncio.sleep(max(0.0, w.start - time.perf_counter()))
        pids = {"gateway": gateway_pid, "sim": sim_pid}
        before = {k: proc_sample(p) for k, p in pids.items() if p is not None}
        before["client"] = proc_sample()
        cores0 = cpu_times()
        done, _ = await asyncio.wait(workers, timeout=max(0.0, w.end - time.perf_counter()))
        after = {k: proc_sample(p) for k, p in pids.items() if p is not None}
        after["client"] = proc_sample()
        cores = busy_shares(cores0, cpu_times())
        seconds = after["client"].wall - before["client"].wall
        if len(done) == len(workers):  # request budget ran out before the window ended
            w.end = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=max(60.0, 2 * duration))
    seconds = max(min(seconds, w.end - w.start), 1e-9)
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "format": fmt,
        "seconds": round(seconds, 3),
        "requests": w.requests,
        "requests_per_s": w.requests / seconds,
        "tokens_per_s": w.tokens / seconds,
        "ttft_ms": {"p50": pct_ms(w.ttft, 0.5), "p99": pct_ms(w.ttft, 0.99), "n": len(w.ttft)},
        "itl_ms": {"p50": pct_ms(w.itl, 0.5), "p99": pct_ms(w.itl, 0.99), "n": len(w.itl)},
        "errors": w.errors,
        "bad_token_counts": w.bad_counts,
        "cpu_share": {k: round(cpu_share(before[k], after[k]), 3) for k in before},
        "core_busy": cores,
    }
    if "gateway" in before:
        g0, g1 = before["gateway"], after["gateway"]
        cpu = g1.cpu_s - g0.cpu_s
        out["gateway"] = {
            "cpu_s": round(cpu, 3),
            "cpu_s_per_mtok": cpu / w.tokens * 1e6 if w.tokens else None,
            "rss_kib": g1.rss_kib,
            "hwm_kib": g1.hwm_kib,
        }
    return out


# ---------------------------------------------------------------------------------------------
# the proxy benchmark
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProxyOptions:
    concurrency: tuple[int, ...] = (1, 64, 256, 1024)
    max_tokens: int = 128
    first_token_concurrency: tuple[int, ...] = (1, 64)
    policies: tuple[str, ...] = ("vtc", "fcfs")
    duration: float = 8.0
    warmup: float = 2.0
    max_requests: int | None = None
    fmt: str = "plain"
    pin: bool = True
    orjson: bool = True
    uvloop: bool = False
    direct: bool = True
    work_conservation: bool = True
    wc_profile: str = "h100-llama3-8b"
    wc_concurrency: int = 128
    wc_duration: float = 20.0
    memory: bool = True
    queued: int = 10_000
    #: nginx as a reference path (skipped with a message when nginx is not installed)
    nginx: bool = True
    #: simulator speed of the proxy table: 0 = max rate (no step delays); > 0 = paced by the
    #: real-speed engine schedule of ``paced_profile`` scaled by this factor
    speed: float = 0.0
    paced_profile: str = "h100-llama3-8b"


def _cores(pin: bool) -> tuple[int | None, int | None]:
    """(gateway core, simulator + load generator core), or Nones when not pinning."""
    if not pin or shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def _cpu_per_token(row: dict[str, Any]) -> float | None:
    """The proxy process's CPU-µs per streamed token (None on the direct path)."""
    return (row.get("gateway") or {}).get("cpu_s_per_mtok")


def _ratios(row: dict[str, Any], direct: dict[str, Any] | None) -> dict[str, Any] | None:
    """``row`` against a reference row (direct or nginx): ratios and added latencies."""
    if direct is None:
        return None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    def sub(a: float | None, b: float | None) -> float | None:
        return a - b if a is not None and b is not None else None

    return {
        "cpu_per_token": div(_cpu_per_token(row), _cpu_per_token(direct)),
        "tokens_per_s": div(row["tokens_per_s"], direct["tokens_per_s"]),
        "requests_per_s": div(row["requests_per_s"], direct["requests_per_s"]),
        "ttft_p50_added_ms": sub(row["ttft_ms"]["p50"], direct["ttft_ms"]["p50"]),
        "ttft_p99_added_ms": sub(row["ttft_ms"]["p99"], direct["ttft_ms"]["p99"]),
        "itl_p50_added_ms": sub(row["itl_ms"]["p50"], direct["itl_ms"]["p50"]),
        "itl_p99_added_ms": sub(row["itl_ms"]["p99"], direct["itl_ms"]["p99"]),
    }


async def proxy_benchmark(opts: ProxyOptions, log: Any = print) -> dict[str, Any]:
    """Run everything ``opts`` asks for; return the JSON-ready results."""
    gw_core, load_core = _cores(opts.pin)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    scenarios = [(c, opts.max_tokens) for c in opts.concurrency]
    scenarios += [(c, 1) for c in opts.first_token_concurrency]
    results: dict[str, Any] = {"meta": _meta(opts, gw_core, load_core), "proxy": []}
    nginx = nginx_binary() if opts.nginx else None
    if opts.nginx and nginx is None:
        log("nginx not installed: skipping the nginx reference path (apt-get install nginx)")
    with tempfile.TemporaryDirectory(prefix="vtc-bench-") as tmp:
        workdir = Path(tmp)
        async with contextlib.AsyncExitStack() as st:
            big = ("--max-num-seqs", "4096", "--kv-cache-tokens", "100000000")
            pace = ("--profile", opts.paced_profile) if opts.speed > 0 else ()
            async with running(start_sim(load_core, "--speed", str(opts.speed), *pace, *big)) as (
                sim,
            ):
                ngx = None
                if nginx is not None:
                    ngx, prefix = await st.enter_async_context(
                        running_nginx(sim.url, gw_core, nginx)
                    )
                    results["meta"]["nginx"] = {
                        "binary": nginx,
                        "pid": ngx.pid,
                        "prefix": str(prefix),
                        "version": _nginx_version(nginx),
                    }
                gws = [
                    await start_gateway(
                        gateway_config(sim.url, p, 4096), workdir, gw_core, opts.orjson, opts.uvloop
                    )
                    for p in opts.policies
                ]
                try:
                    for conc, mt in scenarios:
                        # a stream takes ~conc/256 times longer at high concurrency: let several
                        # generations of requests start and finish inside the window
                        scale = max(1.0, conc / 256) if mt > 1 else 1.0
                        direct = ref = None
                        paths: list[tuple[str, str, int | None]] = []
                        if opts.direct:
                            paths.append(("direct", sim.url, None))
                        if ngx is not None:
                            paths.append(("nginx", ngx.url, ngx.pid))
                        paths += [
                            (p, g.url, g.pid) for p, g in zip(opts.policies, gws, strict=True)
                        ]
                        for name, url, gpid in paths:
                            row = await run_load(
                                url,
                                concurrency=conc,
                                max_tokens=mt,
                                warmup=opts.warmup * scale,
                                duration=opts.duration * scale,
                                fmt=opts.fmt,
                                max_requests=opts.max_requests,
                                gateway_pid=gpid,
                                sim_pid=sim.pid,
                            )
                            row = {
                                "scenario": "first_token" if mt == 1 else "stream",
                                "path": name,
                                **row,
                            }
                            if name == "direct":
                                direct = row
                            else:
                                row["vs_direct"] = _ratios(row, direct)
                            if name == "nginx":
                                ref = row
                            elif name != "direct":
                                row["vs_nginx"] = _ratios(row, ref)
                            results["proxy"].append(row)
                            log(_row_line(row))
                finally:
                    for g in gws:
                        await stop_process(g.proc)
                    await st.aclose()  # nginx stops before the simulator
        if opts.work_conservation:
            results["work_conservation"] = await work_conservation(
                opts, workdir, gw_core, load_core
            )
            log(_wc_line(results["work_conservation"]))
        if opts.memory:
            results["memory"] = await memory_check(opts, workdir, gw_core, load_core)
            log(_mem_line(results["memory"]))
    return results


async def work_conservation(
    opts: ProxyOptions, workdir: Path, gw_core: int | None, load_core: int | None
) -> dict[str, Any]:
    """Saturated load at real speed: gateway (vtc) tokens/s vs straight to the simulator."""
    sim_args = ("--speed", "1", "--profile", opts.wc_profile, "--max-num-seqs", "64")
    out: dict[str, Any] = {
        "profile": opts.wc_profile,
        "max_num_seqs": 64,
        "concurrency": opts.wc_concurrency,
        "max_tokens": opts.max_tokens,
    }
    warm = min(5.0, opts.wc_duration / 4)
    async with running(start_sim(load_core, *sim_args)) as (sim,):
        out["direct"] = await run_load(
            sim.url,
            concurrency=opts.wc_concurrency,
            max_tokens=opts.max_tokens,
            warmup=warm,
            duration=opts.wc_duration,
            sim_pid=sim.pid,
        )
    async with running(start_sim(load_core, *sim_args)) as (sim,):
        cfg = gateway_config(sim.url, "vtc", 64)
        async with running(start_gateway(cfg, workdir, gw_core, opts.orjson, opts.uvloop)) as (gw,):
            out["gateway"] = await run_load(
                gw.url,
                concurrency=opts.wc_concurrency,
                max_tokens=opts.max_tokens,
                warmup=warm,
                duration=opts.wc_duration,
                gateway_pid=gw.pid,
                sim_pid=sim.pid,
            )
    d, g = out["direct"]["tokens_per_s"], out["gateway"]["tokens_per_s"]
    out["ratio"] = g / d if d else None
    out["target"] = 0.98
    return out


async def memory_check(
    opts: ProxyOptions, workdir: Path, gw_core: int | None, load_core: int | None
) -> dict[str, Any]:
    """Hold ``opts.queued`` requests in the gateway's queue; RSS delta per queued request."""
    n = opts.queued
    # one slot, in slow motion, so the queue drains by at most a handful during the check
    sim_args = ("--speed", "0.02", "--max-num-seqs", "1")
    async with running(start_sim(load_core, *sim_args)) as (sim,):
        cfg = gateway_config(sim.url, "vtc", 1)
        async with running(start_gateway(cfg, workdir, gw_core, opts.orjson, opts.uvloop)) as (gw,):
            body = request_body(opts.max_tokens, "plain")
            conn = aiohttp.TCPConnector(limit=0)
            timeout = aiohttp.ClientTimeout(total=None)
            async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

                async def one(i: int) -> None:
                    hdr = {
                        "Authorization": f"Bearer bench-key-{i % TENANTS}",
                        "Content-Type": "application/json",
                    }
                    async with session.post(
                        gw.url + "/v1/chat/completions", data=body, headers=hdr
                    ) as resp:
                        await resp.read()

                async def queued() -> int:
                    async with session.get(gw.url + "/health") as resp:
                        return int((await resp.json())["queued"])

                # warm the gateway (imports, first request paths) before the baseline
                warm = [asyncio.create_task(one(i)) for i in range(4)]
                await asyncio.sleep(1.0)
                base = proc_sample(gw.pid)
                tasks = list(warm)
                t0 = time.monotonic()
                for start in range(0, n, 500):
                    tasks += [
                        asyncio.create_task(one(i)) for i in range(start, min(n, start + 500))
                    ]
                    await asyncio.sleep(0.05)
                deadline = time.monotonic() + 120
                q = await queued()
                while q < n * 0.99 and time.monotonic() < deadline:
                    await asyncio.sleep(0.5)
                    q = await queued()
                await asyncio.sleep(1.0)
                q = await queued()
                full = proc_sample(gw.pid)
                ramp = time.monotonic() - t0
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
    delta = (full.rss_kib - base.rss_kib) * 1024
    return {
        "requested": n,
        "queued": q,
        "rss_before_kib": base.rss_kib,
        "rss_queued_kib": full.rss_kib,
        "bytes_per_queued_request": delta / q if q else None,
        "target_bytes": 20 * 1024,
        "ramp_s": round(ramp, 2),
        "note": "includes the client connection, the aiohttp request and the handler task",
    }


def _nginx_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, timeout=10)
    return (out.stderr or out.stdout).strip().rsplit("/", 1)[-1]


def _meta(opts: ProxyOptions, gw_core: int | None, load_core: int | None) -> dict[str, Any]:
    def has(mod: str) -> bool:
        try:
            __import__(mod)
        except ImportError:
            return False
        return True

    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "aiohttp": aiohttp.__version__,
        "orjson": opts.orjson and has("orjson"),
        "uvloop": opts.uvloop and has("uvloop"),
        "pinned": {"gateway": gw_core, "sim_and_load": load_core},
        "format": opts.fmt,
        "speed": opts.speed,
        "paced_profile": opts.paced_profile if opts.speed > 0 else None,
        "duration_s": opts.duration,
        "warmup_s": opts.warmup,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


HEADER = (
    f"{'scenario':<12}{'conc':>5} {'path':<7}{'req/s':>8}{'tok/s':>9}"
    f"{'ttft50':>8}{'ttft99':>8}{'itl50':>7}{'itl99':>8}"
    f"{'cpu/Mtok':>9}{'rssMiB':>7}{'gw%':>5}{'sim%':>5}{'cli%':>5}{'core%':>8}"
    f"{'x dir':>6}{'+ttft':>9}{'cpu x ngx':>10}{'+ttft ngx':>10}"
)


def _row_line(r: dict[str, Any]) -> str:
    gw = r.get("gateway") or {}
    share = r["cpu_share"]
    ratio = r.get("vs_direct") or {}
    ngx = r.get("vs_nginx") or {}
    rss = gw.get("rss_kib")
    return (
        f"{r['scenario']:<12}{r['concurrency']:>5} {r['path']:<7}"
        f"{r['requests_per_s']:>8.0f}{r['tokens_per_s']:>9.0f}"
        f"{fmt(r['ttft_ms']['p50']):>8}{fmt(r['ttft_ms']['p99']):>8}"
        f"{fmt(r['itl_ms']['p50']):>7}{fmt(r['itl_ms']['p99']):>8}"
        f"{fmt(gw.get('cpu_s_per_mtok'), '.1f'):>9}"
        f"{fmt(rss / 1024 if rss else None, '.0f'):>7}"
        f"{fmt(share.get('gateway', 0) * 100 if 'gateway' in share else None, '.0f'):>5}"
        f"{share.get('sim', 0) * 100:>5.0f}{share['client'] * 100:>5.0f}"
        f"{'/'.join(f'{v * 100:.0f}' for v in r.get('core_busy', {}).values())[:7]:>8}"
        f"{fmt(ratio.get('tokens_per_s')):>6}{fmt(ratio.get('ttft_p50_added_ms')):>9}"
        f"{fmt(ngx.get('cpu_per_token')):>10}{fmt(ngx.get('ttft_p50_added_ms')):>10}"
        + (f"  errors={r['errors']}" if r["errors"] else "")
        + (f"  bad_counts={r['bad_token_counts']}" if r["bad_token_counts"] else "")
    )


def _wc_line(wc: dict[str, Any]) -> str:
    return (
        f"work conservation ({wc['profile']}, max_num_seqs 64, {wc['concurrency']} streams): "
        f"direct {wc['direct']['tokens_per_s']:.0f} tok/s, gateway "
        f"{wc['gateway']['tokens_per_s']:.0f} tok/s, ratio {fmt(wc['ratio'], '.3f')} "
        f"(target >= {wc['target']})"
    )


def _mem_line(m: dict[str, Any]) -> str:
    per = m["bytes_per_queued_request"]
    return (
        f"memory: {m['queued']} queued, RSS {m['rss_before_kib'] / 1024:.0f} -> "
        f"{m['rss_queued_kib'] / 1024:.0f} MiB, {fmt(per / 1024 if per else None, '.1f')} KiB "
        f"per queued request (target <= 20 KiB)"
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add ``bench`` to the ``vtc-gateway`` CLI: ``proxy`` (this module) and the benchmarks of
    the other modules (``scheduler``, ``cluster``, ``parity``, ``live-diff``, ``quota``)."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench_command", required=True)
    p = bsub.add_parser(
        "proxy",
        help="gateway vs direct against the simulator: throughput, latency, CPU, memory",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    d = ProxyOptions()
    p.add_argument("--concurrency", type=ints, default=d.concurrency, help="e.g. 1,64,256,1024")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument(
        "--first-token",
        type=ints,
        default=d.first_token_concurrency,
        help="concurrency levels of the max_tokens=1 scenario ('' for none)",
    )
    p.add_argument("--policies", default=",".join(d.policies), help="gateways to compare")
    p.add_argument("--duration", type=float, default=d.duration, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=d.warmup, help="unmeasured seconds per run")
    p.add_argument("--max-requests", type=int, default=None, help="request budget per run")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=d.fmt,
        help="what the client asks for: plain stream, include_usage, or continuous usage "
        "(the gateway's pass-through case)",
    )
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=d.pin)
    p.add_argument(
        "--orjson",
        action=argparse.BooleanOptionalAction,
        default=d.orjson,
        help="let the gateway use orjson when installed",
    )
    p.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=d.uvloop,
        help="run the gateway on uvloop",
    )
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=d.direct)
    p.add_argument(
        "--work-conservation", action=argparse.BooleanOptionalAction, default=d.work_conservation
    )
    p.add_argument("--wc-profile", default=d.wc_profile)
    p.add_argument("--wc-concurrency", type=int, default=d.wc_concurrency)
    p.add_argument("--wc-duration", type=float, default=d.wc_duration)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=d.memory)
    p.add_argument(
        "--queued", type=int, default=d.queued, help="requests held for the memory check"
    )
    p.add_argument("--nginx", action=argparse.BooleanOptionalAction, default=d.nginx)
    p.add_argument(
        "--speed",
        type=float,
        default=d.speed,
        help="simulator speed: 0 = max rate; > 0 = paced by the --paced-profile engine schedule "
        "(0.4 ~ 20 ms/token at 64 streams)",
    )
    p.add_argument("--paced-profile", default=d.paced_profile)
    p.add_argument("--out", default="bench-results/proxy.json", help="JSON results file")
    p.set_defaults(func=_cmd_proxy)

    from . import cluster_bench, live_diff, parity_bench, quota_bench, scheduler_bench

    for name, module, help_ in (
        (
            "scheduler",
            scheduler_bench,
            "scheduler micro-benchmark: enqueue, pick, charge at growing tenant counts",
        ),
        (
            "cluster",
            cluster_bench,
            "serve --workers N sharing Redis vs one process: tokens/s, fairness, Redis ops",
        ),
        (
            "parity",
            parity_bench,
            "backend alone vs through the gateway, SDK-style clients: throughput, latency",
        ),
        (
            "live-diff",
            live_diff,
            "closed-loop scenarios in the lab and live: shares vs weights, lab vs live",
        ),
        ("quota", quota_bench, "shares of a hosted quota"),
    ):
        sub = bsub.add_parser(name, help=help_, description=(module.__doc__ or "").split("\n\n")[0])
        module.add_arguments(sub)
        sub.set_defaults(func=module.run)


def options_from_args(args: argparse.Namespace) -> ProxyOptions:
    return ProxyOptions(
        concurrency=tuple(args.concurrency),
        max_tokens=args.max_tokens,
        first_token_concurrency=tuple(args.first_token),
        policies=tuple(p for p in args.policies.split(",") if p),
        duration=args.duration,
        warmup=args.warmup,
        max_requests=args.max_requests,
        fmt=args.format,
        pin=args.pin,
        orjson=args.orjson,
        uvloop=args.uvloop,
        direct=args.direct,
        work_conservation=args.work_conservation,
        wc_profile=args.wc_profile,
        wc_concurrency=args.wc_concurrency,
        wc_duration=args.wc_duration,
        memory=args.memory,
        queued=args.queued,
        nginx=args.nginx,
        speed=args.speed,
        paced_profile=args.paced_profile,
    )


def _cmd_proxy(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    return run_benchmark(HEADER, lambda log: proxy_benchmark(opts, log=log), args.out)
