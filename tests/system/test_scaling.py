"""Scaling out on existing engines: more API processes and arq workers on one database and
one Redis, started as real processes on loopback.

- ``WEB_CONCURRENCY`` gives ``python -m api`` that many uvicorn worker processes, as it does
  uvicorn; ``--workers`` wins over it.
- Two API processes (each its own ``python -m api`` on its own port) and two arq workers
  (``python -m workers``) on the suite's database and a Redis of the test's own: spends
  spread over both API processes cross an auto-recharge threshold and exactly one recharge
  is charged (sandbox gateway); a live-balance subscriber on one process sees a spend made
  through the other, and the recharge the workers commit.

Nothing here waits a fixed time: every wait polls for a state, with a generous bound.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from redis.asyncio import Redis
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Subprotocol

from api.auth import issue_token
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, Caller
from tests.support.gateways import free_port
from tests.support.ops import ADD_CARD, AUTO_RECHARGE, CONSUME, GRANT, key

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)

#: Bound on every wait for another process (start-up, a job, an event): generous on a
#: loaded machine, never a timing assertion.
WAIT = 60.0

SUBSCRIPTION = """subscription { creditBalanceChanged { balance
  transaction { id type credits balanceAfter } } }"""


def _env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "CREDITS_JWT_SECRET": TEST_SECRET,
        "CREDITS_ENV": "development",
        "PAYMENT_GATEWAY": "sandbox",
        "PERIODIC_SECONDS": "0",
        "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "text",
        "SHUTDOWN_GRACE_SECONDS": "2",
        **extra,
    }
    for name in ("WEB_CONCURRENCY", "WORKER_METRICS_PORT"):
        if name not in extra:
            env.pop(name, None)
    return env


class Process:
    """A child process of the test, its output in a file; stopped with SIGTERM (then
    SIGKILL), whatever happened."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class Api(Process):
    """``python -m api --no-migrate`` on a free loopback port."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}/graphql"
        super().__init__(
            [sys.executable, "-m", "api", "--no-migrate", *args],
            {**env, "PORT": str(self.port)},
            log,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            assert self.proc.poll() is None, f"the API exited:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"the API did not start:\n{self.output()}"
            time.sleep(0.1)

    def worker_processes(self) -> list[int]:
        """uvicorn's worker processes (children started by multiprocessing's spawn)."""
        children = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent == self.proc.pid and b"spawn_main" in cmdline:
                children.append(int(entry.name))
        return children


# ---------------------------------------------------------------- WEB_CONCURRENCY


def _workers_serving(api: Api, expected: int) -> list[int]:
    """Poll until ``expected`` uvicorn worker processes run (each imports the app first)."""
    deadline = time.monotonic() + WAIT
    while len(found := api.worker_processes()) != expected:
        assert time.monotonic() < deadline, (found, api.output())
        time.sleep(0.1)
    return found


def test_web_concurrency_starts_that_many_worker_processes(db_url: str, tmp_path: Path) -> None:
    api = Api(_env(DATABASE_URL=db_url, WEB_CONCURRENCY="2"), tmp_path / "api.log")
    try:
        api.wait_ready()
        workers = _workers_serving(api, 2)
        # The server answers on fresh connections (either process may take each), and
        # the same two processes are still there afterwards.
        with httpx.Client(timeout=10) as client:
            for _ in range(20):
                assert client.get(f"{api.url}/healthz").status_code == 200
        assert sorted(api.worker_processes()) == sorted(workers)
    finally:
        api.stop()
    assert api.proc.returncode in (0, -signal.SIGTERM), api.output()
    # With the in-process queue (and on SQLite), what does not scale out is named.
    backend = "SQLite" if db_url.startswith("sqlite://") else "PostgreSQL"
    assert f"2 API processes on {backend} with JOB_QUEUE=inprocess" in api.output()


def test_the_workers_flag_wins_over_web_concurrency(db_url: str, tmp_path: Path) -> None:
    api = Api(
        _env(DATABASE_URL=db_url, WEB_CONCURRENCY="2"), tmp_path / "api.log", "--workers", "1"
    )
    try:
        api.wait_ready()
        # One worker: uvicorn serves in the process itself, spawning nothing.
        assert api.worker_processes() == []
    finally:
        api.stop()


# ---------------------------------------------------------------- two APIs, two workers


class RedisServer(Process):
    """A redis-server of the test's own on a free port (nothing shared with other tests)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
            ],
            dict(os.environ),
            workdir / "redis.log",
        )
        deadline = time.monotonic() + WAIT
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            assert self.proc.poll() is None, self.output()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)


