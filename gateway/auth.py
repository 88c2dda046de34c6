"""API key → tenant.

Keys are stored only as SHA-256 digests (a config may hold raw keys or ``sha256:<hex>``); a
presented key is hashed once and compared against every known digest with
:func:`hmac.compare_digest`, so neither the answer nor its timing depends on which stored key
(if any) shares a prefix with it. Keys never reach logs or metrics.
"""

from __future__ import annotations

import hashlib
import hmac

from .config import GatewayConfig
from .errors import Unauthorized


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self._entries: list[tuple[bytes, str]] = [
            (digest, t.name) for t in config.tenants for digest in t.key_digests()
        ]
        self._anonymous = config.auth.anonymous_tenant

    def tenant_for(self, authorization: str | None) -> str:
        """Tenant name for an ``Authorization`` header value; raises :class:`Unauthorized`."""
        key = _bearer(authorization)
        if key is not None:
            digest = hashlib.sha256(key.encode()).digest()
            found: str | None = None
            for stored, tenant in self._entries:  # no early exit: constant work per request
                if hmac.compare_digest(stored, digest):
                    found = tenant
            if found is not None:
                return found
        if self._anonymous is not None:
            return self._anonymous
        if key is None:
            raise Unauthorized(
                "missing API key: send 'Authorization: Bearer <key>'", param="authorization"
            )
        raise Unauthorized("invalid API key", param="authorization")


def _bearer(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or " " in value:
        return None
    return value
