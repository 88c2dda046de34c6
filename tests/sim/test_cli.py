"""The CLI prints one listening line for --port 0 and serves."""

from __future__ import annotations

import selectors
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).parents[2]


def test_port_zero_prints_listening_line_and_serves() -> None:
    cmd = [
        sys.executable,
        "-m",
        "backends.sim",
        "--port",
        "0",
        "--speed",
        "0",
        "--profile",
        "a100-llama3-8b",
        "--max-num-seqs",
        "4",
    ]
    with subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + 30
            line = ""
            while not line and time.monotonic() < deadline:
                if sel.select(timeout=0.5):
                    line = proc.stdout.readline()
            sel.close()
            assert line.startswith("listening on http://127.0.0.1:"), line
            url = line.split()[-1]
            assert int(url.rsplit(":", 1)[1]) > 0
            with httpx.Client(base_url=url, timeout=10) as http:
                assert http.get("/health").status_code == 200
                r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 3})
                assert r.json()["usage"]["completion_tokens"] <= 3
                assert 'num_gpu_blocks="28125"' in http.get("/metrics").text
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        assert proc.returncode in (0, -15)
        assert proc.stdout is not None
        assert proc.stdout.read() == ""  # exactly one stdout line


def test_bad_flag_exits_2() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "backends.sim", "--fault", "explode"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "unknown fault kind" in r.stderr
