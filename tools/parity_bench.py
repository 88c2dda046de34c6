"""``vtc-gateway bench parity``: does the gateway cost GPU throughput? The backend alone vs the
same clients through the gateway, one run.

Per context length (``--context 32768,131072``) it starts a fresh simulated backend at real
speed with vLLM's own block admission for every path::

    python -m backends.sim --profile h100-llama3-8b --max-model-len CTX --kv-admission blocks

and drives it with ``--clients`` closed-loop streaming chat clients (this process, never the
gateway's) that send what most SDK users send: no ``max_tokens``, no ``ignore_eos``, prompts of
``--prompt-words`` (100-1,500) seeded random words, the next request as soon as the previous
answer ends. The paths run one after another, each on a fresh backend: (a) ``direct``, the
clients straight at the backend; then one gateway process per ``--modes`` entry, configured with
one backend (its KV budget and context discovered, ``max_num_seqs`` equal to the backend's), 4
tenants the clients are spread over by API key, policy ``vtc``:

* ``default``: no ``kv_admission`` key (whatever the gateway's default is);
* ``reserve``, ``peak``, ...: ``kv_admission: MODE``;
* ``adaptive``: the default admission with ``adaptive: true``;
* ``cluster``, ``clusterN``: the default admission in cluster mode, one process or ``serve
  --workers N``, sharing a ``redis-server`` started for the run.

Measured after ``--warmup`` for ``--duration`` seconds: output tokens/s (streamed token chunks
arriving in the window), requests completed in the window, request latency p50/p99 and TTFT
p50 (of requests ending / first tokens arriving in the window), the backend's preemptions
(``vllm:num_preemptions_total`` delta), its waiting and running requests and KV use (sampled
every second), its engine-loop lag (``/sim/stats``, 0 = real time), CPU shares of the processes,
and each gateway path's ratios to ``direct``::

    vtc-gateway bench parity                                         # 32k: ~3.5 minutes
    vtc-gateway bench parity --context 32768,131072 --modes default,reserve,peak
    vtc-gateway bench parity --duration 10 --warmup 3 --clients 16   # quick look

A benchmark, not a test: it prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from backends.sim.costmodel import get_profile
from gateway.engines.vllm import parse_gauge_sum
from gateway.lab.metrics import quantile

from .loadgen import MODEL, count_marks, fmt, ints, start_gateway, start_sim, word_range
from .procs import cpu_share, proc_sample, run_benchmark, running, stop_process

TENANTS = 4
#: ``clusterN``: N workers sharing Redis (README, "Scaling out"), the default admission.
CLUSTER_MODE = "cluster"
#: A gateway path that sets no ``kv_admission`` key; ``adaptive`` sets ``adaptive: true``.
DEFAULT_MODE = "default"
ADAPTIVE_MODE = "adaptive"
DIRECT = "direct"

#: Words the prompts are made of (each about one token in common tokenizers).
_VOCABULARY = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea"
)
_WORDS = _VOCABULARY.split()


@dataclass(frozen=True, slots=True)
class ParityOptions:
    contexts: tuple[int, ...] = (32768,)
    modes: tuple[str, ...] = (DEFAULT_MODE, "reserve")
    clients: int = 96
    duration: float = 50.0
    warmup: float = 10.0
    profile: str = "h100-llama3-8b"
    #: the backend's (and the gateway's) ``max_num_seqs``; None: the profile's
    max_num_seqs: int | None = None
    prompt_words: tuple[int, int] = (100, 1500)
    #: the backend's median output length without ``ignore_eos`` (its log-normal draw)
    median_output_tokens: int = 128
    seed: int = 42
    direct: bool = True


# ---------------------------------------------------------------------------------------------
# clients
# ---------------------------------------------------------------------------------------------


@dataclass
class Window:
    """What the clients saw between ``start`` and ``end`` (perf_counter seconds)."""

    start: float
    end: float
    tokens: int = 0
    requests: int = 0
    output_lengths: list[int] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)

    def inside(self, t: float) -> bool:
        return self.start <= t < self.end

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def prompt_stream(seed: int, client: int, words: tuple[int, int]) -> Callable[[], str]:
    """The prompts of one client, in order: seeded by ``seed`` and the client's index, so the
    n-th request of a client is the same on every path."""
    rng = random.Random(f"{seed}:parity:{client}")
    lo, hi = words

    def next_prompt() -> str:
        return " ".join(rng.choices(_WORDS, k=rng.randint(lo, hi)))

    return next_prompt


def chat_body(prompt: str) -> bytes:
    """An SDK user's request: streaming, no ``max_tokens``, no ``ignore_eos``."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": True}
    return json.dumps(body).encode()


