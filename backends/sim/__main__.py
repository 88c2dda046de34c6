"""``python -m backends.sim``: run the simulated vLLM server.

Prints exactly one line on stdout once bound, ``listening on http://HOST:PORT`` (flushed), so
scripts using ``--port 0`` can find the port. Logs go to stderr. SIGINT/SIGTERM stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import get_args

from backends.sim.config import SimConfig
from backends.sim.costmodel import PROFILES, KvAdmission
from backends.sim.faults import parse_fault
from backends.sim.server import SimServer

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m backends.sim",
        description="Simulated vLLM OpenAI-compatible server (continuous batching, cost model).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--model", default="sim-llama-3-8b", help="served model name")
    p.add_argument("--profile", default="h100-llama3-8b", choices=sorted(PROFILES))
    p.add_argument("--max-num-seqs", type=int, help="default: the profile's")
    p.add_argument("--max-num-batched-tokens", type=int, help="default: the profile's")
    p.add_argument("--kv-cache-tokens", type=int, help="default: the profile's")
    p.add_argument("--max-model-len", type=int, help="default: the profile's (8192 for llama3)")
    p.add_argument(
        "--kv-admission",
        choices=get_args(KvAdmission),
        help="when a waiting request's KV fits: blocks (vLLM), reserve (prompt + max_tokens "
        "allocated up front) or peak (S-LoRA's peak-future-memory check); default: the profile's",
    )
    p.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated-time scale; 2 = twice as fast, 0 = no delays at all",
    )
    p.add_argument("--no-delay", action="store_true", help="same as --speed 0")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--median-output-tokens",
        type=int,
        default=128,
        help="median output length when ignore_eos is not set",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[;key=value...]",
        help="server-wide fault, repeatable: refuse, error_500, drop_mid, stall_mid, "
        "slow_first, malformed_sse, error_mid; keys p, after, delay",
    )
    quota = p.add_argument_group(
        "hosted-provider mode",
        "a rate-limited OpenAI-compatible provider: x-ratelimit-* headers, 429 with "
        "Retry-After when the quota is spent",
    )
    quota.add_argument("--tpm", type=int, help="tokens (prompt + output) per window; default off")
    quota.add_argument("--rpm", type=int, help="requests per window; default off")
    quota.add_argument(
        "--rate-window-s",
        type=float,
        default=60.0,
        help="the quota's sliding window in wall seconds (default 60: per minute)",
    )
    quota.add_argument(
        "--provider",
        action="store_true",
        help="no batch-slot or KV queueing: --max-num-seqs and --kv-cache-tokens default to "
        "effectively unlimited",
    )
    p.add_argument("--log-level", default="WARNING")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Turn parsed arguments into a validated :class:`SimConfig` (``ValueError`` if bad)."""
    return SimConfig(
        host=args.host,
        port=args.port,
        model=args.model,
        profile=args.profile,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_tokens=args.kv_cache_tokens,
        max_model_len=args.max_model_len,
        kv_admission=args.kv_admission,
        speed=0.0 if args.no_delay else args.speed,
        seed=args.seed,
        median_output_tokens=args.median_output_tokens,
        faults=tuple(parse_fault(f) for f in args.fault),
        tpm=args.tpm,
        rpm=args.rpm,
        rate_window_s=args.rate_window_s,
        provider=args.provider,
    )


async def _serve(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimServer(config) as srv:
        print(f"listening on {srv.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, run until SIGINT/SIGTERM; exit status 2 for bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
    except (ValueError, KeyError) as exc:
        parser.error(str(exc))
    asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
