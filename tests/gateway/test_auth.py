from __future__ import annotations

import hashlib

import pytest

from gateway.config import parse_config
from gateway.errors import Unauthorized
from gateway.server.auth import Authenticator

BACKENDS = [{"name": "b0", "url": "http://127.0.0.1:8000"}]


def _auth(**extra: object) -> Authenticator:
    return Authenticator(
        parse_config(
            {
                "backends": BACKENDS,
                "tenants": [
                    {"name": "a", "api_keys": ["key-a"]},
                    {"name": "b", "api_keys": ["sha256:" + hashlib.sha256(b"key-b").hexdigest()]},
                ],
                **extra,
            }
        )
    )


def test_raw_and_hashed_keys_map_to_their_tenant() -> None:
    auth = _auth()
    assert auth.tenant_for("Bearer key-a") == "a"
    assert auth.tenant_for("bearer  key-b ") == "b"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic key-a", "key-a", "Bearer key-a extra", "Bearer key-c"],
)
def test_missing_malformed_or_unknown_keys_are_401(header: str | None) -> None:
    with pytest.raises(Unauthorized) as info:
        _auth().tenant_for(header)
    assert info.value.status == 401
    assert "key-a" not in info.value.message


def test_anonymous_tenant_serves_keyless_requests() -> None:
    auth = _auth(auth={"anonymous_tenant": "a"})
    assert auth.tenant_for(None) == "a"
    assert auth.tenant_for("Bearer key-b") == "b"


def test_repeated_authorization_headers_are_refused() -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict([("Authorization", "Bearer key-a"), ("Authorization", "Bearer key-b")])
    with pytest.raises(Unauthorized, match="more than one"):
        _auth().authenticate(headers)
    assert _auth().authenticate(CIMultiDict([("Authorization", "Bearer key-b")])) == "b"


def test_tenant_header_is_ignored_unless_trusted() -> None:
    from multidict import CIMultiDict

    spoof = CIMultiDict([("X-Tenant", "b"), ("Authorization", "Bearer key-a")])
    assert _auth().authenticate(spoof) == "a"
    trusting = _auth(auth={"trusted_tenant_header": "X-Tenant"})
    assert trusting.authenticate(spoof) == "b"
    with pytest.raises(Unauthorized):
        trusting.authenticate(CIMultiDict([("X-Tenant", "ghost")]))


def test_undecodable_key_bytes_are_just_an_unknown_key() -> None:
    # aiohttp hands undecodable header bytes over as surrogate escapes
    with pytest.raises(Unauthorized):
        _auth().tenant_for("Bearer \udcff\udcfe")