async def _one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], w: Window
) -> None:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            w.error(f"http_{resp.status}")
            return
        total = 0
        tail = b""
        async for data in resp.content.iter_any():
            n, tail = count_marks(data, tail)
            if not n:
                continue
            now = time.perf_counter()
            if w.inside(now):
                w.tokens += n
                if total == 0:
                    w.ttft.append(now - t0)
            total += n
    done = time.perf_counter()
    if w.inside(done):
        w.requests += 1
        w.latency.append(done - t0)
        w.output_lengths.append(total)


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    prompts: Callable[[], str],
    w: Window,
    delay: float,
) -> None:
    """One closed-loop client: the next request as soon as the previous one ends."""
    await asyncio.sleep(delay)  # staggered starts
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    while time.perf_counter() < w.end:
        try:
            await _one_request(session, url, chat_body(prompts()), headers, w)
        except (aiohttp.ClientError, TimeoutError) as exc:
            w.error(exc.__class__.__name__)


# ---------------------------------------------------------------------------------------------
# the backend's view
# ---------------------------------------------------------------------------------------------


async def _get_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url) as resp:
        return await resp.text()


@dataclass
class BackendSamples:
    waiting: list[float] = field(default_factory=list)
    running: list[float] = field(default_factory=list)
    kv_usage: list[float] = field(default_factory=list)

    def add(self, metrics: str) -> None:
        for name, into in (
            ("vllm:num_requests_waiting", self.waiting),
            ("vllm:num_requests_running", self.running),
            ("vllm:kv_cache_usage_perc", self.kv_usage),
        ):
            value = parse_gauge_sum(metrics, name)
            if value is not None:
                into.append(value)


async def _sample(
    session: aiohttp.ClientSession, sim_url: str, w: Window, into: BackendSamples
) -> None:
    """The backend's gauges once a second through the window."""
    while time.perf_counter() < w.end:
        into.add(await _get_text(session, sim_url + "/metrics"))
        await asyncio.sleep(1.0)


def _preemptions(metrics: str) -> float:
    return parse_gauge_sum(metrics, "vllm:num_preemptions_total") or 0.0


# ---------------------------------------------------------------------------------------------
# one path
# ---------------------------------------------------------------------------------------------


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _q(xs: list[float], q: float) -> float | None:
    v = quantile(xs, q)
    return None if math.isnan(v) else v


async def run_path(
    url: str, sim_url: str, opts: ParityOptions, pids: dict[str, int]
) -> dict[str, Any]:
    """Drive ``opts.clients`` closed-loop clients at ``url``; measure after the warm-up."""
    endpoint = url + "/v1/chat/completions"
    now = time.perf_counter()
    w = Window(start=now + opts.warmup, end=now + opts.warmup + opts.duration)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    conn = aiohttp.TCPConnector(limit=0)
    samples = BackendSamples()
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
        clients = [
            asyncio.create_task(
                _client(
                    session,
                    endpoint,
                    f"parity-key-{i % TENANTS}",
                    prompt_stream(opts.seed, i, opts.prompt_words),
                    w,
                    opts.warmup * i / opts.clients / 2,
                )
            )
            for i in range(opts.clients)
        ]
        await asyncio.sleep(max(0.0, w.start - time.perf_counter()))
        pre0 = _preemptions(await _get_text(session, sim_url + "/metrics"))
        async with session.post(sim_url + "/sim/stats/reset") as resp:
            await resp.read()
        before = {k: proc_sample(p) for k, p in pids.items()}
        before["clients"] = proc_sample()
        sampler = asyncio.create_task(_sample(session, sim_url, w, samples))
        await asyncio.sleep(max(0.0, w.end - time.perf_counter()))
        after = {k: proc_sample(p) for k, p in pids.items()}
        after["clients"] = proc_sample()
        pre1 = _preemptions(await _get_text(session, sim_url + "/metrics"))
        stats = json.loads(await _get_text(session, sim_url + "/sim/stats"))
        await sampler
        for task in clients:  # requests still running or queued are abandoned
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    seconds = after["clients"].wall - before["clients"].wall
    return {
        "seconds": round(seconds, 3),
        "output_tokens_per_s": w.tokens / seconds,
        "requests": w.requests,
        "requests_per_s": w.requests / seconds,
        "mean_output_tokens": _mean([float(n) for n in w.output_lengths]),
        "latency_s": {"p50": _q(w.latency, 0.5), "p99": _q(w.latency, 0.99)},
        "ttft_s": {"p50": _q(w.ttft, 0.5), "p99": _q(w.ttft, 0.99)},
        "preemptions": int(pre1 - pre0),
        "backend": {
            "waiting_mean": _mean(samples.waiting),
            "waiting_max": max(samples.waiting, default=None),
            "running_mean": _mean(samples.running),
            "running_max": max(samples.running, default=None),
            "kv_usage_mean": _mean(samples.kv_usage),
            "loop_lag_ratio": stats["loop"]["lag_ratio"],
        },
        "errors": w.errors,
        "cpu_share": {k: round(cpu_share(before[k], after[k]), 3) for k in before},
    }


