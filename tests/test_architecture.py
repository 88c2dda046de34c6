"""The import rules of the code base, checked on every module's source (relative imports and
imports inside functions included).

Layers::

    common          token counting, shared by both sides of the wire; imports no project code
    gateway         the gateway (gateway/lab: the fairness lab; gateway/cli.py: the command)
    backends        backends (backends/sim: the simulated vLLM server)
    tools           benchmarks and the soak run

* ``backends`` and ``common`` never import ``gateway`` or ``tools``; ``common`` nothing else of
  the project either.
* ``gateway`` imports ``backends`` only in the CLI (the embedded simulated backend) and the lab
  (the simulator's engine); ``tools`` only in the CLI (to register its commands).
* The runtime gateway never imports the lab; only the lab imports plotting or httpx.
* Only the transport (``gateway/upstream/http.py``), the server and the CLI import aiohttp.
* Pure modules (scheduler, admission, the simulator's engine core) import no event loop,
  network or clock: time is passed in; the dispatch core and the lab's simulation do no I/O.
* No import cycles within ``gateway/cluster``, ``gateway/engines`` or ``tools``; the tools
  share code through modules of their own, never another tool's private names.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "gateway", "backends", "tools")
#: No event loop and no network.
NO_IO = ("asyncio", "aiohttp", "httpx", "socket", "threading", "trio", "anyio")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names (for
    ``from X import name`` both ``X`` and ``X.name``: the name may be a submodule)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield _module_name(path), path


GRAPH = {name: _imports(path) for name, path in _modules()}


def _under(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _offenders(sources: list[str], *targets: str) -> dict[str, list[str]]:
    bad = {m: sorted(i for i in GRAPH[m] if _under(i, *targets)) for m in sources}
    return {m: v for m, v in bad.items() if v}


def test_the_graph_sees_relative_and_lazy_imports() -> None:
    """The checks below would pass on an empty graph; make sure it is not one."""
    assert len(GRAPH) > 50
    assert "gateway.errors" in GRAPH["gateway.server.proxy"]  # from ..errors import ...
    assert "gateway.upstream.interface" in GRAPH["gateway.upstream"]  # from .interface
    assert "backends.sim.server" in GRAPH["gateway.cli"]  # inside a function
    assert "tools.scheduler_bench" in GRAPH["tools.bench"]  # from . import scheduler_bench


def test_common_and_backends_import_neither_gateway_nor_tools() -> None:
    sources = [m for m in GRAPH if _under(m, "common", "backends")]
    assert _offenders(sources, "gateway", "tools") == {}
    assert _offenders([m for m in GRAPH if _under(m, "common")], "backends") == {}


def test_gateway_imports_backends_and_tools_only_from_the_cli_and_the_lab() -> None:
    runtime = [m for m in GRAPH if _under(m, "gateway") and not _under(m, "gateway.lab")]
    assert _offenders([m for m in runtime if m != "gateway.cli"], "backends", "tools") == {}
    lab = [m for m in GRAPH if _under(m, "gateway.lab")]
    assert _offenders(lab, "tools") == {}


def test_the_runtime_never_imports_the_lab_or_lab_only_libraries() -> None:
    runtime = [
        m
        for m in GRAPH
        if _under(m, "gateway") and not _under(m, "gateway.lab") and m != "gateway.cli"
    ]
    assert _offenders(runtime, "gateway.lab", "matplotlib", "httpx") == {}


def test_only_the_transport_the_server_and_the_cli_use_aiohttp() -> None:
    allowed = ("gateway.upstream.http", "gateway.server", "gateway.cli")
    sources = [m for m in GRAPH if _under(m, "gateway", "common") and not _under(m, *allowed)]
    assert _offenders(sources, "aiohttp") == {}


#: Pure and clockless: time is an argument, so the live gateway and the discrete-event
#: simulator run them unchanged.
CLOCKLESS = [
    *(m for m in GRAPH if _under(m, "gateway.scheduler")),
    "gateway.admission",
    *(m for m in GRAPH if _under(m, "gateway.engines")),
    "backends.sim.engine",
    "backends.sim.costmodel",
    "backends.sim.ratelimit",
]
#: No I/O: the dispatch core (its clock is injected, time.monotonic by default) and the lab's
#: simulation and reporting (they may read the wall clock for progress).
SYNCHRONOUS = [
    "gateway.core",
    "gateway.lab.workloads",
    "gateway.lab.metrics",
    "gateway.lab.simulate",
    "gateway.lab.report",
]


@pytest.mark.parametrize("module", CLOCKLESS)
def test_pure_modules_import_no_event_loop_network_or_clock(module: str) -> None:
    assert _offenders([module], *NO_IO, "time") == {}


@pytest.mark.parametrize("module", SYNCHRONOUS)
def test_dispatch_core_and_lab_simulation_do_no_io(module: str) -> None:
    assert _offenders([module], *NO_IO) == {}


def _cycles(modules: list[str]) -> list[list[str]]:
    """Import cycles among ``modules`` (each as the path that closes it)."""
    inside = set(modules)
    edges = {m: sorted(i for i in GRAPH[m] if i in inside and i != m) for m in modules}
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in edges[m]:
            if state.get(n) == 1:
                found.append([*path[path.index(n) :], n])
            elif n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(modules):
        if m not in state:
            visit(m, [m])
    return found


@pytest.mark.parametrize("package", ["gateway.cluster", "gateway.engines", "tools"])
def test_no_import_cycles(package: str) -> None:
    """Within the scale-out package, the engine seam and the tools, imports run one way (a
    package's ``__init__`` re-exporting its modules is not a cycle of theirs)."""
    modules = [m for m in GRAPH if _under(m, package) and m != package]
    assert _cycles(modules) == []


def test_tools_import_no_private_names_of_each_other() -> None:
    """What two tools share lives in a module of its own (``tools.loadgen``, ``tools.procs``),
    public there, not in one bench that the other reaches into."""
    tools = [m for m in GRAPH if _under(m, "tools")]
    private = {
        m: sorted(i for i in GRAPH[m] if _under(i, "tools") and i.rpartition(".")[2][:1] == "_")
        for m in tools
    }
    assert {m: v for m, v in private.items() if v} == {}


def test_the_cycle_check_finds_a_cycle() -> None:
    GRAPH["tests.fake_a"] = {"tests.fake_b"}
    GRAPH["tests.fake_b"] = {"tests.fake_a"}
    try:
        assert _cycles(["tests.fake_a", "tests.fake_b"]) == [
            ["tests.fake_a", "tests.fake_b", "tests.fake_a"]
        ]
    finally:
        del GRAPH["tests.fake_a"], GRAPH["tests.fake_b"]


def test_the_cluster_package_is_used_only_by_the_server_and_the_process_startup() -> None:
    """Scale-out plugs into the server's wiring and the worker start-up; the dispatch core,
    the scheduler and admission know nothing of it."""
    allowed = ("gateway.cluster", "gateway.server", "gateway.cli", "gateway.workers", "gateway.lab")
    users = [m for m in GRAPH if _under(m, "gateway", "tools") and not _under(m, *allowed)]
    assert _offenders(users, "gateway.cluster") == {}
