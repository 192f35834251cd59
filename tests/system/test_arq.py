"""Jobs through a real arq worker (burst mode) on a Redis of the test's own, on loopback.

The test starts its own redis-server on a free port, so it can stop and start it without
touching the machine's shared Redis.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import pytest_asyncio
from arq import Worker
from arq.connections import RedisSettings, create_pool
from starlette.applications import Starlette

from billing.models import LedgerEntry
from runtime.queue import ArqQueue
from tests.conftest import ROOT, Caller
from tests.support.gateways import free_port
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import AUTO_RECHARGE, CONSUME, grant, key
from workers.settings import cron_jobs, functions

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


class RedisServer:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture
async def arq_app(app: Starlette, redis_server: RedisServer) -> AsyncIterator[tuple[Any, Any]]:
    """The running app, its jobs going to our Redis (as with JOB_QUEUE=arq)."""
    services = app.state.services
    previous = services.queue
    arq_queue = await ArqQueue.connect(redis_server.url)
    services.queue = arq_queue
    ctx = {**previous.ctx, "queue": arq_queue}
    try:
        yield arq_queue, ctx
    finally:
        services.queue = previous
        await arq_queue.close()


async def run_worker_burst(redis_url: str, ctx: dict[str, Any]) -> None:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    worker = Worker(
        functions=functions(),
        redis_pool=pool,
        burst=True,
        handle_signals=False,
        ctx=dict(ctx),
        poll_delay=0.05,
        keep_result=60,
    )
    try:
        await worker.main()
    finally:
        await worker.close()
        await pool.aclose()


async def _setup(admin: Caller, staff: Caller, threshold: int) -> None:
    from tests.support.ops import add_card

    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    data = await admin.gql(
        AUTO_RECHARGE,
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": threshold,
                "rechargeCredits": 500,
            }
        },
    )
    assert data["updateAutoRecharge"]["errors"] == []


async def _spend(service: Caller) -> dict[str, Any]:
    data = await service.gql(
        CONSUME,
        {
            "input": {
                "accountId": service.account_id,
                "userId": "u1",
                "processType": "POSTCARD",
                "quantity": 1,
                "idempotencyKey": key(),
            }
        },
    )
    return cast("dict[str, Any]", data["consumeCredits"])


async def test_concurrent_crossings_through_a_real_arq_worker_charge_once(
    arq_app: tuple[Any, Any],
    redis_server: RedisServer,
    admin: Caller,
    service: Caller,
    staff: Caller,
    gateway: Any,
) -> None:
    arq_queue, ctx = arq_app
    await _setup(admin, staff, threshold=900)
    charges = gateway.charge_count
    results = await asyncio.gather(*(_spend(service) for _ in range(50)))
    assert all(r["errors"] == [] for r in results)
    # The job delivered twice more, as arq would after a worker died mid-job.
    for _ in range(2):
        await arq_queue.pool.enqueue_job("threshold_recharge", admin.account_id)
    await run_worker_burst(redis_server.url, ctx)
    assert gateway.charge_count == charges + 1
    entries = await LedgerEntry.filter(account_id=admin.account_id, type="AUTO_RECHARGE")
    assert [e.credits for e in entries] == [500]
    assert await assert_ledger_consistent(admin.account_id) == 1000 - 50 * 12 + 500


async def test_with_redis_down_spends_succeed_and_the_sweep_recharges_later(
    arq_app: tuple[Any, Any],
    redis_server: RedisServer,
    admin: Caller,
    service: Caller,
    staff: Caller,
) -> None:
    _, ctx = arq_app
    await _setup(admin, staff, threshold=990)
    redis_server.stop()
    results = await asyncio.gather(*(_spend(service) for _ in range(5)))
    assert all(r["errors"] == [] for r in results)  # Redis down: spends still land
    assert await LedgerEntry.filter(account_id=admin.account_id, type="AUTO_RECHARGE").count() == 0
    redis_server.start()
    # The cron's sweep, through the worker (as arq's cron would run it), twice.
    pool = await create_pool(RedisSettings.from_dsn(redis_server.url))
    try:
        for _ in range(2):
            await pool.enqueue_job("sweep")
            await run_worker_burst(redis_server.url, ctx)
    finally:
        await pool.aclose()
    entries = await LedgerEntry.filter(account_id=admin.account_id, type="AUTO_RECHARGE")
    assert [e.credits for e in entries] == [500]
    await assert_ledger_consistent(admin.account_id)


def test_worker_settings_register_every_job_and_cron() -> None:
    from runtime.cron import PERIODIC
    from workers.jobs import FUNCTIONS

    assert {f.name for f in functions()} == set(FUNCTIONS)
    assert {c.name for c in cron_jobs()} == {f"cron:{job.name}" for job in PERIODIC}
    assert {job.name for job in PERIODIC} <= set(FUNCTIONS)


async def test_the_in_process_ticker_runs_the_same_periodic_jobs() -> None:
    """The embedded default's ticker (runtime.cron) enqueues the list arq's cron runs: every
    job at the first tick, then each every ``minutes`` ticks; an enqueue that fails does not
    stop the others, and the ticker stops with its block."""
    from runtime.cron import PERIODIC, tick, ticking

    class Recording:
        def __init__(self) -> None:
            self.ids: list[str] = []
            self.enqueued = asyncio.Event()

        async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
            if function == "sweep":
                raise RuntimeError("Redis is down")
            self.ids.append(job_id)
            self.enqueued.set()
            return True

        async def close(self) -> None:
            return None

    queue = Recording()
    await tick(queue, 1)
    everyone_but_the_sweep = {job.name for job in PERIODIC} - {"sweep"}
    assert {i.split(":")[1] for i in queue.ids} == everyone_but_the_sweep
    queue.ids.clear()
    await tick(queue, 2)
    assert {i.split(":")[1] for i in queue.ids} == {
        job.name for job in PERIODIC if job.minutes == 1 and job.name != "sweep"
    }
    queue.ids.clear()
    queue.enqueued.clear()
    async with ticking(queue, 0.01):
        await asyncio.wait_for(queue.enqueued.wait(), timeout=10)
    stopped_at = len(queue.ids)
    await asyncio.sleep(0.05)
    assert len(queue.ids) == stopped_at


def test_app_with_job_queue_arq_sends_jobs_to_redis(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """JOB_QUEUE=arq as configured by environment, in a process of its own (an app's
    lifespan owns the ORM, so a second one can't run inside this test session)."""
    script = (
        "import asyncio\n"
        "from api.asgi import create_app\n"
        "from runtime.db import migrate\n"
        "from runtime.settings import get_settings\n"
        "from runtime.queue import ArqQueue\n"
        "async def main():\n"
        "    await migrate(get_settings().database_url)\n"
        "    app = create_app()\n"
        "    async with app.router.lifespan_context(app):\n"
        "        queue = app.state.services.queue\n"
        "        assert isinstance(queue, ArqQueue), queue\n"
        "        assert await queue.enqueue('sweep', job_id='probe')\n"
        "asyncio.run(main())\n"
    )
    env = {
        **os.environ,
        "JOB_QUEUE": "arq",
        "REDIS_URL": redis_server.url,
        "DATABASE_URL": f"sqlite://{tmp_path / 'arq.sqlite3'}",
        "CREDITS_JWT_SECRET": "x" * 40,
        "PERIODIC_SECONDS": "0",
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    keys = subprocess.run(
        ["redis-cli", "-p", str(redis_server.port), "keys", "arq:job:probe"],
        capture_output=True,
        text=True,
    ).stdout.split()
    assert keys == ["arq:job:probe"]


# ---------------------------------------------------------------- a real `python -m workers`


class WorkerProcess:
    """``python -m workers`` against a Redis and a database of the test's, on loopback."""

    def __init__(self, redis_url: str, database_url: str, logfile: Path) -> None:
        self.logfile = logfile
        self.env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "JOB_QUEUE": "arq",
            "PAYMENT_GATEWAY": "sandbox",
            "CREDITS_JWT_SECRET": "w" * 40,
            "LOG_FORMAT": "text",
            "SHUTDOWN_GRACE_SECONDS": "1",
        }
        self.env.pop("WORKER_METRICS_PORT", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """``kill -9``: no shutdown, no clean-up in Redis."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")


@pytest.fixture
def worker_process(
    redis_server: RedisServer, db_url: str, tmp_path: Path
) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(redis_server.url, db_url, tmp_path / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


async def _ran(redis_url: str, function: str, job_id: str, *args: Any) -> Any:
    """Enqueue a job and wait (bounded) for a worker to run it; returns its result."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        job = await pool.enqueue_job(function, *args, _job_id=job_id)
        assert job is not None, f"{job_id} was refused as a duplicate"
        return await job.result(timeout=60, poll_delay=0.1)
    finally:
        await pool.aclose()


async def test_the_worker_rides_out_a_redis_outage(
    redis_server: RedisServer, worker_process: WorkerProcess
) -> None:
    """Redis stops under a running worker: the worker keeps running (it used to exit at
    once), says so once, and runs jobs again by itself once Redis is back."""
    worker_process.start()
    assert await _ran(redis_server.url, "sweep", "probe-before") is not None
    redis_server.stop()
    for _ in range(30):  # a few seconds of outage: many failed polls
        await asyncio.sleep(0.1)
        assert worker_process.alive(), worker_process.log()[-3000:]
    redis_server.start()
    assert await _ran(redis_server.url, "sweep", "probe-after") is not None
    assert worker_process.alive()
    log = worker_process.log()
    assert log.count("Redis (arq worker) is unreachable") == 1, log[-3000:]
    assert "Redis (arq worker) is back" in log
    # ...and it runs the sweep at once, for the jobs nobody could queue meanwhile.
    for _ in range(100):  # bounded
        if "← sweep:after-outage:" in worker_process.log():
            break
        await asyncio.sleep(0.1)
    assert "← sweep:after-outage:" in worker_process.log(), worker_process.log()[-3000:]


async def test_a_job_whose_worker_was_killed_runs_again_within_seconds(
    backend: str,
    db_url: str,
    gateway_name: str,
    arq_app: tuple[Any, Any],
    redis_server: RedisServer,
    worker_process: WorkerProcess,
    admin: Caller,
    service: Caller,
    staff: Caller,
) -> None:
    """``kill -9`` of a worker in the middle of a recharge: arq keeps the job's in-progress
    key (it used to block that recharge for 310 s); the next worker sees that no live worker
    runs it, frees it, and the recharge lands once, within seconds."""
    if backend != "postgres":
        pytest.skip("stalls the job on a PostgreSQL row lock")
    if gateway_name != "sandbox":
        pytest.skip("the worker process charges through its own sandbox gateway")
    import asyncpg

    from billing.models import Payment

    await _setup(admin, staff, threshold=995)
    assert (await _spend(service))["errors"] == []  # 988: its recharge job waits in Redis
    holder = await asyncpg.connect(db_url.replace("postgres://", "postgresql://", 1))  # type: ignore[no-untyped-call]
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute(
            "SELECT 1 FROM credit_account WHERE id = $1 FOR NO KEY UPDATE", admin.account_id
        )
        worker_process.start()
        for _ in range(600):  # until the job waits for our lock (bounded)
            # (a transaction sees one snapshot of pg_stat_activity unless it clears it)
            await holder.execute("SELECT pg_stat_clear_snapshot()")
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'"
            )
            if waiting:
                break
            assert worker_process.alive(), worker_process.log()[-3000:]
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the recharge never started: " + worker_process.log()[-3000:])
        worker_process.kill()  # mid-job
        await lock.rollback()
    finally:
        await holder.close()
    in_progress = await arq_app[0].pool.keys("arq:in-progress:*")
    assert len(in_progress) == 1, in_progress  # what the killed worker left behind

    worker_process.start()  # a worker again (a supervisor's restart, or another replica)
    for _ in range(600):  # bounded: well under arq's in-progress expiry
        entries = await LedgerEntry.filter(account_id=admin.account_id, type="AUTO_RECHARGE")
        if entries:
            break
        assert worker_process.alive(), worker_process.log()[-3000:]
        await asyncio.sleep(0.1)
    assert [e.credits for e in entries] == [500], worker_process.log()[-3000:]
    assert "freed 1 job(s) whose worker died" in worker_process.log()
    payments = await Payment.filter(account_id=admin.account_id, kind="AUTO_RECHARGE")
    assert [p.status.value for p in payments] == ["SUCCEEDED"]
    assert await assert_ledger_consistent(admin.account_id) == 1000 - 12 + 500
