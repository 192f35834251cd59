"""``python -m api`` as a person starts it (``make run``): a real process on loopback with
the embedded default (a SQLite file, the sandbox gateway), stopped when the block ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.conftest import ROOT, TEST_SECRET
from tests.support.gateways import free_port


def serve_embedded(database: Path, **env: str) -> Iterator[str]:
    """Start the server on a free loopback port with its SQLite file at ``database`` (and
    ``env`` over the defaults); yields its base URL once ``/healthz`` answers, and stops it
    with SIGINT (then SIGKILL after 15 s) when the generator is closed."""
    port = free_port()
    environ = {
        **os.environ,
        "DATABASE_URL": f"sqlite://{database}",
        "PORT": str(port),
        "CREDITS_JWT_SECRET": TEST_SECRET,
        "CREDITS_ENV": "development",
        "PAYMENT_GATEWAY": "sandbox",
        "LOG_LEVEL": "WARNING",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api"],
        cwd=ROOT,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(proc, base)
        yield base
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_healthy(proc: subprocess.Popen[str], base: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not start within {seconds:.0f} s")
        time.sleep(0.2)
