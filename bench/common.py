"""What the benchmarks share: a PostgreSQL database of their own, the app under uvicorn on
loopback, signed tokens, and runners for wrk and pgbench (C load generators, so the load's
own CPU does not decide the result)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
BENCH_DB = os.environ.get("BENCH_DB", "credits_bench")
SECRET = "bench-secret-that-is-long-enough-0123456789"
DURATION = int(os.environ.get("BENCH_SECONDS", "10"))
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
# The benchmarks' own Redis database (the tests use 0 and 1); flushed before each use.
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


def db_url(name: str = BENCH_DB, pool: int = 20) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0]
    return f"{base}/{name}?minsize=2&maxsize={pool}"


def dsn(name: str = BENCH_DB) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgres://", "postgresql://", 1)
    return f"{base}/{name}"


def need(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        print(f"{tool} is missing: apt-get install -y {package}", file=sys.stderr)
        raise SystemExit(2)
    return path


async def connect(url: str | None = None) -> asyncpg.Connection:
    """A connection of the benchmark's own; PostgreSQL's slots are shared with whatever else
    runs on the machine, so a full server is waited out (up to a minute), not a failure."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await asyncpg.connect(url or dsn())
        except asyncpg.TooManyConnectionsError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def fresh_database(name: str = BENCH_DB) -> None:
    """Drop and recreate the benchmark database and apply the migrations."""
    from runtime.db import migrate

    admin = await asyncpg.connect(PG_ADMIN.replace("postgres://", "postgresql://", 1))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    await migrate(db_url(name).split("?")[0])


async def seed_accounts(accounts: list[str], credits: int) -> None:
    """Accounts with a balance and the GRANT entry that explains it (ledger sum holds)."""
    conn = await connect()
    try:
        await conn.executemany(
            "INSERT INTO credit_account (id, balance, timezone, recharge_seq, created_at) "
            "VALUES ($1, $2, 'UTC', 0, now())",
            [(a, credits) for a in accounts],
        )
        await conn.executemany(
            "INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits, "
            "balance_after, description) VALUES ($1, $2, now() - interval '1 day', 'GRANT', "
            "'ADMINISTRATIVE', $3, $3, 'bench seed')",
            [(uuid.uuid4(), a, credits) for a in accounts],
        )
    finally:
        await conn.close()


async def ledger_check(accounts: list[str]) -> tuple[bool, int]:
    """(every balance == sum of its entries and >= 0, number of entries)."""
    conn = await connect()
    try:
        bad = await conn.fetchval(
            "SELECT count(*) FROM credit_account a WHERE a.id = ANY($1::text[]) AND "
            "(a.balance < 0 OR a.balance <> (SELECT COALESCE(SUM(credits), 0) "
            "FROM ledger_entry e WHERE e.account_id = a.id))",
            accounts,
        )
        n = await conn.fetchval(
            "SELECT count(*) FROM ledger_entry WHERE account_id = ANY($1::text[])", accounts
        )
        return bad == 0, int(n)
    finally:
        await conn.close()


def token(account: str, *roles: str, user: str = "bench") -> str:
    from api.auth import issue_token
    from runtime.settings import Settings

    settings = Settings(credits_jwt_secret=SECRET, _env_file=None)  # type: ignore[call-arg]
    return issue_token(
        settings, account_id=account, user_id=user, roles=roles or ("SERVICE",), ttl_seconds=3600
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def flush_redis(url: str = REDIS_URL) -> None:
    """Job ids repeat from run to run (same accounts): start from an empty Redis db."""
    from redis.asyncio import Redis

    redis = Redis.from_url(url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]

    def pids(self) -> list[int]:
        """The server's process and its descendants (uvicorn's worker processes)."""
        return process_tree(self.proc.pid)

    def api_processes(self) -> int:
        """Processes serving requests: uvicorn's workers, or the server itself."""
        spawned = sum(
            1 for pid in self.pids()[1:] if b"spawn_main" in _read(f"/proc/{pid}/cmdline")
        )
        return spawned or 1

    def cpu_seconds(self) -> float:
        """User + system CPU seconds used so far by the server's processes."""
        return sum(cpu_seconds(pid) for pid in self.pids())


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree = [root]
    for pid in tree:
        tree.extend(child for child, parent in parents.items() if parent == pid)
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process from /proc/<pid>/stat (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # fields[0] is the state (field 3): utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def arq_worker(**env: str) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m workers`` on the benchmark database and the given Redis."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=ROOT,
        env={
            **os.environ,
            "DATABASE_URL": db_url(pool=4),
            "CREDITS_JWT_SECRET": SECRET,
            "LOG_LEVEL": "WARNING",
            "JOB_QUEUE": "arq",
            "REDIS_URL": REDIS_URL,
            "PAYMENT_GATEWAY": "sandbox",
            **env,
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(workers: int | None = 1, pool: int = 20, **env: str) -> Iterator[Server]:
    """The app under uvicorn on loopback (no migrations: the database is ready).
    ``workers=None``: as many processes as WEB_CONCURRENCY says (pass it in ``env``)."""
    port = free_port()
    environ = {
        **os.environ,
        "DATABASE_URL": db_url(pool=pool),
        "CREDITS_JWT_SECRET": SECRET,
        "PORT": str(port),
        "LOG_LEVEL": "WARNING",
        "PERIODIC_SECONDS": "0",
        "PYTHONUNBUFFERED": "1",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "api", "--no-migrate"]
        + ([] if workers is None else ["--workers", str(workers)]),
        cwd=ROOT,
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "died")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the app did not start")
            time.sleep(0.2)
        yield Server(url, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wrk(
    url: str,
    script: str,
    *,
    connections: int = CONNECTIONS,
    seconds: int = DURATION,
    threads: int = 2,
) -> dict[str, float]:
    """Run wrk with a Lua script; return requests/s and latency percentiles (ms)."""
    need("wrk", "wrk")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    done = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "--latency",
            "-s",
            fh.name,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    os.unlink(fh.name)
    out = done.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    result = {
        "rps": rps,
        "requests": float(total.group(1)) if total else 0.0,
        "non_2xx": float(errors.group(1)) if errors else 0.0,
    }
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        if m:
            scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            result[f"p{pct}_ms"] = float(m.group(1)) * scale
    bad = re.search(r"status (\d+) seen", out)
    if "errors" in out.lower() and "Socket errors" in out:
        result["socket_errors"] = 1.0
    if bad:
        result["bad_status"] = float(bad.group(1))
    return result


def pgbench(
    script: str,
    *,
    clients: int = CONNECTIONS,
    seconds: int = DURATION,
    defines: dict[str, str] | None = None,
) -> float:
    """Run pgbench with a custom script; return transactions per second."""
    need("pgbench", "postgresql-client")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as fh:
        fh.write(script)
    args = [
        "pgbench",
        "-n",
        "-c",
        str(clients),
        "-j",
        "2",
        "-T",
        str(seconds),
        "-f",
        fh.name,
        "-h",
        "127.0.0.1",
        "-U",
        "postgres",
    ]
    for k, v in (defines or {}).items():
        args += ["-D", f"{k}={v}"]
    done = subprocess.run([*args, BENCH_DB], capture_output=True, text=True, timeout=seconds + 60)
    os.unlink(fh.name)
    m = re.search(r"tps = ([\d.]+)", done.stdout)
    if m is None:
        raise RuntimeError(done.stdout + done.stderr)
    return float(m.group(1))


def lua_string(value: str) -> str:
    return json.dumps(value)


def run(coro: Any) -> Any:
    return asyncio.run(coro)
