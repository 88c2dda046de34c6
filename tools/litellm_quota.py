"""The quota bench's scenario through the LiteLLM proxy: the reference side-by-side.

``vtc-gateway bench quota`` measures the gateway in front of the simulator in provider mode;
this script runs the same provider, the same clients and the same three phases (``a`` alone,
``a`` + ``b`` at weights 1:3, then ``c`` as well) through the LiteLLM proxy, the gateway teams
use for this today, configured the two ways it offers without a database or a licence:

* ``litellm-teams``: per-team TPM limits (``team_tpm_limit``, enforced by its
  ``parallel_request_limiter_v3``), each team's limit its weight's share of the quota (a 1/5,
  b 3/5, c 1/5): what an operator writes to split an account 1:3:1;
* ``litellm-dynamic``: the ``dynamic_rate_limiter_v3`` callback over the deployment's ``tpm``
  (the quota), each team tagged with its priority. Reserving capacity by priority is a premium
  feature (``LITELLM_LICENSE``); without one every team gets the limiter's default weight.

Teams and keys come from a ``custom_auth`` function (no database): each client's key maps to
its team. LiteLLM's rate-limit window is set to the quota's
(``LITELLM_RATE_LIMIT_WINDOW_SIZE``), the model cost map is the bundled one
(``LITELLM_LOCAL_MODEL_COST_MAP``) and Hugging Face is offline (``HF_HUB_OFFLINE``: it would
fetch a tokenizer named after the model): it runs offline.

LiteLLM is never a dependency of this project: it lives in its own virtualenv, outside the
repository (default ``~/.cache/vtc-litellm``)::

    python -m tools.litellm_quota --install          # creates the virtualenv (pip, once)
    python -m tools.litellm_quota                    # litellm-teams, litellm-dynamic, gateway
    python -m tools.litellm_quota --paths litellm-dynamic --phases 20,30,30 --tpm 6000

Without LiteLLM installed it says so and exits 0 (nothing measured). It prints the quota
bench's table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from .loadgen import MODEL
from .procs import free_port, run_benchmark, stop_process
from .quota_bench import (
    GATEWAY,
    HEADER,
    TENANTS,
    Front,
    QuotaOptions,
    add_arguments,
    api_key,
    gateway_front,
    options_from_args,
    quota_benchmark,
)

#: The LiteLLM release measured (its ``[proxy]`` extra installs from the package registry).
LITELLM_VERSION = "1.106.12"
DEFAULT_VENV = Path.home() / ".cache" / "vtc-litellm"
TEAMS = "litellm-teams"
DYNAMIC = "litellm-dynamic"
PATHS = (TEAMS, DYNAMIC, GATEWAY)

#: The proxy's auth hook: each bench key is its tenant's team (written next to the config).
AUTH_MODULE = """\
import json
from litellm.proxy._types import UserAPIKeyAuth

TEAMS = json.loads({teams!r})


async def user_api_key_auth(request, api_key):
    key = api_key.removeprefix("Bearer ").strip()
    team = TEAMS.get(key)
    if team is None:
        raise Exception("unknown key")
    return UserAPIKeyAuth(
        api_key=key,
        team_id=team["team"],
        team_tpm_limit=team.get("tpm"),
        metadata={{"priority": team["team"]}},
    )
"""


def litellm_binary(venv: Path) -> Path | None:
    exe = venv / "bin" / "litellm"
    return exe if exe.exists() else None


def installed_version(venv: Path) -> str | None:
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('litellm'))"
    done = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or None


def install(venv: Path) -> int:
    """Create ``venv`` and install LiteLLM's proxy into it (never into this project's)."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = f"litellm[proxy]=={LITELLM_VERSION}"
    return subprocess.run([str(venv / "bin" / "pip"), "install", "-q", spec]).returncode


