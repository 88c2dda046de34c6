"""What the benchmarks share: the processes they drive and the load they send.

* the simulated backend and a gateway as subprocesses (:func:`start_sim`,
  :func:`start_gateway`, :func:`write_config`);
* streaming chat clients that count the output tokens they read (:data:`TOKEN_MARK`,
  :func:`count_marks`, :func:`request_body`, :class:`LoadWindow`, :func:`worker`), the load of
  ``bench proxy`` and ``bench cluster``;
* the small helpers of their tables and command lines (:func:`pct_ms`, :func:`fmt`,
  :func:`ints`, :func:`word_range`).

The benchmarks import these from here, not from :mod:`tools.bench`, so that module (``bench
proxy`` and the ``bench`` command, which registers every benchmark) imports them one way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .procs import Service, pin_prefix, start_service

MODEL = "sim-llama-3-8b"
PROMPT = "Write a short story about a lighthouse keeper who befriends a storm."

# ---------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------

#: Runs the gateway CLI, optionally without orjson or with uvloop (bench-only switches).
_GATEWAY_LAUNCHER = """
import os, sys
if os.environ.get("VTC_BENCH_NO_ORJSON"):
    sys.modules["orjson"] = None
if os.environ.get("VTC_BENCH_UVLOOP"):
    import asyncio, uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
from gateway.cli import main
sys.exit(main(sys.argv[1:]))
"""


async def start_sim(core: int | None, *args: str) -> Service:
    argv = [*pin_prefix(core), sys.executable, "-m", "backends.sim", "--port", "0", *args]
    return await start_service("sim", argv)


def write_config(config: dict[str, Any], workdir: Path) -> Path:
    """Write ``config`` as a new YAML file in ``workdir``."""
    fd, name = tempfile.mkstemp(prefix="gateway-", suffix=".yaml", dir=workdir)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config, f)
    return Path(name)


async def start_gateway(
    config: dict[str, Any], workdir: Path, core: int | None, orjson: bool, uvloop: bool
) -> Service:
    path = write_config(config, workdir)
    argv = [
        *pin_prefix(core),
        sys.executable,
        "-c",
        _GATEWAY_LAUNCHER,
        "--log-level",
        "WARNING",
        "serve",
        "--config",
        str(path),
        "--port",
        "0",
    ]
    env = {}
    if not orjson:
        env["VTC_BENCH_NO_ORJSON"] = "1"
    if uvloop:
        env["VTC_BENCH_UVLOOP"] = "1"
    return await start_service(f"gateway-{config['scheduler']['policy']}", argv, env)


# ---------------------------------------------------------------------------------------------
# load generator
# ---------------------------------------------------------------------------------------------

#: Every output token's chunk carries this (the sim's chat chunks; the role chunk, the usage
#: chunk and ``[DONE]`` do not), so counting it counts tokens exactly.
TOKEN_MARK = b'"delta":{"content":'
_TAIL = len(TOKEN_MARK) - 1


def count_marks(data: bytes, tail: bytes) -> tuple[int, bytes]:
    """The :data:`TOKEN_MARK` count of one read and the tail to pass with the next read
    (``b""`` first): a mark split across two reads is counted once, in the second."""
    n = data.count(TOKEN_MARK)
    if tail:
        n += (tail + data[:_TAIL]).count(TOKEN_MARK)
    return n, data[-_TAIL:]


FORMATS = ("plain", "usage", "continuous")


def request_body(max_tokens: int, fmt: str) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    if fmt == "usage":
        body["stream_options"] = {"include_usage": True}
    elif fmt == "continuous":
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return json.dumps(body).encode()


@dataclass
class LoadWindow:
    """What the :func:`worker` clients saw between ``start`` and ``end`` (perf_counter s)."""

    start: float
    end: float
    tokens: int = 0
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    bad_counts: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)


async def _stream_one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    expected: int,
    w: LoadWindow,
) -> None:
    """One streaming chat request; each read's output tokens are counted by :data:`TOKEN_MARK`
    (a mark split across two reads is counted once, in the second)."""
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            w.errors[f"http_{resp.status}"] = w.errors.get(f"http_{resp.status}", 0) + 1
            return
        last = 0.0
        total = 0
        tail = b""
        async for data in resp.content.iter_any():
            now = time.perf_counter()
            n, tail = count_marks(data, tail)
            if not n:
                continue
            if w.start <= now < w.end:  # events are sampled by when they happen
                w.tokens += n
                if total == 0:
                    w.ttft.append(now - t0)
                else:
                    w.itl.extend([(now - last) / n] * n)
            last = now
            total += n
    if w.start <= time.perf_counter() < w.end:
        w.requests += 1
    if total != expected:
        w.bad_counts += 1


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    expected: int,
    w: LoadWindow,
    budget: list[int],
    delay: float,
) -> None:
    """One looping client: ``body`` again and again until ``w.end`` or the shared request
    ``budget`` (a one-item list) runs out, each answer expected to hold ``expected`` tokens."""
    await asyncio.sleep(delay)  # staggered starts, so streams do not move in lockstep
    while time.perf_counter() < w.end and budget[0] > 0:
        budget[0] -= 1
        try:
            await _stream_one(session, url, body, headers, expected, w)
        except (aiohttp.ClientError, TimeoutError) as exc:
            kind = exc.__class__.__name__
            w.errors[kind] = w.errors.get(kind, 0) + 1


# ---------------------------------------------------------------------------------------------
# tables and command lines
# ---------------------------------------------------------------------------------------------


def pct_ms(xs: list[float], q: float) -> float | None:
    """The ``q`` quantile of ``xs`` (seconds) in milliseconds; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000.0


def fmt(x: float | None, spec: str = ".2f") -> str:
    """``x`` formatted by ``spec``; ``-`` for None."""
    return "-" if x is None else format(x, spec)


def ints(s: str) -> tuple[int, ...]:
    """An argument ``1,64,256`` as integers."""
    return tuple(int(x) for x in s.split(",") if x.strip())


def word_range(s: str) -> tuple[int, int]:
    """An argument ``LO-HI`` (1 <= LO <= HI), a range of prompt words."""
    lo, sep, hi = s.partition("-")
    if not sep or not lo.isdigit() or not hi.isdigit() or not 1 <= int(lo) <= int(hi):
        raise argparse.ArgumentTypeError(f"expected LO-HI words, got {s!r}")
    return int(lo), int(hi)