def gateway_config(sim_url: str, mode: str, max_num_seqs: int) -> dict[str, Any]:
    """One backend (KV budget and context discovered), :data:`TENANTS` tenants, vtc; the
    ``kv_admission`` key only when ``mode`` names one."""
    backend: dict[str, Any] = {
        "name": "sim",
        "url": sim_url,
        "models": [MODEL],
        "max_num_seqs": max_num_seqs,
    }
    if mode == ADAPTIVE_MODE:
        backend["adaptive"] = True
    elif mode != DEFAULT_MODE:
        backend["kv_admission"] = mode
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "backends": [backend],
        "tenants": [
            {"name": f"t{i}", "api_keys": [f"parity-key-{i}"], "max_queued": 100_000}
            for i in range(TENANTS)
        ],
        "scheduler": {"policy": "vtc"},
        "limits": {"queue_timeout_s": 3600},
    }


async def _cluster_path(
    sim: Any, path: str, seqs: int, workdir: Path, opts: ParityOptions
) -> dict[str, Any]:
    """``clusterN``: ``serve --workers N`` sharing one fair order through a ``redis-server``
    started for the run (the default admission, shared)."""
    from .cluster_bench import redis_server, start_gateways

    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (Debian package redis-server)")
    workers = int(path[len(CLUSTER_MODE) :] or 1)
    async with redis_server(binary) as url:
        cfg = gateway_config(sim.url, DEFAULT_MODE, seqs)
        cfg["listen"]["admin_port"] = 0
        cfg["cluster"] = {"url": url}
        gw, _ = await start_gateways(cfg, workdir, workers if workers > 1 else None)
        try:
            return await run_path(gw.url, sim.url, opts, {"sim": sim.pid, "gateway": gw.pid})
        finally:
            await stop_process(gw.proc)


def _ratios(row: dict[str, Any], direct: dict[str, Any] | None) -> dict[str, Any] | None:
    if direct is None:
        return None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    return {
        "output_tokens_per_s": div(row["output_tokens_per_s"], direct["output_tokens_per_s"]),
        "latency_p50": div(row["latency_s"]["p50"], direct["latency_s"]["p50"]),
        "ttft_p50": div(row["ttft_s"]["p50"], direct["ttft_s"]["p50"]),
    }


