"""``vtc-gateway serve --workers N``: N gateway processes on one port (``SO_REUSEPORT``).

The kernel spreads connections over the workers; they share one fair order through the
configured ``cluster:`` Redis (each is a replica named ``<replica_id>-w<i>``). Worker ``i``
serves ``/health`` and ``/metrics`` on ``listen.admin_port + i`` (a free port each when
``admin_port`` is 0), so Prometheus scrapes every worker: ``/metrics`` of one worker describes
that worker, the sum over the targets the gateway.

The parent only supervises: it forwards SIGTERM/SIGINT/SIGHUP, and when a worker exits it stops
the others and exits with an error (a process manager restarts the whole gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from typing import Any

from .config import ConfigError, GatewayConfig


def check(config: GatewayConfig | None, workers: int) -> None:
    """Raise :class:`ConfigError` unless ``config`` can run ``workers`` processes."""
    problems = []
    if workers < 1:
        problems.append(f"--workers: must be >= 1, got {workers}")
    elif workers > 1:
        if config is None or config.cluster is None:
            problems.append(
                "--workers > 1 needs a 'cluster:' section (the workers share one fair order "
                "through Redis); without it each worker would schedule on its own"
            )
        if config is None or config.listen.admin_port is None:
            problems.append(
                "--workers > 1 needs listen.admin_port (worker i serves /metrics on "
                "admin_port + i, so that every worker is scraped)"
            )
    if problems:
        raise ConfigError(problems)


def for_worker(config: GatewayConfig, index: int) -> GatewayConfig:
    """The config worker ``index`` runs with: its own replica id and admin port."""
    from .cluster import default_replica_id

    cluster = config.cluster
    if cluster is not None:
        base = cluster.replica_id or default_replica_id()
        cluster = replace(cluster, replica_id=f"{base}-w{index}")
    listen = config.listen
    if listen.admin_port:
        listen = replace(listen, admin_port=listen.admin_port + index)
    return replace(config, cluster=cluster, listen=listen)


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a ``SO_REUSEPORT`` socket so that port 0 becomes one concrete
    port every worker can bind too; kept open while the workers run."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def run(argv: list[str], host: str, port: int, workers: int) -> int:
    """Start ``workers`` copies of ``vtc-gateway serve`` (``argv`` are the global options and
    the serve options besides --workers and --port) and supervise them."""
    with reserve_port(host, port) as sock:
        port = int(sock.getsockname()[1])
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    *argv,
                    "--port",
                    str(port),
                    "--worker-index",
                    str(i),
                ],
                preexec_fn=_die_with_parent,
            )
            for i in range(workers)
        ]

        def forward(signum: int, _frame: Any) -> None:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signum)

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, forward)
        code = 0
        try:
            while procs:
                pid, status = _wait_any()
                exited = next((p for p in procs if p.pid == pid), None)
                if exited is None:
                    continue
                procs.remove(exited)
                exited.returncode = status
                if status != 0 and code == 0:
                    code = 1
                    forward(signal.SIGTERM, None)  # one worker died: stop the rest
        finally:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                p.wait()
        return code


async def watch_parent(stop: asyncio.Event, every_s: float = 1.0) -> None:
    """Set ``stop`` when the supervising parent is gone (this worker was re-parented)."""
    parent = os.getppid()
    while os.getppid() == parent and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every_s):
                await stop.wait()
    stop.set()


def _die_with_parent() -> None:
    """In the forked worker before exec: on Linux, have the kernel send SIGTERM when the
    supervising parent dies, even if the worker's event loop is too busy to notice
    (:func:`watch_parent` covers the rest)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _wait_any() -> tuple[int, int]:
    pid, status = os.wait()
    return pid, os.waitstatus_to_exitcode(status)
