"""``vtc-gateway``: serve, check-config, lab, bench."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

from .config import ConfigError, GatewayConfig, embedded_default, load_config, with_listen

log = logging.getLogger("gateway")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vtc-gateway", description="Fair-share (VTC) gateway for OpenAI-compatible LLM servers"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", help="YAML config file (default: embedded simulated backend)")
    serve.add_argument("--host", help="listen address (overrides the config)")
    serve.add_argument("--port", type=int, help="listen port, 0 for a free one (overrides config)")
    serve.add_argument(
        "--sim-profile",
        default="h100-llama3-8b",
        help="profile of the embedded simulated backend (no --config only)",
    )
    serve.add_argument(
        "--sim-speed",
        type=float,
        default=1.0,
        help="speed of the embedded simulated backend (no --config only)",
    )
    serve.add_argument(
        "--no-watch",
        action="store_true",
        help="do not reload when the config file changes (SIGHUP still reloads)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gateway processes on the port (SO_REUSEPORT); > 1 needs a cluster: section",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_cmd_serve)

    check = sub.add_parser(
        "check-config", help="validate a config file and print it, keys redacted"
    )
    check.add_argument("file")
    check.set_defaults(func=_cmd_check_config)

    try:
        from .lab.cli import register as register_lab
    except ImportError:  # pragma: no cover - lab extras missing
        pass
    else:
        register_lab(sub)
    try:  # tools (benchmarks, soak) are not part of the runtime; present in a source install
        from tools.bench import register as register_bench
        from tools.soak import register as register_soak
    except ImportError:  # pragma: no cover - tools package missing
        pass
    else:
        register_bench(sub)
        register_soak(sub)

    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args))


def _cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: {len(exc.problems)} problem(s)", file=sys.stderr)
        for p in exc.problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    print(json.dumps(config.redacted(), indent=2))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    config: GatewayConfig | None = None
    if args.config:
        try:
            config = with_listen(load_config(args.config), args.host, args.port)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            return 2
    from . import workers

    try:
        workers.check(config, args.workers)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    if config is not None and args.workers > 1:
        argv = ["--log-level", args.log_level, "serve", "--config", args.config]
        argv += ["--host", config.listen.host] + (["--no-watch"] if args.no_watch else [])
        return workers.run(argv, config.listen.host, config.listen.port, args.workers)
    if config is not None and args.worker_index is not None:
        config = workers.for_worker(config, args.worker_index)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config, args))
    return 0


@contextlib.asynccontextmanager
async def _embedded_sim(args: argparse.Namespace) -> AsyncIterator[str]:
    from backends.sim.config import SimConfig
    from backends.sim.server import SimServer

    cfg = SimConfig(host="127.0.0.1", port=0, profile=args.sim_profile, speed=args.sim_speed)
    async with SimServer(cfg) as sim:
        log.info("embedded simulated backend at %s (profile %s)", sim.url, args.sim_profile)
        yield str(sim.url)


async def _serve(config: GatewayConfig | None, args: argparse.Namespace) -> None:
    from .reload import Reloader
    from .server import STATE, create_admin_app, create_app

    async with contextlib.AsyncExitStack() as stack:
        if config is None:
            sim_url = await stack.enter_async_context(_embedded_sim(args))
            config = embedded_default(
                sim_url,
                host=args.host or "127.0.0.1",
                port=args.port if args.port is not None else 8080,
            )
        app = create_app(config)
        lim = config.limits
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=lim.shutdown_timeout_s,
            keepalive_timeout=lim.idle_timeout_s,
        )
        await runner.setup()
        stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(
            runner,
            config.listen.host,
            config.listen.port,
            reuse_port=args.worker_index is not None,
        )
        await site.start()
        host, port = _bound(runner, config.listen.host, config.listen.port)
        print(f"listening on http://{host}:{port}", flush=True)
        if config.listen.admin_port is not None:
            admin = web.AppRunner(create_admin_app(app), access_log=None)
            await admin.setup()
            stack.push_async_callback(admin.cleanup)
            await web.TCPSite(admin, config.listen.admin_host, config.listen.admin_port).start()
            ahost, aport = _bound(admin, config.listen.admin_host, config.listen.admin_port)
            print(f"admin listening on http://{ahost}:{aport}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.worker_index is not None:  # a worker outlives no supervisor
            from .workers import watch_parent

            orphan = asyncio.create_task(watch_parent(stop), name="watch-parent")
            stack.callback(orphan.cancel)
        if args.config:  # hot reload: SIGHUP, and (unless --no-watch) file changes
            reloader = Reloader(app[STATE], args.config)
            loop.add_signal_handler(signal.SIGHUP, reloader.reload, "SIGHUP")
            if not args.no_watch:
                watcher = asyncio.create_task(reloader.watch(), name="config-watch")
                stack.callback(watcher.cancel)
        else:
            loop.add_signal_handler(
                signal.SIGHUP, log.warning, "SIGHUP ignored: no --config file to reload"
            )
        await stop.wait()
        # Drain: refuse new work, answer the queue 503, let running streams finish until
        # limits.shutdown_timeout_s (runner.cleanup waits for them, then cancels the rest).
        state = app[STATE]
        failed = state.drain()
        log.info(
            "shutting down: %d queued request(s) answered 503, %d running get up to %gs",
            failed,
            state.admission.in_flight(),
            lim.shutdown_timeout_s,
        )


def _bound(runner: web.AppRunner, host: str, port: int) -> tuple[str, int]:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return host, int(addr[1])
    return host, port


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