async def parity_benchmark(opts: ParityOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """Every context and path of ``opts``; the JSON-ready results."""
    seqs = opts.max_num_seqs or get_profile(opts.profile).max_num_seqs
    results: dict[str, Any] = {"meta": _meta(opts, seqs), "runs": []}
    paths = ([DIRECT] if opts.direct else []) + list(opts.modes)
    with tempfile.TemporaryDirectory(prefix="vtc-parity-") as tmp:
        for context in opts.contexts:
            sim_args = (
                *("--profile", opts.profile, "--max-model-len", str(context)),
                *("--kv-admission", "blocks", "--max-num-seqs", str(seqs)),
                *("--median-output-tokens", str(opts.median_output_tokens)),
                *("--seed", str(opts.seed)),
            )
            direct = None
            for path in paths:
                async with running(start_sim(None, *sim_args)) as (sim,):
                    if path == DIRECT:
                        row = await run_path(sim.url, sim.url, opts, {"sim": sim.pid})
                    elif path.startswith(CLUSTER_MODE):
                        row = await _cluster_path(sim, path, seqs, Path(tmp), opts)
                    else:
                        cfg = gateway_config(sim.url, path, seqs)
                        async with running(start_gateway(cfg, Path(tmp), None, True, False)) as (
                            gw,
                        ):
                            row = await run_path(
                                gw.url, sim.url, opts, {"sim": sim.pid, "gateway": gw.pid}
                            )
                row = {"max_model_len": context, "path": path, **row}
                if path == DIRECT:
                    direct = row
                else:
                    row["vs_direct"] = _ratios(row, direct)
                results["runs"].append(row)
                log(row_line(row))
    return results


def _meta(opts: ParityOptions, seqs: int) -> dict[str, Any]:
    return {
        **{k: v for k, v in asdict(opts).items() if k not in ("direct", "max_num_seqs")},
        "max_num_seqs": seqs,
        "tenants": TENANTS,
        "backend": "python -m backends.sim --kv-admission blocks (real speed)",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


# ---------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------


HEADER = (
    f"{'context':>8} {'path':<9}{'out tok/s':>10}{'x dir':>7}{'done':>6}{'lat50':>7}"
    f"{'lat99':>7}{'ttft50':>7}{'preempt':>8}{'wait':>10}{'run':>6}{'kv%':>5}{'lag':>6}"
    f"{'cpu gw/sim/cli':>16}"
)


def row_line(r: dict[str, Any]) -> str:
    """One path as a table row (latencies in seconds; wait = backend waiting mean/max)."""
    b = r["backend"]
    ratio = (r.get("vs_direct") or {}).get("output_tokens_per_s")
    cpu = r["cpu_share"]
    shares = "/".join(
        f"{cpu[k] * 100:.0f}" if k in cpu else "-" for k in ("gateway", "sim", "clients")
    )
    kv = b["kv_usage_mean"]
    return (
        f"{r['max_model_len']:>8} {r['path']:<9}{r['output_tokens_per_s']:>10.0f}"
        f"{fmt(ratio if r['path'] != DIRECT else 1.0, '.2f'):>7}{r['requests']:>6}"
        f"{fmt(r['latency_s']['p50'], '.1f'):>7}{fmt(r['latency_s']['p99'], '.1f'):>7}"
        f"{fmt(r['ttft_s']['p50'], '.2f'):>7}{r['preemptions']:>8}"
        f"{fmt(b['waiting_mean'], '.1f') + '/' + fmt(b['waiting_max'], '.0f'):>10}"
        f"{fmt(b['running_mean'], '.0f'):>6}{fmt(kv * 100 if kv is not None else None, '.0f'):>5}"
        f"{fmt(b['loop_lag_ratio'], '.2f'):>6}{shares:>16}"
        + (f"  errors={r['errors']}" if r["errors"] else "")
    )


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = ParityOptions()
    p.add_argument(
        "--context",
        type=ints,
        default=d.contexts,
        help="backend --max-model-len, several separated by commas (default 32768)",
    )
    p.add_argument(
        "--modes",
        default=",".join(d.modes),
        help="gateway paths after direct: default (no kv_admission key), a kv_admission mode "
        "(reserve, peak, ...), adaptive, clusterN (N workers sharing a redis-server started "
        "for the run) (default: %(default)s)",
    )
    p.add_argument("--clients", type=int, default=d.clients, help="closed-loop chat clients")
    p.add_argument("--duration", type=float, default=d.duration, help="measured seconds per path")
    p.add_argument("--warmup", type=float, default=d.warmup, help="unmeasured seconds first")
    p.add_argument("--profile", default=d.profile, help="the backend's cost-model profile")
    p.add_argument("--max-num-seqs", type=int, help="backend and gateway (default: the profile's)")
    p.add_argument(
        "--prompt-words", type=word_range, default=d.prompt_words, help="LO-HI (default 100-1500)"
    )
    p.add_argument(
        "--median-output-tokens",
        type=int,
        default=d.median_output_tokens,
        help="the backend's median output length (log-normal, no ignore_eos)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="prompts and the backend's draws")
    p.add_argument("--direct", action=argparse.BooleanOptionalAction, default=d.direct)
    p.add_argument("--out", default="bench-results/parity.json", help="JSON results file")


def options_from_args(args: argparse.Namespace) -> ParityOptions:
    return ParityOptions(
        contexts=tuple(args.context),
        modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()),
        clients=args.clients,
        duration=args.duration,
        warmup=args.warmup,
        profile=args.profile,
        max_num_seqs=args.max_num_seqs,
        prompt_words=args.prompt_words,
        median_output_tokens=args.median_output_tokens,
        seed=args.seed,
        direct=args.direct,
    )


def run(args: argparse.Namespace) -> int:
    opts = options_from_args(args)
    if opts.clients < 1 or opts.duration <= 0 or opts.warmup < 0:
        print("--clients must be >= 1, --duration > 0, --warmup >= 0", file=sys.stderr)
        return 2
    try:
        get_profile(opts.profile)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    return run_benchmark(HEADER, lambda log: parity_benchmark(opts, log), args.out)
