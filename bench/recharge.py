"""Benchmark 5: from the spend that crosses the threshold to the AUTO_RECHARGE entry,
with the real arq worker on Redis and the sandbox gateway (API and worker processes)."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import asyncpg
import httpx

from bench import common

ACCOUNTS = int(os.environ.get("BENCH_RECHARGE_ACCOUNTS", "100"))
REDIS_URL = common.REDIS_URL

CONSUME = """mutation($i: ConsumeCreditsInput!) { consumeCredits(input: $i) {
  balance errors { code } } }"""


async def seed(accounts: list[str]) -> None:
    conn = await asyncpg.connect(common.dsn())
    try:
        for a in accounts:
            await conn.execute(
                "INSERT INTO credit_account (id, balance, timezone, recharge_seq, created_at, "
                "gateway_customer_id, recharge_threshold) VALUES ($1, 110, 'UTC', 0, now(), "
                "'cus_sbx_bench', 100)",
                a,
            )
            await conn.execute(
                "INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, "
                "credits, balance_after, description) VALUES ($1, $2, now(), 'GRANT', "
                "'ADMINISTRATIVE', 110, 110, 'bench seed')",
                uuid.uuid4(),
                a,
            )
            await conn.execute(
                "INSERT INTO card (id, account_id, gateway_payment_method_id, brand, last4, "
                "exp_month, exp_year, is_primary, created_at) VALUES ($1, $2, "
                "'pm_sbx_visa_bench', 'visa', '4242', 12, 2034, true, now())",
                uuid.uuid4(),
                a,
            )
            await conn.execute(
                "INSERT INTO auto_recharge_setting (account_id, enabled, trigger, "
                "threshold_credits, recharge_credits, use_primary_card, notify, notify_emails, "
                "consecutive_failures, updated_at) VALUES ($1, true, 'THRESHOLD', 100, 1000, "
                "true, false, '[]', 0, now())",
                a,
            )
    finally:
        await conn.close()


async def latencies(accounts: list[str]) -> tuple[list[float], dict[str, int]]:
    conn = await asyncpg.connect(common.dsn())
    try:
        deadline = time.monotonic() + 60
        while True:
            rows = await conn.fetch(
                "SELECT account_id, EXTRACT(EPOCH FROM ("
                "min(created_at) FILTER (WHERE type = 'AUTO_RECHARGE') - "
                "min(created_at) FILTER (WHERE type = 'USAGE'))) AS seconds "
                "FROM ledger_entry WHERE account_id = ANY($1) GROUP BY account_id "
                "HAVING count(*) FILTER (WHERE type = 'AUTO_RECHARGE') > 0",
                accounts,
            )
            if len(rows) >= len(accounts) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        counts = await conn.fetch(
            "SELECT account_id, count(*) AS n FROM ledger_entry WHERE type = 'AUTO_RECHARGE' "
            "AND account_id = ANY($1) GROUP BY account_id",
            accounts,
        )
        return [float(r["seconds"]) for r in rows], {r["account_id"]: r["n"] for r in counts}
    finally:
        await conn.close()


async def spend_all(url: str, accounts: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:

        async def spend(a: str) -> None:
            for _ in range(3):  # three spends below the threshold: still one crossing
                r = await client.post(
                    "/graphql",
                    json={
                        "query": CONSUME,
                        "variables": {
                            "i": {
                                "accountId": a,
                                "userId": "u1",
                                "processType": "POSTCARD",
                                "quantity": 1,
                                "idempotencyKey": uuid.uuid4().hex,
                            }
                        },
                    },
                    headers={"Authorization": f"Bearer {common.token(a, 'SERVICE')}"},
                )
                assert r.json()["data"]["consumeCredits"]["errors"] == []
            await asyncio.sleep(0)

        for a in accounts:  # one crossing at a time, spread over a few seconds
            await spend(a)
            await asyncio.sleep(0.02)


def main() -> dict[str, Any]:
    common.run(common.fresh_database())
    common.run(common.flush_redis(REDIS_URL))
    accounts = [f"bench-recharge-{i:03d}" for i in range(ACCOUNTS)]
    common.run(seed(accounts))
    env = {"JOB_QUEUE": "arq", "REDIS_URL": REDIS_URL, "PAYMENT_GATEWAY": "sandbox"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "workers"],
        cwd=common.ROOT,
        env={
            **os.environ,
            **env,
            "DATABASE_URL": common.db_url(),
            "CREDITS_JWT_SECRET": common.SECRET,
            "LOG_LEVEL": "WARNING",
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with common.serve(workers=1, **env) as server:
            time.sleep(1.0)  # the worker connects
            common.run(spend_all(server.url, accounts))
            seconds, counts = common.run(latencies(accounts))
    finally:
        worker.send_signal(signal.SIGINT)
        worker.wait(timeout=20)
    seconds.sort()
    q = statistics.quantiles(seconds, n=100) if len(seconds) > 1 else seconds * 99
    once = sum(1 for a in accounts if counts.get(a) == 1)
    result = {
        "crossings": len(accounts),
        "recharged": len(seconds),
        "exactly_once": once,
        "p50_s": round(q[49], 3),
        "p95_s": round(q[94], 3),
        "max_s": round(seconds[-1], 3),
    }
    print(
        f"[recharge] {len(accounts)} crossings: p50 {result['p50_s']} s, p95 "
        f"{result['p95_s']} s, max {result['max_s']} s; exactly one recharge for "
        f"{once}/{len(accounts)}",
        flush=True,
    )
    return result


if __name__ == "__main__":
    main()
