from __future__ import annotations

import pytest

from gateway.lab.workloads import arena_trace_path


@pytest.fixture
def arena_csv() -> str:
    path = arena_trace_path()
    if not path.is_file():
        pytest.skip(f"shared workloads not available at {path} (set VTC_SHARED_DIR)")
    return str(path)