class Stand:
    def __init__(self, redis: RedisServer, apis: list[Api], workers: list[Process]) -> None:
        self.redis = redis
        self.apis = apis
        self.workers = workers

    def logs(self) -> str:
        return "\n".join(p.output()[-3000:] for p in [*self.apis, *self.workers])


@pytest.fixture
def stand(db_url: str, tmp_path: Path) -> Iterator[Stand]:
    """Redis, two API processes and two arq workers, all on the suite's database."""
    if db_url.startswith("sqlite://"):
        pytest.skip(
            "scaling out needs PostgreSQL: SQLite takes one writer, and writers in other "
            "processes fail with 'database is locked' (run with TEST_BACKEND=postgres)"
        )
    started: list[Process] = []
    try:
        redis = RedisServer(tmp_path)
        started.append(redis)
        env = _env(DATABASE_URL=db_url, JOB_QUEUE="arq", REDIS_URL=redis.url)
        apis = [Api(env, tmp_path / f"api-{n}.log") for n in "ab"]
        started += apis
        workers = [
            Process([sys.executable, "-m", "workers"], env, tmp_path / f"worker-{n}.log")
            for n in "ab"
        ]
        started += workers
        for api in apis:
            api.wait_ready()
        yield Stand(redis, apis, workers)
    finally:
        for process in reversed(started):
            process.stop()


def _token(account: str, role: Role, user: str) -> str:
    settings = Settings(credits_jwt_secret=TEST_SECRET, _env_file=None)
    return issue_token(
        settings, account_id=account, user_id=user, roles=[role], email=f"{user}@example.com"
    )


@pytest_asyncio.fixture
async def clients(stand: Stand) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with (
        httpx.AsyncClient(base_url=stand.apis[0].url, timeout=WAIT) as a,
        httpx.AsyncClient(base_url=stand.apis[1].url, timeout=WAIT) as b,
    ):
        yield [a, b]


