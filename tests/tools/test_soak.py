"""The soak run in its short form: real processes, faults, walk-aways; nothing leaks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tools.soak import SoakOptions, soak


async def test_short_soak_leaks_nothing_and_accounts_for_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the soak's files go
    result = await soak(
        SoakOptions(duration_s=15, concurrency=40, abandon_p=0.15, seed=3), log=lambda _: None
    )
    assert result["stuck"] == 0
    assert all(v == 0 for v in result["leaked"].values()), result["leaked"]
    assert result["unaccounted"] == {}, result
    assert result["client_errors"] == 0
    assert sum(result["abandoned"].values()) > 0  # walk-aways happened
    outcomes = result["gateway_outcomes"]
    assert sum(o.get("client_cancelled", 0) for o in outcomes.values()) > 0
    assert sum(o.get("ok", 0) for o in outcomes.values()) > 100
    assert result["ok"] is True
    assert os.listdir(tmp_path) == []  # its temporary directory is gone
