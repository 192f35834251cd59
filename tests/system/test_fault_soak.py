"""The fault soak: the production shape under mixed load, one fault at a time.

Two API processes and one arq worker (``JOB_QUEUE=arq``) on a PostgreSQL cluster and a
redis-server of the test's own, on loopback; clients spend (and retry with the same key),
buy credits and read, spread over the two APIs as a load balancer would (a request whose
API is gone is sent to the other). The phases, each ``FAULT_SOAK_PHASE_SECONDS`` long:
calm, PostgreSQL restarted, Redis stopped (for half the phase), the worker killed
(``kill -9``) mid-job and started again, one API process killed and started again.

At the end, after every request that failed is retried with its key: reconciliation is
clean, the ledger holds exactly the spends clients were told about (once each), no
idempotency key is left claimed by a spend that never happened, no purchase is left
PENDING, each API's pool has every connection back, and its memory stopped growing.
It prints, per phase, the requests that failed and how long failures went on after the
fault ended (the README's figures).

CI runs a short version (8 s phases at 30 requests/s). The long run:
``FAULT_SOAK_PHASE_SECONDS=60 FAULT_SOAK_RATE=50 \\
    make test PYTEST_ARGS=tests/system/test_fault_soak.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from api.auth import issue_token
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import BACKEND, ROOT
from tests.support.gateways import free_port
from tests.system.test_arq import RedisServer, WorkerProcess
from tests.system.test_faults import PG_BIN, PrivatePostgres

PHASE = float(os.environ.get("FAULT_SOAK_PHASE_SECONDS", "8"))
RATE = float(os.environ.get("FAULT_SOAK_RATE", "30"))  # requests per second
ACCOUNTS = 6
SECRET = "fault-soak-secret-that-is-long-enough-0123"
PHASES = ("calm", "postgres restarted", "redis stopped", "worker killed", "api killed")

SPEND = (
    "mutation($i: ConsumeCreditsInput!) { consumeCredits(input: $i) { "
    "transaction { id credits } balance errors { code } } }"
)
PURCHASE = (
    "mutation($i: PurchaseCreditsInput!) { purchaseCredits(input: $i) { "
    "payment { id status } transaction { id } errors { code } } }"
)


def _token(account: str, *roles: Role) -> str:
    settings = Settings(credits_jwt_secret=SECRET, _env_file=None)
    return issue_token(settings, account_id=account, user_id="soak", roles=roles)


class Api:
    """``python -m api`` on loopback (no migrations: the soak applied them)."""

    def __init__(self, env: dict[str, str], logfile: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "PORT": str(self.port)}
        self.logfile = logfile
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "api", "--no-migrate"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.logfile.read_text()[-3000:]
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise KeyError("VmRSS")

    def pool(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.base}/metrics", timeout=30).text
        return {
            sample.labels["state"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "credits_db_pool_connections"
            for sample in family.samples
        }


@dataclass
class Spend:
    account: str
    variables: dict[str, Any]
    told: str | None = None  # the transaction id the client was told, once spent
    refused: bool = False
    failed: bool = False  # no answer, or an unexpected error: retried at the end


@dataclass
class Soak:
    apis: list[Api]
    accounts: list[str]
    service: dict[str, dict[str, str]]
    admin: dict[str, dict[str, str]]
    rng: random.Random = field(default_factory=lambda: random.Random(12))
    spends: list[Spend] = field(default_factory=list)
    purchases: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    failures: list[float] = field(default_factory=list)  # when a request failed
    refusals: list[float] = field(default_factory=list)  # when a spend was refused (no credits)
    mismatched_replays: int = 0

    async def post(
        self, client: httpx.AsyncClient, headers: dict[str, str], query: str, variables: Any
    ) -> dict[str, Any] | None:
        """The response body, or None when no API answered (a load balancer's retry on
        the other API included) or the answer was an unexpected failure."""
        order = self.rng.sample(self.apis, len(self.apis))
        for api in order:
            try:
                response = await client.post(
                    f"{api.base}/graphql",
                    json={"query": query, "variables": variables},
                    headers=headers,
                )
            except httpx.TransportError:
                continue  # that API is gone: the other one
            body: dict[str, Any] = response.json()
            if body.get("errors"):
                self.outcomes["error " + str(body["errors"][0].get("extensions", {}))] += 1
                return None
            return body
        self.outcomes["no api answered"] += 1
        return None

    async def spend(self, client: httpx.AsyncClient, spend: Spend) -> None:
        body = await self.post(client, self.service[spend.account], SPEND, spend.variables)
        if body is None:
            spend.failed = spend.told is None
            self.failures.append(time.monotonic())
            return
        result = body["data"]["consumeCredits"]
        if result["errors"]:
            spend.refused = True
            spend.failed = False
            self.outcomes["spend refused"] += 1
            self.refusals.append(time.monotonic())
            return
        transaction = result["transaction"]["id"]
        if spend.told is not None and spend.told != transaction:
            self.mismatched_replays += 1
        spend.told = transaction
        spend.failed = False
        self.outcomes["spent"] += 1

    async def one(self, client: httpx.AsyncClient) -> None:
        account = self.rng.choice(self.accounts)
        pick = self.rng.random()
        if pick < 0.1 and self.spends:  # a retry with the same key
            await self.spend(client, self.rng.choice(self.spends))
        elif pick < 0.65:
            spend = Spend(
                account,
                {
                    "i": {
                        "accountId": account,
                        "userId": "u1",
                        "processType": "POSTCARD",
                        "quantity": self.rng.randint(1, 3),
                        "idempotencyKey": uuid.uuid4().hex,
                    }
                },
            )
            self.spends.append(spend)
            await self.spend(client, spend)
        elif pick < 0.72:
            variables = {"i": {"credits": 100, "idempotencyKey": uuid.uuid4().hex}}
            self.purchases.append((account, variables))
            if await self.post(client, self.admin[account], PURCHASE, variables) is None:
                self.failures.append(time.monotonic())
        elif (
            await self.post(client, self.admin[account], "{ creditAccount { balance } }", {})
            is None
        ):
            self.failures.append(time.monotonic())


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "initdb").exists() or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL 15's server binaries are not installed")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    if BACKEND != "sqlite":
        pytest.skip("runs once, in the SQLite pass: its PostgreSQL is its own either way")
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="credits-soak-pg-"))
    if os.geteuid() == 0:
        shutil.chown(workdir, "postgres", "postgres")
    postgres = PrivatePostgres(workdir)
    try:
        postgres.init()
        postgres.start()
        yield postgres
    finally:
        if postgres.running():
            postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.mark.timeout(int(len(PHASES) * PHASE + 240))  # the phases, start-up and the checks
def test_the_production_shape_rides_out_each_fault(
    cluster: PrivatePostgres, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    env = {
        **os.environ,
        "DATABASE_URL": cluster.url + "?maxsize=8",
        "REDIS_URL": redis.url,
        "JOB_QUEUE": "arq",
        "PAYMENT_GATEWAY": "sandbox",
        "CREDITS_JWT_SECRET": SECRET,
        "LOG_LEVEL": "WARNING",
        "SHUTDOWN_GRACE_SECONDS": "1",
    }
    migrated = subprocess.run(
        [sys.executable, "-m", "api", "--migrate-only"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert migrated.returncode == 0, migrated.stderr
    apis = [Api(env, tmp_path / f"api-{i}.log") for i in range(2)]
    worker = WorkerProcess(redis.url, env["DATABASE_URL"], tmp_path / "worker.log")
    worker.env["CREDITS_JWT_SECRET"] = SECRET
    try:
        for api in apis:
            api.start()
        worker.start()
        soak, figures, memory = asyncio.run(_run(apis, worker, cluster, redis))
        assert worker.alive(), worker.log()[-3000:]  # it rode out the Redis outage
        checks = asyncio.run(_settle_and_check(soak, cluster))
        pools = [api.pool() for api in apis]
    finally:
        worker.stop()
        for api in apis:
            api.stop()
        redis.stop()
    with capsys.disabled():
        print(
            "\nfault soak: phase | failed requests | failures went on after the fault ended"
            " | spends refused for want of credits"
        )
        for line in figures:
            print("  " + line)
        print(f"  outcomes: {dict(soak.outcomes)}")
        print(f"  API memory (KiB) after warm-up, at the end: {memory}")
        print(f"  checks: {checks}; pools: {pools}")
    assert soak.outcomes["spent"] > 0
    assert soak.mismatched_replays == 0  # a retry with a key answers the first result
    assert checks["unsettled keys"] == 0, checks
    assert checks["pending purchases"] == 0, checks
    assert checks["ledger spends"] == checks["told spends"], checks
    assert checks["ledger credits"] == checks["told credits"], checks
    for pool in pools:
        assert pool["in_use"] == 0 and pool["max"] == 8, pools
    warm, end = memory
    assert end - warm < 40 * 1024, memory  # KiB, the API that was never killed
    done = subprocess.run(
        [sys.executable, "-m", "runtime.reconcile", "--no-stripe"],
        cwd=ROOT,
        env={**env, "DATABASE_URL": cluster.url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def _run(
    apis: list[Api], worker: WorkerProcess, postgres: PrivatePostgres, redis: RedisServer
) -> tuple[Soak, list[str], tuple[int, int]]:
    accounts = [f"soak-{uuid.uuid4().hex[:8]}" for _ in range(ACCOUNTS)]
    soak = Soak(
        apis,
        accounts,
        service={a: {"Authorization": f"Bearer {_token(a, Role.SERVICE)}"} for a in accounts},
        admin={a: {"Authorization": f"Bearer {_token(a, Role.ADMIN)}"} for a in accounts},
    )
    staff = {"Authorization": f"Bearer {_token('vendor', Role.BILLING_STAFF)}"}
    figures: list[str] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for a in accounts:
            for query, variables, headers in (
                (
                    'mutation { addCard(input: {paymentMethodId: "pm_card_visa"}) '
                    "{ errors { code } } }",
                    {},
                    soak.admin[a],
                ),
                (
                    "mutation($i: GrantCreditsInput!) { grantCredits(input: $i) "
                    "{ errors { code } } }",
                    {
                        "i": {
                            "accountId": a,
                            "credits": 3000,
                            "reason": "soak",
                            "idempotencyKey": uuid.uuid4().hex,
                        }
                    },
                    staff,
                ),
                (
                    "mutation { updateAutoRecharge(input: {enabled: true, trigger: THRESHOLD,"
                    " thresholdCredits: 1000, rechargeCredits: 2000}) { errors { code } } }",
                    {},
                    soak.admin[a],
                ),
            ):
                body = await soak.post(client, headers, query, variables)
                assert body is not None and not any(
                    v.get("errors") for v in body["data"].values()
                ), body
        warm = 0
        for phase in PHASES:
            failed_before, refused_before = len(soak.failures), len(soak.refusals)
            traffic = asyncio.create_task(_traffic(soak, client, PHASE))
            fault_ended = await _inject(phase, apis, worker, postgres, redis)
            await traffic
            if phase == "calm":
                warm = apis[0].rss_kib()
            failed = soak.failures[failed_before:]
            after = max((t - fault_ended for t in failed if t > fault_ended), default=0.0)
            refused = len(soak.refusals) - refused_before
            figures.append(f"{phase}: {len(failed)} | {after:.1f} s | {refused}")
    return soak, figures, (warm, apis[0].rss_kib())


async def _traffic(soak: Soak, client: httpx.AsyncClient, seconds: float) -> None:
    tasks = []
    start = time.monotonic()
    for i in range(int(seconds * RATE)):
        delay = start + i / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(soak.one(client)))
    await asyncio.gather(*tasks)


async def _inject(
    phase: str,
    apis: list[Api],
    worker: WorkerProcess,
    postgres: PrivatePostgres,
    redis: RedisServer,
) -> float:
    """Inject the phase's fault a moment into it; returns when the fault ended."""
    await asyncio.sleep(PHASE / 4)
    if phase == "postgres restarted":
        await asyncio.to_thread(postgres.stop)
        await asyncio.to_thread(postgres.start)
    elif phase == "redis stopped":
        await asyncio.to_thread(redis.stop)
        await asyncio.sleep(PHASE / 2)
        await asyncio.to_thread(redis.start)
    elif phase == "worker killed":
        worker.kill()  # whatever it was running: a spend left an account below its threshold
        await asyncio.sleep(1)
        worker.start()  # the supervisor
    elif phase == "api killed":
        apis[1].kill()
        await asyncio.sleep(1)
        await asyncio.to_thread(apis[1].start)
    return time.monotonic()


