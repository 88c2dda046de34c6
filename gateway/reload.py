"""Hot reload: apply a new configuration to a running gateway without dropping work.

Triggered by SIGHUP or by a change of the config file (a watcher compares its mtime and size
every second and, when they move, its SHA-256), both wired in ``vtc-gateway serve``.

What reloads (takes effect for the next request; queued and running requests are kept):

* ``tenants``: added tenants, weights (``Scheduler.set_tenant``: counters are kept),
  ``tier`` (queued requests move with their tenant; under ``fcfs`` new ones only),
  ``max_queued``, ``max_in_flight`` (a lower cap stops new dispatches, running requests
  finish), API keys (the :class:`~gateway.server.auth.Authenticator` is rebuilt). A removed
  tenant's *queued* requests are answered ``401 AuthenticationError`` "tenant removed by
  configuration reload"; its *running* requests finish and are charged normally; its counter
  is kept in case it comes back.
* the tenant tree: a tenant or group may move to another parent, groups may be added and
  removed, weights and limits change; queued requests of tenants that stay keep their place
  (and their counters), whatever group they are in now. A removed group's own counter is
  forgotten by the order only when no tenant stays under it.
* ``auth``, ``metrics.max_tenant_labels`` (new label values only), ``metrics.fairness_window_s``,
  ``limits.queue_timeout_s``, ``limits.max_tokens_default``, ``limits.health_interval_s``,
  ``limits.feedback_interval_s``.

What needs a restart (a change is logged as a warning and the running value stays):
``listen``, ``backends``, ``scheduler`` (policy and prices define what a counter means),
``tokenizer``, ``limits.max_body_bytes``, ``limits.connect_timeout_s``,
``limits.read_timeout_s``, ``limits.shutdown_timeout_s``, ``limits.idle_timeout_s``.

An invalid file (unreadable, bad YAML, fails validation) is refused: the running configuration
stays, the problems are logged, and ``vtc_config_reloads_total{result="error"}`` counts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .config import ConfigError, GatewayConfig, LimitsConfig, TenantConfig, loads_config
from .errors import TENANT_REMOVED, Unauthorized
from .server.auth import Authenticator
from .server.state import apply_tenants

if TYPE_CHECKING:
    from .server import GatewayState

log = logging.getLogger(__name__)

REMOVED_MESSAGE = TENANT_REMOVED

#: Sections read only at start-up.
RESTART_SECTIONS = ("listen", "backends", "scheduler", "tokenizer")
#: Limits read only at start-up (the rest of ``limits`` reloads).
RESTART_LIMITS = (
    "max_body_bytes",
    "connect_timeout_s",
    "read_timeout_s",
    "shutdown_timeout_s",
    "idle_timeout_s",
)


@dataclass(frozen=True, slots=True)
class ReloadResult:
    added: tuple[str, ...]
    removed: tuple[str, ...]
    changed: tuple[str, ...]  # tenants whose weight, tier, max_queued or max_in_flight changed
    rejected: int  # queued requests of removed tenants answered 401
    needs_restart: tuple[str, ...]  # changed settings that were not applied


def apply_config(state: GatewayState, new: GatewayConfig) -> ReloadResult:
    """Apply the reloadable parts of ``new`` to ``state`` (see the module docstring).
    Raises :class:`ConfigError`, changing nothing, if a name turns from a tenant into a group
    or back (that needs a restart: the schedulers know it as the other kind)."""
    old = state.config
    effective, ignored = _effective(old, new)
    core = state.dispatcher.core
    flipped = [
        n.name
        for n in effective.nodes()
        if core.role(n.name) not in (None, "tenant" if n.leaf else "group")
    ]
    if flipped:
        raise ConfigError(
            [f"tenants: {n!r} would change between tenant and group; restart" for n in flipped]
        )
    for item in ignored:
        log.warning("config reload: %s changed; it takes effect after a restart", item)

    before = {t.name: t for t in old.leaves()}
    after = {t.name: t for t in effective.leaves()}
    groups_before = {n.name for n in old.nodes() if not n.leaf}
    groups_after = {n.name for n in effective.nodes() if not n.leaf}
    moved = _parents(effective)
    dispatcher = state.dispatcher
    added = tuple(n for n in after if n not in before)
    was = _parents(old)
    changed = tuple(
        n
        for n, t in after.items()
        if n in before and (_limits(t) != _limits(before[n]) or moved[n] != was[n])
    )
    removed = tuple(n for n in before if n not in after)

    state.stats.max_tenant_labels = effective.metrics.max_tenant_labels
    state.recorder.fairness.window_s = effective.metrics.fairness_window_s
    for name in groups_after & groups_before:
        core.set_group(name, 1.0)  # to the top first: the new parents may be below it
    apply_tenants(core, effective)
    for t in effective.leaves():
        state.stats.label(t.name)
    state.auth = Authenticator(effective)
    state.config = effective
    state.pool.health_interval = effective.limits.health_interval_s
    state.pool.feedback_interval = effective.limits.feedback_interval_s
    rejected = 0
    for name in removed:
        rejected += dispatcher.remove_tenant(name, Unauthorized(REMOVED_MESSAGE))
    for name in groups_before - groups_after:
        core.forget_group(name)
    core.reloaded()
    core.pump_all()  # weights changed the fair order; let it act now
    state.stats.reload(ok=True)
    result = ReloadResult(added, removed, changed, rejected, ignored)
    log.info(
        "config reloaded: %d tenant(s), added %s, removed %s (%d queued request(s) refused), "
        "changed %s",
        len(after),
        list(added),
        list(removed),
        rejected,
        list(changed),
    )
    return result


def _parents(config: GatewayConfig) -> dict[str, str | None]:
    return {n.name: n.parent for n in config.nodes()}


def _limits(t: TenantConfig) -> tuple[float, int | None, int | None, str]:
    return (t.weight, t.max_queued, t.max_in_flight, t.tier)


def _effective(old: GatewayConfig, new: GatewayConfig) -> tuple[GatewayConfig, tuple[str, ...]]:
    """``new`` with the start-up-only settings of ``old``, and the names of those that differ."""
    ignored = [s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)]
    keep = {k: getattr(old.limits, k) for k in RESTART_LIMITS}
    ignored += [f"limits.{k}" for k, v in keep.items() if getattr(new.limits, k) != v]
    limits: LimitsConfig = replace(new.limits, **keep)
    effective = replace(new, **{s: getattr(old, s) for s in RESTART_SECTIONS}, limits=limits)
    return effective, tuple(ignored)


class Reloader:
    """Reloads ``path`` into a running gateway: on demand (SIGHUP) or when the file changes.

    ``host``/``port`` overrides given on the command line are not part of the file; ``listen``
    never reloads, so they stay in force.
    """

    def __init__(self, state: GatewayState, path: str | Path) -> None:
        self.state = state
        self.path = Path(path)
        self._stamp = self._stat()
        self._digest = self._hash()

    def reload(self, reason: str = "signal") -> bool:
        """Read, validate and apply the file; on any problem keep the running config."""
        self._stamp = self._stat()
        try:
            data = self.path.read_bytes()  # read once: the digest is of what is applied
            self._digest = hashlib.sha256(data).hexdigest()
            new = loads_config(data, str(self.path))
        except (OSError, ConfigError) as exc:
            self.state.stats.reload(ok=False)
            problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
            log.error(
                "config reload (%s) refused, keeping the running configuration: %s",
                reason,
                "; ".join(problems),
            )
            return False
        log.info("config reload (%s) from %s", reason, self.path)
        try:
            apply_config(self.state, new)
        except ConfigError as exc:
            self.state.stats.reload(ok=False)
            log.error("config reload (%s) refused: %s", reason, "; ".join(exc.problems))
            return False
        return True

    def changed(self) -> bool:
        """Whether the file's content differs from what was last loaded (cheap when the
        mtime and size have not moved)."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        digest = self._hash()
        return digest is not None and digest != self._digest

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload whenever the file's content changes; runs until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            if self.changed():
                self.reload("file changed")

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _hash(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None
