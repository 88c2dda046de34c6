"""Processes the tools start and watch: the simulated backend and gateways as subprocesses.

:func:`start_service` runs a command that prints ``listening on URL`` and returns once it
does; :func:`stop_process` ends it (SIGTERM, then SIGKILL); :func:`proc_sample` and
:func:`cpu_times` read CPU and memory from ``/proc`` (Linux); :func:`free_port` picks a port for
a program that cannot listen on port 0 and report it (nginx, redis-server, vLLM). Standard
library only, so the tests import it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float  # utime + stime
    rss_kib: int
    hwm_kib: int
    wall: float


def proc_sample(pid: int | None = None) -> ProcSample:
    """CPU seconds and memory of ``pid`` (this process when None), read from ``/proc``."""
    wall = time.monotonic()
    if pid is None:
        t = os.times()
        cpu = t.user + t.system
        pid_s = "self"
    else:
        pid_s = str(pid)
        with open(f"/proc/{pid_s}/stat") as f:
            # fields after the ")" that ends the command name; utime, stime are 14 and 15
            rest = f.read().rsplit(")", 1)[1].split()
        cpu = (int(rest[11]) + int(rest[12])) / _CLK_TCK
    rss = hwm = 0
    with open(f"/proc/{pid_s}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return ProcSample(cpu, rss, hwm, wall)


def cpu_share(a: ProcSample, b: ProcSample) -> float:
    """The CPU share (1.0 = one core) of a process between two :func:`proc_sample` readings."""
    return (b.cpu_s - a.cpu_s) / max(b.wall - a.wall, 1e-9)


def cpu_times() -> dict[str, tuple[float, float]]:
    """Per core (``cpu0``, ...): (busy, total) jiffies from ``/proc/stat``; busy includes the
    softirq time of loopback networking, which no process is charged for."""
    out: dict[str, tuple[float, float]] = {}
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *vals = line.split()
                v = [float(x) for x in vals[:8]]
                idle = v[3] + v[4]  # idle + iowait
                out[name] = (sum(v) - idle, sum(v))
    return out


def busy_shares(
    a: dict[str, tuple[float, float]], b: dict[str, tuple[float, float]]
) -> dict[str, float]:
    """Per core, the busy share between two :func:`cpu_times` readings ``a`` and ``b``."""
    return {k: round((b[k][0] - a[k][0]) / max(b[k][1] - a[k][1], 1e-9), 3) for k in b if k in a}


@dataclass
class Service:
    """A started subprocess and the URL it listens on."""

    name: str
    proc: asyncio.subprocess.Process
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    """A loopback port free now (another process may take it before it is bound again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pin_prefix(core: int | None) -> list[str]:
    """The ``taskset`` prefix that pins a command to ``core`` (nothing when None)."""
    return ["taskset", "-c", str(core)] if core is not None else []


#: Longest wait for a started service to print its ``listening on`` line.
STARTUP_S = 60.0


async def start_service(name: str, argv: list[str], env: dict[str, str] | None = None) -> Service:
    """Run ``argv`` and wait for its ``listening on URL`` line; stop it if that never comes."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    assert proc.stdout is not None
    try:
        while True:
            line = (await asyncio.wait_for(proc.stdout.readline(), STARTUP_S)).decode()
            if not line:
                raise RuntimeError(f"{name} exited before listening")
            if line.startswith("listening on "):
                return Service(name, proc, line.split()[-1].rstrip("/"))
    except BaseException:
        await stop_process(proc)
        raise


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after 10 s; returns once the process is gone."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def running(*starting: Awaitable[Service]) -> AsyncIterator[list[Service]]:
    """Start services in order (``start_service(...)`` awaitables); stop every started one on
    exit, also when a later one fails to start."""
    services: list[Service] = []
    try:
        for start in starting:
            services.append(await start)
        yield services
    finally:
        for service in services:
            await stop_process(service.proc)


def run_benchmark(
    header: str, bench: Callable[[Callable[[str], None]], Coroutine[Any, Any, Any]], out: str
) -> int:
    """Print ``header``, run ``bench(log)`` (which prints its rows through ``log``), write its
    results to ``out`` as JSON; the exit status of a bench command."""
    print(header, flush=True)
    results = asyncio.run(bench(lambda s: print(s, flush=True)))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")
    return 0