async def _rows(db_url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the shared database directly (the processes under test own the ORM)."""
    if db_url.startswith("sqlite://"):
        with sqlite3.connect(db_url.removeprefix("sqlite://")) as conn:
            qmarks = sql.replace("$1", "?")
            return [tuple(r) for r in conn.execute(qmarks, args).fetchall()]
    conn = await asyncpg.connect(db_url.replace("postgres://", "postgresql://", 1))  # type: ignore[no-untyped-call]
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def _queue_busy(redis_url: str) -> list[str]:
    """The arq jobs due or running now, cron's aside (none: nothing left to run)."""
    redis = Redis.from_url(redis_url)
    try:
        now_ms = int(time.time() * 1000)
        due = await redis.zrangebyscore("arq:queue", "-inf", now_ms)
        running = [k async for k in redis.scan_iter(match="arq:in-progress:*")]
        # A cron run keeps its in-progress key as a lock until it expires: not a job.
        return [k.decode() for k in [*due, *running] if b":cron:" not in k]
    finally:
        await redis.aclose()


class Feed:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def next(self) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            message = json.loads(await self.ws.recv())
        assert message["type"] == "next" and message["id"] == "1", message
        assert "errors" not in message["payload"], message
        event: dict[str, Any] = message["payload"]["data"]["creditBalanceChanged"]
        return event

    async def until(self, predicate: Any) -> dict[str, Any]:
        while not predicate(event := await self.next()):
            pass
        return event


async def _subscribe(url: str, token: str) -> tuple[ClientConnection, Feed]:
    ws = await connect(url, subprotocols=[Subprotocol("graphql-transport-ws")])
    await ws.send(
        json.dumps({"type": "connection_init", "payload": {"authorization": f"Bearer {token}"}})
    )
    async with asyncio.timeout(WAIT):
        assert json.loads(await ws.recv())["type"] == "connection_ack"
    await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": SUBSCRIPTION}}))
    return ws, Feed(ws)


async def test_two_api_processes_and_two_workers_share_one_database_and_redis(
    stand: Stand, clients: list[httpx.AsyncClient], db_url: str
) -> None:
    account = f"scale-{key()[:8]}"
    admin = [Caller(c, _token(account, Role.ADMIN, "admin-1"), account, "admin-1") for c in clients]
    service = [Caller(c, _token(account, Role.SERVICE, "svc-1"), account, "svc-1") for c in clients]
    staff = Caller(clients[1], _token("vendor", Role.BILLING_STAFF, "staff-1"), "vendor", "staff-1")

    # Set up through both processes: a card (A), funds (B), auto-recharge (A).
    card = await admin[0].gql(ADD_CARD, {"pm": "pm_card_visa", "primary": True})
    assert card["addCard"]["errors"] == [], card
    granted = await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": account,
                "credits": 1000,
                "reason": "scaling test",
                "idempotencyKey": key(),
            }
        },
    )
    assert granted["grantCredits"]["errors"] == [], granted
    setting = await admin[0].gql(
        AUTO_RECHARGE,
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": 500,
                "rechargeCredits": 1000,
            }
        },
    )
    assert setting["updateAutoRecharge"]["errors"] == [], setting

    async def spend(through: int) -> dict[str, Any]:
        data = await service[through].gql(
            CONSUME,
            {
                "input": {
                    "accountId": account,
                    "userId": "u1",
                    "processType": "POSTCARD",  # 12 credits
                    "quantity": 1,
                    "idempotencyKey": key(),
                }
            },
        )
        payload: dict[str, Any] = data["consumeCredits"]
        assert payload["errors"] == [], payload
        return payload

    ws, feed = await _subscribe(stand.apis[0].ws, admin[0].token)  # on process A
    try:
        assert (await feed.next())["balance"] == 1000  # listening
        # A spend through process B is seen by the subscriber on process A.
        spent = await spend(1)
        seen = await feed.next()
        assert seen["transaction"]["id"] == spent["transaction"]["id"]
        assert seen == {
            "balance": 988,
            "transaction": {
                "id": spent["transaction"]["id"],
                "type": "USAGE",
                "credits": -12,
                "balanceAfter": 988,
            },
        }

        # 59 more spends, concurrently, alternating between the processes: the balance
        # falls from 988 to 280, crossing the threshold (500) once, with 18 more spends
        # below it, each of which may enqueue the recharge again.
        results = await asyncio.gather(*(spend(n % 2) for n in range(59)))
        assert sorted(r["balance"] for r in results)[0] == 1000 - 60 * 12

        # The workers charge the card once; process A's subscriber sees the recharge.
        recharge = await feed.until(
            lambda e: e["transaction"] is not None and e["transaction"]["type"] == "AUTO_RECHARGE"
        )
        assert recharge["transaction"]["credits"] == 1000
    finally:
        await ws.close()

    # Nothing left to run (every enqueued recharge has been taken and finished) ...
    deadline = time.monotonic() + WAIT
    while busy := await _queue_busy(stand.redis.url):
        assert time.monotonic() < deadline, f"jobs still queued: {busy}\n{stand.logs()}"
        await asyncio.sleep(0.2)
    # ... and exactly one recharge was charged and credited.
    payments = await _rows(
        db_url, "SELECT kind, status, credits FROM payment WHERE account_id = $1", account
    )
    assert payments == [("AUTO_RECHARGE", "SUCCEEDED", 1000)], payments
    recharges = await _rows(
        db_url,
        "SELECT credits FROM ledger_entry WHERE account_id = $1 AND type = 'AUTO_RECHARGE'",
        account,
    )
    assert recharges == [(1000,)], recharges
    balance = await _rows(db_url, "SELECT balance FROM credit_account WHERE id = $1", account)
    total = await _rows(
        db_url, "SELECT sum(credits) FROM ledger_entry WHERE account_id = $1", account
    )
    assert balance == total == [(1000 - 60 * 12 + 1000,)], (balance, total)
    for process in [*stand.apis, *stand.workers]:
        assert process.proc.poll() is None, process.output()
