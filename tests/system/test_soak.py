"""A bounded soak: mixed traffic at a steady rate against uvicorn on loopback.

No request fails, the server's memory and open file descriptors stop growing once it is
warm, and reconciliation is clean at the end. CI runs it briefly (SOAK_SECONDS, default
20); the long run is
`SOAK_SECONDS=300 SOAK_RATE=100 make test PYTEST_ARGS=tests/system/test_soak.py`.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.auth import issue_token
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import ROOT, TEST_SECRET
from tests.support.gateways import free_port

SECONDS = float(os.environ.get("SOAK_SECONDS", "20"))
RATE = float(os.environ.get("SOAK_RATE", "40"))  # requests per second
ACCOUNTS = 5


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _token(account: str, *roles: Role, user: str = "soak") -> str:
    settings = Settings(credits_jwt_secret=TEST_SECRET, _env_file=None)
    return issue_token(
        settings, account_id=account, user_id=user, roles=roles, email=f"{user}@example.com"
    )


@pytest.fixture
def server(tmp_path: Path, gateway_name: str) -> tuple[str, int, dict[str, str]]:  # type: ignore[misc]
    if gateway_name != "sandbox":
        pytest.skip("one soak is enough: the gateway is not what it measures")
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite://{tmp_path / 'soak.sqlite3'}",
        "PORT": str(port),
        "CREDITS_JWT_SECRET": TEST_SECRET,
        "CREDITS_ENV": "development",
        "PAYMENT_GATEWAY": "sandbox",
        "LOG_LEVEL": "WARNING",
        "PERIODIC_SECONDS": "5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    try:
        yield base, proc.pid, env
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _traffic(base: str, pid: int) -> tuple[Counter[str], list[tuple[int, int]]]:
    accounts = [f"soak-{uuid.uuid4().hex[:8]}" for _ in range(ACCOUNTS)]
    admin = {a: {"Authorization": f"Bearer {_token(a, Role.ADMIN)}"} for a in accounts}
    service = {a: {"Authorization": f"Bearer {_token(a, Role.SERVICE)}"} for a in accounts}
    outcomes: Counter[str] = Counter()
    samples: list[tuple[int, int]] = []
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:

        async def gql(
            headers: dict[str, str], query: str, variables: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            r = await client.post(
                "/graphql", json={"query": query, "variables": variables or {}}, headers=headers
            )
            outcomes[f"http {r.status_code}"] += 1
            body = r.json()
            if body.get("errors"):
                outcomes["graphql error"] += 1
            return body.get("data") or {}

        for a in accounts:  # a card, credits and auto-recharge for each account
            await gql(
                admin[a],
                'mutation { addCard(input: {paymentMethodId: "pm_card_visa"}) '
                "{ errors { code } } }",
            )
            await gql(
                admin[a],
                "mutation($k: String!) { purchaseCredits(input: {credits: 2000, "
                "idempotencyKey: $k}) { errors { code } } }",
                {"k": key()},
            )
            await gql(
                admin[a],
                "mutation { updateAutoRecharge(input: {enabled: true, "
                "trigger: THRESHOLD, thresholdCredits: 500, rechargeCredits: "
                "1000}) { errors { code } } }",
            )

        async def one() -> None:
            a = rng.choice(accounts)
            pick = rng.random()
            if pick < 0.6:
                data = await gql(
                    service[a],
                    "mutation($i: ConsumeCreditsInput!) { "
                    "consumeCredits(input: $i) { errors { code } } }",
                    {
                        "i": {
                            "accountId": a,
                            "userId": "u1",
                            "processType": rng.choice(
                                ["POSTCARD", "SMART_MATCH", "PROSPECT_SEARCH"]
                            ),
                            "quantity": rng.randint(1, 3),
                            "idempotencyKey": key(),
                        }
                    },
                )
                codes = [e["code"] for e in data.get("consumeCredits", {}).get("errors", [])]
                outcomes["spend refused" if codes else "spend"] += 1
            elif pick < 0.8:
                await gql(
                    admin[a],
                    "{ creditAccount { balance transactions(first: 25) { "
                    "edges { node { id credits } } } } }",
                )
            elif pick < 0.9:
                await gql(
                    admin[a],
                    "{ creditAccount { balance cards { last4 } autoRecharge { "
                    "enabled pausedReason } freeQuotas { used } } }",
                )
            else:
                r = await client.get("/reports/transactions.csv", headers=admin[a])
                outcomes[f"http {r.status_code}"] += 1

        tasks = []
        start = time.monotonic()
        total = int(SECONDS * RATE)
        for i in range(total):
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
            if i % max(1, total // 12) == 0:
                samples.append((_kib(pid, "VmRSS"), _fds(pid)))
        await asyncio.gather(*tasks)
        samples.append((_kib(pid, "VmRSS"), _fds(pid)))
    outcomes["accounts:" + ",".join(accounts)] = 1
    return outcomes, samples


def key() -> str:
    return uuid.uuid4().hex


def test_mixed_traffic_holds(server: tuple[str, int, dict[str, str]]) -> None:
    base, pid, env = server
    outcomes, samples = asyncio.run(_traffic(base, pid))
    accounts = next(k for k in outcomes if k.startswith("accounts:")).split(":", 1)[1]
    assert not [k for k in outcomes if k.startswith("http ") and k != "http 200"], outcomes
    assert outcomes["graphql error"] == 0, outcomes
    assert outcomes["spend"] > 0, outcomes
    # Warm after the first third: from there, memory and descriptors stay put.
    warm = samples[len(samples) // 3]
    peak_rss = max(rss for rss, _ in samples[len(samples) // 3 :])
    peak_fds = max(fds for _, fds in samples[len(samples) // 3 :])
    assert peak_rss - warm[0] < 30 * 1024, samples  # KiB
    assert peak_fds - warm[1] <= 40, samples
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.reconcile",
            "--no-stripe",
            *[x for a in accounts.split(",") for x in ("--account", a)],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
