"""Gateway processes sharing one Redis and one simulated backend, through live HTTP: a replica
killed with SIGKILL, Redis stopped and restarted empty under load, ``--workers``.

Outcomes asserted: every request of a surviving replica succeeds, the shared ledger ends with
nothing booked (no slot leaked, none negative), counters survive an empty restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import asyncio as aioredis

from backends.sim.config import SimConfig
from backends.sim.server import SimServer

from ..gateway.conftest import MODEL, gateway_output, tenants, url_of, wait_for
from .conftest import RedisServer

UNLIMITED = httpx.Limits(max_connections=None, max_keepalive_connections=None)


#: the faults' tenant configs: flat, and a tree with a batch tier (a under an interactive
#: organisation, b under a batch one); the groups' counters are shared like the tenants'
TENANTS: dict[str, list[dict[str, Any]]] = {
    "flat": tenants(("a", 1), ("b", 1)),
    "tree": [
        {"name": "org-x", "weight": 2, "tenants": tenants(("a", 1))},
        {"name": "org-y", "tier": "batch", "tenants": tenants(("b", 1))},
    ],
}
NODES = {"flat": {b"a", b"b"}, "tree": {b"a", b"b", b"org-x", b"org-y"}}


def write_config(
    path: Path, sim_url: str, redis: RedisServer, tree: str = "flat", **cluster: Any
) -> Path:
    raw = {
        "backends": [{"name": "sim", "url": sim_url, "max_num_seqs": 2, "max_kv_tokens": 4096}],
        "tenants": TENANTS[tree],
        "limits": {"health_interval_s": 60},
        "cluster": {"url": redis.url, "lease_s": 1.0, **cluster},
    }
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def gateway(
    config: Path, *extra: str, lines: int = 1
) -> contextlib.AbstractAsyncContextManager[tuple[asyncio.subprocess.Process, list[str]]]:
    """``vtc-gateway serve --port 0 --config CONFIG EXTRA``; yields the process and the first
    ``lines`` lines it printed (``listening on ...``); SIGTERM after (workers stop too)."""
    return gateway_output("--config", str(config), "--no-watch", *extra, lines=lines, graceful=True)


async def send(http: httpx.AsyncClient, url: str, tenant: str) -> int:
    body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 16, "ignore_eos": True}
    try:
        resp = await http.post(
            f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer key-{tenant}"}
        )
    except httpx.TransportError:
        return 0  # the replica it went to was killed
    return resp.status_code


async def ledger(redis: RedisServer) -> dict[bytes, bytes]:
    raw = aioredis.Redis.from_url(redis.url)
    try:
        return await raw.hgetall("{vtc}:be:sim")
    finally:
        await raw.aclose()


async def only_leases(http: httpx.AsyncClient, url: str, redis: RedisServer) -> bool:
    """Whether the shared ledger books exactly the slots the replica at ``url`` keeps leased
    (``vtc_cluster_slots_leased``): nothing runs, nothing else is held."""
    leased = metric((await http.get(f"{url}/metrics")).text, "vtc_cluster_slots_leased")
    return int((await ledger(redis)).get(b"s", b"0")) == leased


async def wait_until_async(
    check: Callable[[], Awaitable[bool]], limit_s: float, every_s: float = 0.05
) -> None:
    """Poll an async ``check`` until it holds; bounded."""
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not so after {limit_s} s")
        await asyncio.sleep(every_s)


#: What a worker prints once it serves: ``listening on URL``, then ``admin listening on URL``.
_ANNOUNCED = re.compile(r"(admin )?listening on (http://[0-9.]+:[0-9]+)")


def announced(out: list[str]) -> tuple[set[str], list[str]]:
    """The serving URLs and the admin URLs in the workers' first lines. Each line is two writes
    (its text, then the newline), so lines of workers starting together can share one
    (``listening on Xlistening on X`` then an empty line): matched anywhere, not per line."""
    found = _ANNOUNCED.findall("\n".join(out))
    return {url for admin, url in found if not admin}, [url for admin, url in found if admin]


def metric(text: str, name: str) -> float:
    """The value of the one sample of ``name`` in a Prometheus text exposition."""
    (line,) = [x for x in text.splitlines() if x.startswith((name + "{", name + " "))]
    return float(line.split()[-1])


async def shared_again(
    http: httpx.AsyncClient, urls: tuple[str, ...], limit_s: float = 30.0
) -> list[str]:
    """Each replica's ``/metrics`` once all of them dispatch in the shared order again
    (``vtc_cluster_shared`` 1); polled, bounded."""
    deadline = time.monotonic() + limit_s
    while True:
        texts = [(await http.get(f"{u}/metrics")).text for u in urls]
        if all(metric(t, "vtc_cluster_shared") == 1.0 for t in texts):
            return texts
        if time.monotonic() > deadline:
            raise AssertionError(f"replicas still in local fallback after {limit_s} s")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("tree", ["flat", "tree"])
async def test_killed_replica_returns_its_slots_and_the_other_keeps_serving(
    redis_server: RedisServer, tmp_path: Path, tree: str
) -> None:
    async with SimServer(SimConfig(port=0, speed=20.0)) as sim:
        cfg = write_config(tmp_path / "g.yaml", sim.url, redis_server, tree)
        async with gateway(cfg) as (_, out0), gateway(cfg) as (p1, out1):
            u0, u1 = url_of(out0[0]), url_of(out1[0])
            async with httpx.AsyncClient(timeout=60, limits=UNLIMITED) as http:
                a = [asyncio.create_task(send(http, u0, "a")) for _ in range(60)]
                b = [asyncio.create_task(send(http, u1, "b")) for _ in range(60)]
                await wait_for(lambda: sum(t.done() for t in a + b) >= 10, limit_s=60)
                p1.kill()  # SIGKILL: no goodbye, its slots stay booked until its lease ends
                statuses = await asyncio.gather(*a)
                await asyncio.gather(*b)
                assert statuses == [200] * 60  # a, on the survivor, never saw an error
                # the dead replica's slots came back (within the 1 s lease): what stays booked
                # is only what the idle survivor keeps leased for its next requests
                await wait_until_async(lambda: only_leases(http, u0, redis_server), limit_s=30)
        # and the survivor, stopped, gave those back: none is left over
        assert await ledger(redis_server) == {b"s": b"0", b"k": b"0"}


@pytest.mark.parametrize("tree", ["flat", "tree"])
async def test_redis_stop_and_empty_restart_under_load(
    redis_server: RedisServer, tmp_path: Path, tree: str
) -> None:
    async with SimServer(SimConfig(port=0, speed=20.0)) as sim:
        cfg = write_config(tmp_path / "g.yaml", sim.url, redis_server, tree)
        async with gateway(cfg) as (_, out0), gateway(cfg) as (_, out1):
            u0, u1 = url_of(out0[0]), url_of(out1[0])
            async with httpx.AsyncClient(timeout=60, limits=UNLIMITED) as http:
                tasks = [
                    asyncio.create_task(send(http, u, t))
                    for _ in range(60)
                    for u, t in ((u0, "a"), (u1, "b"))
                ]
                await wait_for(lambda: sum(t.done() for t in tasks) >= 10, limit_s=60)
                redis_server.stop()
                await wait_for(lambda: sum(t.done() for t in tasks) >= 40, limit_s=60)
                redis_server.start()  # empty: no counters, no ledger, no replicas
                statuses = await asyncio.gather(*tasks)
                assert statuses == [200] * 120  # no client saw the outage
                # the load may end before a replica retried (every 0.5 s): its rebuild is the
                # registration that ends its fallback, so read the counters after both ended
                metrics = await shared_again(http, (u0, u1))
        for text in metrics:  # each replica noticed the outage (a loaded machine may add a
            # timed-out round trip, with this test's short lease: at least once)
            assert metric(text, "vtc_cluster_fallbacks_total") >= 1.0
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            counters = await raw.hgetall(f"{{vtc}}:c:{MODEL}")
        finally:
            await raw.aclose()
        # both replicas re-merged: the counters were rebuilt from their views, not reset
        assert set(counters) == NODES[tree] and all(float(v) > 0 for v in counters.values())


async def test_workers_share_one_port(redis_server: RedisServer, tmp_path: Path) -> None:
    async with SimServer(SimConfig(port=0, speed=20.0)) as sim:
        cfg = write_config(tmp_path / "g.yaml", sim.url, redis_server)
        raw = json.loads(cfg.read_text())
        raw["listen"] = {"admin_port": 0}
        cfg.write_text(json.dumps(raw))
        async with gateway(cfg, "--workers", "2", lines=4) as (_, out):
            urls, admins = announced(out)
            assert len(urls) == 1 and len(admins) == 2, out  # one port, an admin port each
            async with httpx.AsyncClient(timeout=60) as http:
                statuses = await asyncio.gather(*(send(http, urls.pop(), "a") for _ in range(1)))
                assert statuses == [200]
                names = set()
                for admin in admins:
                    text = (await http.get(f"{admin}/metrics")).text
                    names |= {
                        line.split('replica="')[1].split('"')[0]
                        for line in text.splitlines()
                        if line.startswith("vtc_cluster_shared{")
                    }
                assert len(names) == 2 and all(n.endswith(("-w0", "-w1")) for n in names)


async def test_workers_without_cluster_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "g.yaml"
    cfg.write_text(json.dumps({"backends": [{"name": "s", "url": "http://127.0.0.1:9"}],
                               "tenants": tenants(("a", 1))}))  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(cfg), "--workers", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2
    assert b"--workers > 1 needs a 'cluster:' section" in err


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_workers_stop_when_the_supervisor_is_killed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """kill -9 of the parent leaves no worker behind (the kernel signals them)."""
    async with SimServer(SimConfig(port=0, speed=20.0)) as sim:
        cfg = write_config(tmp_path / "g.yaml", sim.url, redis_server)
        raw = json.loads(cfg.read_text())
        raw["listen"] = {"admin_port": 0}
        cfg.write_text(json.dumps(raw))
        async with gateway(cfg, "--workers", "2", lines=4) as (proc, _):
            workers = _children(proc.pid)
            assert len(workers) == 2
            proc.kill()
            await proc.wait()
            await wait_for(lambda: not any(_alive(w) for w in workers), limit_s=30)
