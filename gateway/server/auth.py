"""API key → tenant.

``Authorization: Bearer <key>`` is the only way to name a tenant, unless the config sets
``auth.trusted_tenant_header`` (for a gateway behind an authenticating proxy that sets that
header); otherwise such headers are ignored, so no client can pick its own tenant. A request
with more than one ``Authorization`` header is refused: which one counts would be ambiguous.

Keys are stored only as SHA-256 digests (a config may hold raw keys or ``sha256:<hex>``); a
presented key is hashed once and compared against every known digest with
:func:`hmac.compare_digest`, so neither the answer nor its timing depends on which stored key
(if any) shares a prefix with it. Keys never reach logs or metrics.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from typing import Any

from ..config import GatewayConfig
from ..errors import Unauthorized


class Authenticator:
    def __init__(self, config: GatewayConfig) -> None:
        self._entries: list[tuple[bytes, str]] = [
            (digest, t.name) for t in config.leaves() for digest in t.key_digests()
        ]
        self._anonymous = config.auth.anonymous_tenant
        self._trusted_header = config.auth.trusted_tenant_header
        self._tenants = frozenset(t.name for t in config.leaves())

    def authenticate(self, headers: Mapping[str, str] | Any) -> str:
        """Tenant for a request's headers (a multidict); raises :class:`Unauthorized`."""
        if self._trusted_header is not None:
            named = headers.get(self._trusted_header)
            if named is not None:
                if named not in self._tenants:
                    raise Unauthorized("unknown tenant in the trusted tenant header")
                return str(named)
        getall = getattr(headers, "getall", None)
        values = (
            getall("Authorization", [])
            if getall is not None
            else ([headers["Authorization"]] if "Authorization" in headers else [])
        )
        if len(values) > 1:
            raise Unauthorized("more than one Authorization header", param="authorization")
        return self.tenant_for(values[0] if values else None)

    def tenant_for(self, authorization: str | None) -> str:
        """Tenant name for an ``Authorization`` header value; raises :class:`Unauthorized`."""
        key = _bearer(authorization)
        if key is not None:
            digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
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
