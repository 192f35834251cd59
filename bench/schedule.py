"""Benchmark 6: the scheduled-recharge cron with 100,000 settings against 1,000.

The cron reads the settings whose next_run_at has passed (an indexed range) and queues
one job each. Reported: the time of one cron run (find + enqueue) for 100,000 settings of
which 1% are due against 1,000 with 1% due, per due setting; and, to show the cost does
not grow with the settings that are not due, 100,000 against 1,000 with the same 10 due.
"""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from bench import common


async def seed(prefix: str, total: int, due: int) -> None:
    conn = await asyncpg.connect(common.dsn())
    try:
        await conn.execute(
            "INSERT INTO credit_account (id, balance, timezone, recharge_seq, created_at) "
            "SELECT $1 || g, 1000, 'UTC', 0, now() FROM generate_series(1, $2) g",
            prefix,
            total,
        )
        await conn.execute(
            "INSERT INTO auto_recharge_setting (account_id, enabled, trigger, interval_days, "
            "recharge_credits, use_primary_card, notify, notify_emails, next_run_at, "
            "consecutive_failures, updated_at) "
            "SELECT $1 || g, true, 'SCHEDULE', 30, 500, true, false, '[]', "
            "CASE WHEN g <= $3 THEN now() - interval '1 hour' ELSE now() + interval '10 days' "
            "END, 0, now() FROM generate_series(1, $2) g",
            prefix,
            total,
            due,
        )
        await conn.execute("ANALYZE auto_recharge_setting")
    finally:
        await conn.close()


async def time_cron(prefix: str, runs: int = 20) -> tuple[float, int]:
    """Median seconds of one cron run, and how many it queued."""
    from tortoise import Tortoise

    from runtime.db import tortoise_config
    from runtime.queue import InProcessQueue
    from workers.jobs import enqueue_due_schedules

    await Tortoise.init(config=tortoise_config(common.db_url()))
    queued: list[str] = []

    class Collect(InProcessQueue):
        async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
            if str(args[0]).startswith(prefix):
                queued.append(job_id)
            return True

    try:
        queue = Collect({})
        times = []
        for _ in range(runs):
            queued.clear()
            start = time.perf_counter()
            await enqueue_due_schedules(queue.ctx)  # type: ignore[arg-type]
            times.append(time.perf_counter() - start)
        times.sort()
        return times[len(times) // 2], len(queued)
    finally:
        await Tortoise.close_connections()


def main() -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, total, due in (
        ("1k_1pct", 1_000, 10),
        ("100k_1pct", 100_000, 1_000),
        ("1k_10due", 1_000, 10),
        ("100k_10due", 100_000, 10),
    ):
        common.run(common.fresh_database())
        common.run(seed(f"{label}-", total, due))
        seconds, queued = common.run(time_cron(f"{label}-"))
        results[label] = {
            "settings": total,
            "due": due,
            "queued": queued,
            "cron_ms": round(seconds * 1000, 2),
            "per_due_ms": round(seconds * 1000 / max(due, 1), 3),
        }
        print(
            f"[schedule] {total:>7,} settings, {due:>5,} due: one cron run "
            f"{seconds * 1000:.1f} ms ({seconds * 1000 / due:.3f} ms per due), "
            f"queued {queued}",
            flush=True,
        )
    results["per_due_ratio_1pct"] = round(
        results["100k_1pct"]["per_due_ms"] / results["1k_1pct"]["per_due_ms"], 2
    )
    results["same_due_ratio"] = round(
        results["100k_10due"]["cron_ms"] / results["1k_10due"]["cron_ms"], 2
    )
    print(
        f"[schedule] per-due ratio (100k/1k, 1% due): {results['per_due_ratio_1pct']}; "
        f"same 10 due, 100k vs 1k settings: {results['same_due_ratio']}",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
