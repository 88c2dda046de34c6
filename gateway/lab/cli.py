"""``vtc-gateway lab simulate|replay``: the fairness lab's command line.

The main CLI calls :func:`register`; ``python -m gateway.lab ...`` runs the same parser alone.

* ``lab simulate --workload NAME|FILE[,NAME...] --policy vtc,fcfs,...``: discrete-event
  simulation in virtual time (:mod:`gateway.lab.simulate`); ``--workload paper`` runs the whole
  paper suite, one sub-folder of ``--out`` per workload.
* ``lab replay --workload ... --gateway URL --tenants FILE [--speed X]``: the same workload sent
  by real streaming HTTP clients (:mod:`gateway.lab.replay`).

Both write ``results.json``, ``results.md`` and PNG plots into ``--out`` and print the table.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from gateway.admission import KV_ADMISSION_MODES
from gateway.scheduler import CLUSTER_POLICIES, POLICIES, Prices

from .simulate import DIRECT, ENGINE_KV_ADMISSION, LOCAL
from .workloads import (
    BUILTIN,
    CLOSED_LOOP,
    PAPER_SUITE,
    Workload,
    load_workload,
    parse_max_tokens,
)

DEFAULT_OUT = "lab-results"


def _weights(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not name or not weight > 0:
            raise SystemExit(f"--weight expects TENANT=W with W > 0, got {item!r}")
        out[name] = weight
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workload",
        required=True,
        help=f"a built-in name ({', '.join(BUILTIN)}), 'paper' for the paper's suite, "
        "'closed' for the closed-loop cases, a .csv or .yaml file; several separated by commas",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=None, help="workload seed (default: 42)")
    p.add_argument("--duration", type=float, help="cut the workload to its first N seconds")
    p.add_argument(
        "--weight", action="append", default=[], metavar="TENANT=W", help="override a weight"
    )
    p.add_argument(
        "--max-tokens",
        help="what every client sends as max_tokens, replacing the workload's: none (unset), "
        "exact (the output length), a cap, or a mix such as none:0.6,4096:0.3,exact:0.1",
    )
    p.add_argument("--price-input", type=float, default=1.0, help="w_in (default 1)")
    p.add_argument("--price-output", type=float, default=2.0, help="w_out (default 2)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--dpi", type=int, default=80, help="PNG resolution (default 80)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no table on stdout")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``lab`` command (``simulate`` and ``replay``) to a CLI's subparsers."""
    lab = subparsers.add_parser("lab", help="fairness lab: simulate or replay workloads")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True)

    sim = lab_sub.add_parser(
        "simulate", help="discrete-event simulation of the gateway on the simulated engine"
    )
    _common(sim)
    sim.add_argument(
        "--policy",
        default="vtc,fcfs,lcf,rpm,vtc-predict",
        help=f"comma-separated policies among {', '.join(POLICIES)}, or direct (the engine "
        "alone, without the gateway; default: all but direct)",
    )
    sim.add_argument("--profile", default="a10g-llama2-7b", help="cost-model profile")
    sim.add_argument(
        "--kv-cache-tokens", type=int, help="KV budget of the engine and the gateway's admission"
    )
    sim.add_argument("--max-num-seqs", type=int, help="running-batch size limit")
    sim.add_argument(
        "--max-model-len", type=int, help="context length of the engine (default: the profile's)"
    )
    sim.add_argument(
        "--kv-admission",
        choices=KV_ADMISSION_MODES,
        help="KV admission of the gateway (and of the engine when it has the mode): reserve "
        "(prompt + max_tokens each) or peak (S-LoRA's peak-future-memory check); default: the "
        "profile's (peak for a10g-llama2-7b, as in the paper)",
    )
    sim.add_argument(
        "--engine-kv-admission",
        choices=ENGINE_KV_ADMISSION,
        help="the engine's own KV admission when it differs: blocks (vLLM), reserve or peak",
    )
    sim.add_argument(
        "--rpm-limit", type=int, default=5, help="requests/min per tenant for rpm (default 5)"
    )
    sim.add_argument(
        "--hold-ms",
        type=float,
        default=50.0,
        help="how long a finished request's slot waits for a resubmitting tenant's next "
        "request (the gateway's scheduler.hold_ms; default 50, 0 = never)",
    )
    sim.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="gateway replicas in front of the backend: each claims its slots from one shared "
        f"fair order, the cluster's own rule ({', '.join(CLUSTER_POLICIES)}); the 'vtc-local' "
        "policy runs each replica on its own (default 1)",
    )
    sim.add_argument(
        "--ingress",
        default="uniform",
        help="which replica a request reaches: uniform (round robin), skewed (each tenant "
        "pinned to one replica) or TENANT=R,... (default uniform)",
    )
    sim.add_argument(
        "--sync-ms",
        type=float,
        default=10.0,
        help="how often a replica syncs its output charges with the shared order (its claims "
        "carry them too; the cluster's sync_interval_s; default 10, 0 = as they are made)",
    )
    sim.add_argument(
        "--quota-tpm",
        type=int,
        help="a hosted API's tokens per window in front of an unlimited engine (the gateway's "
        "quota backend; default: the workload's, e.g. 60000 for 'quota')",
    )
    sim.add_argument(
        "--quota-window-s", type=float, help="the quota's sliding window (default: 60)"
    )
    sim.set_defaults(func=run_simulate)

    rep = lab_sub.add_parser("replay", help="send the workload over HTTP to a running gateway")
    _common(rep)
    rep.add_argument("--gateway", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    rep.add_argument(
        "--tenants",
        help="YAML: a mapping tenant -> API key, or the gateway's config file (tenants section)",
    )
    rep.add_argument("--speed", type=float, default=1.0, help="compress arrivals by X")
    rep.add_argument("--model", help="model name (default: the first of /v1/models)")
    rep.add_argument(
        "--endpoint", choices=("completions", "chat"), default="completions", help="API to use"
    )
    rep.add_argument("--label", default="replay", help="name of the run in results.json")
    rep.add_argument(
        "--kv-cache-tokens", type=int, default=10_000, help="M of the 2U bound (default 10000)"
    )
    rep.set_defaults(func=run_replay)


def _workloads(args: argparse.Namespace) -> list[Workload]:
    specs: list[str] = []
    for spec in str(args.workload).split(","):
        if spec == "paper":
            specs.extend(PAPER_SUITE)
        elif spec == "closed":
            specs.extend(CLOSED_LOOP)
        else:
            specs.append(spec)
    weights = _weights(args.weight)
    try:
        mix = None if args.max_tokens is None else parse_max_tokens(args.max_tokens, "--max-tokens")
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    out = []
    for spec in specs:
        try:
            wl = load_workload(spec, seed=args.seed, weights=weights)
        except (ValueError, FileNotFoundError) as exc:
            raise SystemExit(f"workload {spec!r}: {exc}") from exc
        if args.duration is not None:
            wl = wl.truncated(args.duration)
        if mix is not None:
            wl = wl.with_max_tokens(mix)
        out.append(wl)
    return out


def _out_dir(args: argparse.Namespace, wl: Workload, many: bool) -> Path:
    base = Path(args.out)
    return base / wl.name if many else base


def _emit(args: argparse.Namespace, results: object, out: Path) -> None:
    from . import report
    from .report import LabResults

    assert isinstance(results, LabResults)
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(results, out / "results.json")
    table = report.markdown(results)
    (out / "results.md").write_text(table)
    if not args.no_plots:
        from .plots import plot_all

        plot_all(results, out, dpi=args.dpi)
    if not args.quiet:
        print(table)
        print(f"wrote {out}/results.json, results.md" + ("" if args.no_plots else ", *.png"))


def run_simulate(args: argparse.Namespace) -> int:
    from .report import ProgressBar, build_results
    from .simulate import SimConfig, simulate

    policies = [p.strip() for p in str(args.policy).split(",") if p.strip()]
    known = (*CLUSTER_POLICIES, LOCAL) if args.replicas > 1 else (*POLICIES, DIRECT)
    bad = [p for p in policies if p not in known]
    if bad or not policies:
        print(f"unknown policy {', '.join(bad)}; expected {', '.join(known)}", file=sys.stderr)
        return 2
    prices = Prices(args.price_input, args.price_output)
    config = SimConfig(
        profile=args.profile,
        kv_cache_tokens=args.kv_cache_tokens,
        max_num_seqs=args.max_num_seqs,
        rpm_limit=args.rpm_limit,
        prices=prices,
        kv_admission=args.kv_admission,
        engine_kv_admission=args.engine_kv_admission,
        max_model_len=args.max_model_len,
        hold_s=args.hold_ms / 1000,
        replicas=args.replicas,
        ingress=args.ingress,
        sync_s=args.sync_ms / 1000,
    )
    try:
        config.engine_config()
    except (KeyError, ValueError) as exc:
        print(exc.args[0] if exc.args else exc, file=sys.stderr)
        return 2
    workloads = _workloads(args)
    if args.quota_tpm is not None or args.quota_window_s is not None:
        workloads = [
            replace(
                wl,
                quota_tpm=args.quota_tpm or wl.quota_tpm,
                quota_window_s=args.quota_window_s or wl.quota_window_s,
            )
            for wl in workloads
        ]
    show = not args.quiet and sys.stderr.isatty()
    for wl in workloads:
        runs = {}
        preemptions = {}
        kv = 0
        for policy in policies:
            bar = ProgressBar(f"{wl.name[:6]}/{policy}") if show else None
            res = simulate(wl, policy, config, bar)
            runs[policy] = res.records
            preemptions[policy] = res.preemptions
            kv = res.kv_cache_tokens
        results = build_results(wl, runs, prices, kv, preemptions)
        _emit(args, results, _out_dir(args, wl, len(workloads) > 1))
    return 0


def run_replay(args: argparse.Namespace) -> int:
    import asyncio

    from .replay import ReplayError, load_tenant_keys, replay_workload
    from .report import ProgressBar, build_results

    prices = Prices(args.price_input, args.price_output)
    try:
        keys, weights = load_tenant_keys(args.tenants) if args.tenants else ({}, {})
    except (OSError, ValueError) as exc:
        print(f"--tenants: {exc}", file=sys.stderr)
        return 2
    if args.speed <= 0:
        print("--speed must be > 0", file=sys.stderr)
        return 2
    workloads = _workloads(args)
    show = not args.quiet and sys.stderr.isatty()
    for wl in workloads:
        for t, w in weights.items():
            if t in wl.tenants and not any(x.startswith(f"{t}=") for x in args.weight):
                wl.tenants[t] = w
        bar = ProgressBar(f"{wl.name[:6]}/{args.label}") if show else None
        try:
            records = asyncio.run(
                replay_workload(
                    wl,
                    args.gateway,
                    keys,
                    speed=args.speed,
                    model=args.model,
                    endpoint=args.endpoint,
                    progress=bar,
                )
            )
        except ReplayError as exc:
            print(f"replay: {exc}", file=sys.stderr)
            return 1
        results = build_results(wl, {args.label: records}, prices, args.kv_cache_tokens)
        _emit(args, results, _out_dir(args, wl, len(workloads) > 1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.lab")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["lab", *(argv if argv is not None else sys.argv[1:])])
    code: int = args.func(args)
    return code
