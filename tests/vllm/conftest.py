"""Real vLLM (its CPU build) behind the gateway.

The vLLM virtualenv is made by ``backends/vllm/install-cpu.sh`` (``.ci/run`` runs it). Without
it these tests are skipped with the reason, except where ``VTC_REQUIRE_VLLM=1`` (set by
``.ci/run``) turns the skip into a failure, so CI cannot pass by skipping them. vLLM starts
once per session (about 15-60 s on 2 cores) on a free port and is stopped at the end; every wait
is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import parse_config
from gateway.server import STATE, GatewayState, create_app
from tools.procs import free_port

ROOT = Path(__file__).resolve().parents[2]
VERSION = "0.32.0"
HOME = Path(os.environ.get("VTC_VLLM_HOME", Path.home() / ".cache" / "vtc-vllm"))
VENV = Path(os.environ.get("VTC_VLLM_VENV", HOME / f"venv-{VERSION}"))
REQUIRED = os.environ.get("VTC_REQUIRE_VLLM") == "1"
MODEL = "tiny-llama"
CONTEXT = 2048
BLOCK = 32
KV_BLOCKS = 80  # 2,560 KV tokens
MAX_NUM_SEQS = 8
START_LIMIT_S = 240.0


def vllm_available() -> str | None:
    """None when the vLLM venv is installed, else why not."""
    if not (VENV / ".vtc-vllm-ok").is_file():
        return f"vLLM CPU venv not installed at {VENV}: run backends/vllm/install-cpu.sh"
    return None


def require_vllm() -> None:
    reason = vllm_available()
    if reason is not None:
        if REQUIRED:
            pytest.fail(f"VTC_REQUIRE_VLLM=1 but {reason}")
        pytest.skip(reason)


def build_model(hidden: int = 128, layers: int = 2) -> Path:
    out = HOME / "models" / f"llama-h{hidden}-l{layers}-c{CONTEXT}"
    subprocess.run(
        [
            str(VENV / "bin" / "python"),
            str(ROOT / "backends" / "vllm" / "tiny_model.py"),
            str(out),
            "--hidden",
            str(hidden),
            "--layers",
            str(layers),
            "--context",
            str(CONTEXT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return out


@dataclass
class VllmServer:
    """One ``vllm serve`` process (and its engine-core child, in its own process group)."""

    model_dir: Path
    port: int
    kv_blocks: int = KV_BLOCKS
    max_num_seqs: int = MAX_NUM_SEQS
    extra_args: tuple[str, ...] = ()  # more `vllm serve` flags
    proc: subprocess.Popen[bytes] | None = None
    log_path: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
        fd, self.log_path = tempfile.mkstemp(prefix="vllm-", suffix=".log")
        cmd = [
            str(VENV / "bin" / "vllm"),
            "serve",
            str(self.model_dir),
            "--served-model-name",
            MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(CONTEXT),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--block-size",
            str(BLOCK),
            "--num-gpu-blocks-override",
            str(self.kv_blocks),
            "--dtype",
            "float32",
            "--enforce-eager",
            "--no-enable-prefix-caching",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            cmd, stdout=fd, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        os.close(fd)

    def wait_ready(self, limit_s: float = START_LIMIT_S) -> None:
        deadline = time.monotonic() + limit_s
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.5)  # polling an external process's readiness, bounded by the deadline
        self.stop()
        raise RuntimeError(f"vllm serve not ready in {limit_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "".join(Path(self.log_path).read_text(errors="replace").splitlines(True)[-n:])
        return ""

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # the engine core, if it outlived it
            os.killpg(proc.pid, signal.SIGKILL)
        self.proc = None
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)

    def metrics(self) -> dict[str, float]:
        """vLLM's unlabelled-sum of each sample name on ``/metrics``."""
        return parse_metrics(httpx.get(self.url + "/metrics", timeout=10).text)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        try:
            value = float(line.rsplit(" ", 1)[1])
        except (IndexError, ValueError):
            continue
        out[name] = out.get(name, 0.0) + value
    return out


@contextlib.contextmanager
def running_vllm(**kw: Any) -> Iterator[VllmServer]:
    require_vllm()
    server = VllmServer(port=free_port(), **kw)
    server.start()
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    require_vllm()
    return build_model()


@pytest.fixture(scope="session")
def vllm(tiny_model: Path) -> Iterator[VllmServer]:
    with running_vllm(model_dir=tiny_model) as server:
        yield server


@dataclass
class Gateway:
    url: str
    app: web.Application

    @property
    def state(self) -> GatewayState:
        return self.app[STATE]

    def counter(self, tenant: str) -> float:
        return self.state.dispatcher.core.pool(MODEL).counter(tenant)


@contextlib.asynccontextmanager
async def gateway_for(
    url: str, *, backend: dict[str, Any] | None = None, **raw: Any
) -> AsyncIterator[Gateway]:
    """An in-process gateway on port 0 in front of ``url``; tenants a and b (keys key-a/-b)."""
    config: dict[str, Any] = {
        "backends": [{"name": "vllm", "url": url, "max_num_seqs": MAX_NUM_SEQS, **(backend or {})}],
        "tenants": [{"name": t, "api_keys": [f"key-{t}"]} for t in ("a", "b")],
        "tokenizer": "backend",
        "limits": {"health_interval_s": 60},
    }
    config.update(raw)
    app = create_app(parse_config(config))
    server = TestServer(app, handler_cancellation=True)
    await server.start_server()
    try:
        yield Gateway(str(server.make_url("")).rstrip("/"), app)
    finally:
        await server.close()


async def wait_until(cond: Any, limit_s: float = 30.0, what: str = "condition") -> None:
    """Await until ``cond()`` (sync or async) is true; bounded."""
    deadline = time.monotonic() + limit_s
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {limit_s} s")
        await asyncio.sleep(0.05)


#: Per-test limit here (the suite's is 120 s): a test's time includes starting vLLM for the
#: fixtures it is the first to use (up to START_LIMIT_S on a busy machine).
TEST_TIMEOUT_S = 600


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/vllm/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.vllm)
            item.add_marker(pytest.mark.timeout(TEST_TIMEOUT_S))