async def _settle_and_check(soak: Soak, postgres: PrivatePostgres) -> dict[str, int]:
    """Retry what failed (with its key), then compare the ledger with what clients were
    told."""
    async with httpx.AsyncClient(timeout=30) as client:
        for spend in soak.spends:
            for _ in range(20):
                if not spend.failed:
                    break
                await soak.spend(client, spend)
                if spend.failed:
                    await asyncio.sleep(0.5)
            assert not spend.failed, spend
        await asyncio.sleep(6)  # past purchases.RESETTLE_AFTER: a retry settles them
        for account, variables in soak.purchases:
            await soak.post(client, soak.admin[account], PURCHASE, variables)
    conn = await asyncpg.connect(postgres.url.replace("postgres://", "postgresql://", 1))  # type: ignore[no-untyped-call]
    try:
        ledger = await conn.fetchrow(
            "SELECT count(*) AS n, COALESCE(-sum(credits), 0) AS credits FROM ledger_entry "
            "WHERE type = 'USAGE'"
        )
        unsettled = await conn.fetchval(
            "SELECT count(*) FROM idempotency_record r WHERE r.operation = 'consumeCredits' "
            "AND r.result->>'entry_id' IS NOT NULL AND NOT EXISTS (SELECT 1 FROM ledger_entry "
            "e WHERE e.id = CAST(r.result->>'entry_id' AS uuid))"
        )
        pending = await conn.fetchval(
            "SELECT count(*) FROM payment WHERE kind = 'PURCHASE' AND status = 'PENDING'"
        )
        recharges = await conn.fetchval(
            "SELECT count(*) FROM ledger_entry WHERE type = 'AUTO_RECHARGE'"
        )
    finally:
        await conn.close()
    told = [s for s in soak.spends if s.told is not None]
    return {
        "ledger spends": int(ledger["n"]),
        "told spends": len(told),
        "ledger credits": int(ledger["credits"]),
        "told credits": sum(12 * int(s.variables["i"]["quantity"]) for s in told),
        "unsettled keys": int(unsettled),
        "pending purchases": int(pending),
        "auto-recharges": int(recharges),
    }