def litellm_config(provider_url: str, opts: QuotaOptions, path: str) -> dict[str, Any]:
    """One deployment (the provider, its ``tpm`` the quota), keys by custom auth; the
    dynamic limiter's callback and priorities for ``litellm-dynamic``."""
    config: dict[str, Any] = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": provider_url + "/v1",
                    "api_key": "sk-provider",
                    "tpm": opts.tpm,
                },
            }
        ],
        "general_settings": {
            "master_key": "sk-bench-master",
            "custom_auth": "quota_auth.user_api_key_auth",
        },
        "litellm_settings": {"telemetry": False, "drop_params": True},
    }
    if path == DYNAMIC:
        wsum = sum(w for _, w in TENANTS)
        config["litellm_settings"]["callbacks"] = ["dynamic_rate_limiter_v3"]
        config["litellm_settings"]["priority_reservation"] = {
            t: round(w / wsum, 4) for t, w in TENANTS
        }
    return config


def team_limits(opts: QuotaOptions, path: str) -> dict[str, dict[str, Any]]:
    """Key -> team (and, for ``litellm-teams``, its TPM limit: its weight's share)."""
    wsum = sum(w for _, w in TENANTS)
    out: dict[str, dict[str, Any]] = {}
    for t, w in TENANTS:
        team: dict[str, Any] = {"team": t}
        if path == TEAMS:
            team["tpm"] = int(opts.tpm * w / wsum)
        out[api_key(t)] = team
    return out


async def _ready(url: str, proc: asyncio.subprocess.Process, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"litellm exited with {proc.returncode} before it was ready")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(url + "/health/liveliness") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.5)
    raise RuntimeError(f"litellm not ready within {within_s:.0f} s")


def litellm_front(venv: Path, opts: QuotaOptions, path: str) -> Front:
    exe = litellm_binary(venv)
    assert exe is not None

    @contextlib.asynccontextmanager
    async def front(provider_url: str, workdir: Path) -> AsyncIterator[str]:
        d = workdir / path
        d.mkdir(parents=True, exist_ok=True)
        (d / "quota_auth.py").write_text(
            AUTH_MODULE.format(teams=json.dumps(team_limits(opts, path)))
        )
        cfg = d / "config.yaml"
        cfg.write_text(yaml.safe_dump(litellm_config(provider_url, opts, path)))
        port = free_port()
        env = {
            **os.environ,
            "LITELLM_RATE_LIMIT_WINDOW_SIZE": str(int(opts.window_s)),
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
            # it counts tokens with a Hugging Face tokenizer named after the model (llama-3)
            # and retries the download for ~25 s; offline it falls back to its bundled one
            "HF_HUB_OFFLINE": "1",
            "LITELLM_LOG": "ERROR",
            "PYTHONPATH": str(d),
        }
        env.pop("LITELLM_LICENSE", None)  # measured as teams run it without one
        log = (d / "litellm.log").open("wb")
        argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=d, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            await _ready(f"http://127.0.0.1:{port}", proc, 180.0)
            yield f"http://127.0.0.1:{port}"
        finally:
            await stop_process(proc)
            log.close()

    return front


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.litellm_quota", description=__doc__)
    add_arguments(p)
    p.set_defaults(out="bench-results/quota-litellm.json")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="LiteLLM's own virtualenv")
    p.add_argument("--install", action="store_true", help="create --venv with LiteLLM and exit")
    p.add_argument(
        "--paths", default=",".join(PATHS), help=f"among {', '.join(PATHS)} (default: all)"
    )
    args = p.parse_args(argv)
    if args.install:
        return install(args.venv)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if bad := [x for x in paths if x not in PATHS]:
        print(f"unknown path {', '.join(bad)}; expected {', '.join(PATHS)}", file=sys.stderr)
        return 2
    opts = options_from_args(args)
    if any(x != GATEWAY for x in paths) and litellm_binary(args.venv) is None:
        print(
            f"skipped: LiteLLM is not installed in {args.venv} (its own virtualenv, never this "
            f"project's); create it with: python -m tools.litellm_quota --install"
        )
        return 0
    fronts: dict[str, Front] = {
        x: gateway_front(opts) if x == GATEWAY else litellm_front(args.venv, opts, x) for x in paths
    }

    async def bench(log: Callable[[str], None]) -> dict[str, Any]:
        results = await quota_benchmark(opts, log, fronts)
        results["meta"]["litellm"] = installed_version(args.venv)
        return results

    return run_benchmark(HEADER, bench, args.out)


if __name__ == "__main__":
    sys.exit(main())
