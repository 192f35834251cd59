"""Benchmark 7: the CSV export of 100,000 and of 1,000,000 entries.

Rows per second as the client reads the stream, and the server's peak resident memory
(VmHWM of a fresh server process per size, less its resident memory before the export):
streamed in keyset chunks, the peak should not grow with the number of rows.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from bench import common
from bench.latency import SEED_SQL, _now

SIZES = {"csv-100k": 100_000, "csv-1m": int(os.environ.get("BENCH_LARGE_ENTRIES", "1000000"))}


async def seed() -> None:
    conn = await asyncpg.connect(common.dsn())
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
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def export(account: str, rows_expected: int) -> dict[str, Any]:
    with common.serve(workers=1) as server:
        pid = server.proc.pid
        before = kib(pid, "VmRSS")
        headers = {"Authorization": f"Bearer {common.token(account, 'ADMIN')}"}
        started = time.perf_counter()
        lines = 0
        with httpx.stream(
            "GET", f"{server.url}/reports/transactions.csv", headers=headers, timeout=600
        ) as response:
            response.raise_for_status()
            for chunk in response.iter_bytes():
                lines += chunk.count(b"\n")
        elapsed = time.perf_counter() - started
        peak = kib(pid, "VmHWM")
    rows = lines - 1  # the header
    return {
        "rows": rows,
        "expected": rows_expected,
        "seconds": round(elapsed, 2),
        "rows_per_s": round(rows / elapsed),
        "rss_before_mib": round(before / 1024, 1),
        "peak_growth_mib": round((peak - before) / 1024, 1),
    }


def main() -> dict[str, Any]:
    common.run(common.fresh_database())
    common.run(seed())
    results = {account: export(account, n) for account, n in SIZES.items()}
    for r in results.values():
        print(
            f"[csv] {r['rows']:>9,} rows: {r['rows_per_s']:,} rows/s, server peak "
            f"+{r['peak_growth_mib']} MiB over {r['rss_before_mib']} MiB",
            flush=True,
        )
    small, large = results["csv-100k"], results["csv-1m"]
    results["memory_ratio"] = round(
        max(large["peak_growth_mib"], 1) / max(small["peak_growth_mib"], 1), 2
    )
    print(f"[csv] peak memory growth, 1M vs 100k: {results['memory_ratio']}x", flush=True)
    return results


if __name__ == "__main__":
    main()
