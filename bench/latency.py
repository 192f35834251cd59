"""Benchmark 4: latency of the balance and of history pages, 10,000 vs 1,000,000 entries.

Each query is sent at a steady 100 requests per second for a few seconds from a light
asyncio client; p50/p95/p99 are reported, and for every query the ratio of its p95 on
the 1,000,000-entry account to its p95 on the 10,000-entry one.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg
import httpx

from bench import common

SMALL, LARGE = "bench-10k", "bench-1m"
SIZES = {SMALL: 10_000, LARGE: int(os.environ.get("BENCH_LARGE_ENTRIES", "1000000"))}
RATE = 100
SECONDS = float(os.environ.get("BENCH_LATENCY_SECONDS", "3"))

HISTORY = """query($f: TransactionFilter, $after: String) { creditAccount {
  transactions(first: 25, filter: $f, after: $after) {
    edges { cursor node { id createdAt type processType credits balanceAfter description } }
    pageInfo { hasNextPage endCursor } } } }"""

SEED_SQL = """
INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits,
                          balance_after, quantity, user_id, description, reference)
SELECT gen_random_uuid(), $1, $3::timestamptz - (($2 - g) * interval '1 second'),
       CASE WHEN g = 1 THEN 'GRANT' WHEN g % 50 = 0 THEN 'PURCHASE' ELSE 'USAGE' END,
       CASE WHEN g = 1 THEN 'ADMINISTRATIVE' WHEN g % 50 = 0 THEN 'MANUAL_PURCHASE'
            ELSE (ARRAY['POSTCARD','HANDWRITTEN_LETTER','PROSPECT_SEARCH',
                        'ADVANCED_EMAIL_TEST'])[1 + g % 4] END,
       CASE WHEN g = 1 THEN 10000000 WHEN g % 50 = 0 THEN 100 ELSE -1 END,
       10000000 + (g / 50) * 101 - g + 1,
       1, 'user-' || (g % 20),
       CASE WHEN g % 1000 = 7 THEN 'Campaign rare-' || g ELSE 'Postcard x 1' END,
       'ref-' || (g % 5000)
FROM generate_series(1, $2) AS g
"""


async def seed() -> dict[str, Any]:
    conn = await asyncpg.connect(common.dsn())
    positions: dict[str, Any] = {}
    try:
        for account, n in SIZES.items():
            await conn.execute(
                "INSERT INTO credit_account (id, balance, timezone, recharge_seq, created_at) "
                "VALUES ($1, 0, 'UTC', 0, now())",
                account,
            )
            await conn.execute(SEED_SQL, account, n, _now())
            total = await conn.fetchval(
                "SELECT COALESCE(SUM(credits), 0) FROM ledger_entry WHERE account_id = $1", account
            )
            await conn.execute(
                "UPDATE credit_account SET balance = $2 WHERE id = $1", account, total
            )
            mid = await conn.fetchrow(
                "SELECT created_at, id FROM ledger_entry WHERE account_id = $1 "
                "ORDER BY created_at DESC, id DESC OFFSET $2 LIMIT 1",
                account,
                n // 2,
            )
            positions[account] = mid
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return positions


def _now() -> Any:
    import datetime

    return datetime.datetime.now(datetime.UTC)


def queries(positions: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    from api.ids import encode_cursor

    def deep(account: str) -> str:
        row = positions[account]
        return encode_cursor(row["created_at"], row["id"])

    return {
        "balance": ("{ creditAccount { balance } }", lambda a: {}),
        "first page": (HISTORY, lambda a: {}),
        "deep page": (HISTORY, lambda a: {"after": deep(a)}),
        "types": (HISTORY, lambda a: {"f": {"types": ["PURCHASE"]}}),
        "processTypes": (HISTORY, lambda a: {"f": {"processTypes": ["PROSPECT_SEARCH"]}}),
        "userIds": (HISTORY, lambda a: {"f": {"userIds": ["user-3"]}}),
        "from/to": (
            HISTORY,
            lambda a: {"f": {"from": "2000-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"}},
        ),
        "search": (HISTORY, lambda a: {"f": {"search": "rare"}}),
        "deep page + types": (HISTORY, lambda a: {"f": {"types": ["USAGE"]}, "after": deep(a)}),
    }


async def measure(url: str, account: str, query: str, variables: dict[str, Any]) -> list[float]:
    headers = {"Authorization": f"Bearer {common.token(account, 'ADMIN')}"}
    samples: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=10) as client:

        async def one() -> None:
            start = time.perf_counter()
            response = await client.post("/graphql", json={"query": query, "variables": variables})
            samples.append((time.perf_counter() - start) * 1000)
            body = response.json()
            assert "errors" not in body, body

        for _ in range(10):  # warm up
            await one()
        samples.clear()
        tasks = []
        start = time.perf_counter()
        for i in range(int(RATE * SECONDS)):
            delay = start + i / RATE - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return samples


def pct(samples: list[float], p: float) -> float:
    return statistics.quantiles(samples, n=100)[int(p) - 1]


def main() -> dict[str, Any]:
    common.run(common.fresh_database())
    positions = common.run(seed())
    results: dict[str, Any] = {}
    with common.serve(workers=1) as server:
        for name, (query, make_vars) in queries(positions).items():
            row: dict[str, Any] = {}
            for account in (SMALL, LARGE):
                samples = common.run(measure(server.url, account, query, make_vars(account)))
                row[account] = {f"p{p}": round(pct(samples, p), 2) for p in (50, 95, 99)}
            row["p95_ratio"] = round(row[LARGE]["p95"] / row[SMALL]["p95"], 2)
            results[name] = row
            print(
                f"[latency] {name:18} 10k p50/p95/p99 "
                f"{row[SMALL]['p50']:.1f}/{row[SMALL]['p95']:.1f}/{row[SMALL]['p99']:.1f} ms"
                f"  1M {row[LARGE]['p50']:.1f}/{row[LARGE]['p95']:.1f}/{row[LARGE]['p99']:.1f}"
                f" ms  ratio {row['p95_ratio']}",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
