"""Print the README's benchmark table from var/bench-results.json: ``python -m bench.report``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def rows(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    spend = r.get("spend")
    if spend:
        best = max(
            (k for k in spend if k.startswith("workers_")), key=lambda k: spend[k]["hot_ratio"]
        )
        one, b = spend.get("workers_1", {}), spend[best]
        out.append(
            (
                "1. spends, one hot account, 32 connections",
                f"{b['hot']['spends_per_s']:.0f}/s vs raw SQL {spend['raw_hot_tps']:.0f}/s "
                f"({best.replace('workers_', '')} uvicorn processes; one process: "
                f"{one.get('hot_ratio', 0):.2f})",
                f"{b['hot_ratio']:.2f}",
                "≥ 0.8",
            )
        )
        best = max(
            (k for k in spend if k.startswith("workers_")), key=lambda k: spend[k]["many_ratio"]
        )
        b = spend[best]
        out.append(
            (
                "2. spends, 100 accounts, one a request",
                f"{b['many']['spends_per_s']:.0f}/s vs raw {spend['raw_many_tps']:.0f}/s",
                f"{b['many_ratio']:.2f}",
                "≥ 0.3",
            )
        )
        best = max(
            (k for k in spend if k.startswith("workers_")), key=lambda k: spend[k]["batch_ratio"]
        )
        b = spend[best]
        out.append(
            (
                "3. spends in batches of 100 (consumeCreditsBatch)",
                f"{b['batch100']['spends_per_s']:.0f}/s vs raw {spend['raw_many_tps']:.0f}/s",
                f"{b['batch_ratio']:.2f}",
                "≥ 2.0",
            )
        )
    lat = r.get("latency")
    if lat:
        worst = max((k for k in lat if k != "balance"), key=lambda k: lat[k]["p95_ratio"])
        out.append(
            (
                "4a. history p95, 1,000,000 vs 10,000 entries (worst query)",
                f"{worst}: {lat[worst]['bench-1m']['p95']:.1f} vs "
                f"{lat[worst]['bench-10k']['p95']:.1f} ms",
                f"{lat[worst]['p95_ratio']:.2f}",
                "≤ 1.3",
            )
        )
        bal = lat["balance"]
        out.append(
            (
                "4b. balance p95 at 100 requests/s (1,000,000 entries)",
                f"p50 {bal['bench-1m']['p50']:.1f} ms, p99 {bal['bench-1m']['p99']:.1f} ms",
                f"{bal['bench-1m']['p95']:.1f} ms",
                "< 5 ms",
            )
        )
    rec = r.get("recharge")
    if rec:
        out.append(
            (
                "5. spend → AUTO_RECHARGE entry (arq worker, Redis, sandbox)",
                f"p50 {rec['p50_s']} s; exactly once {rec['exactly_once']}/{rec['crossings']}",
                f"p95 {rec['p95_s']} s",
                "< 1 s",
            )
        )
    sch = r.get("schedule")
    if sch:
        out.append(
            (
                "6. schedule cron, 100,000 vs 1,000 settings, 1% due (per due setting)",
                f"{sch['100k_1pct']['cron_ms']} ms for 1,000 due vs "
                f"{sch['1k_1pct']['cron_ms']} ms for 10; same 10 due: "
                f"{sch['same_due_ratio']}x",
                f"{sch['per_due_ratio_1pct']}",
                "≤ 2",
            )
        )
    csv = r.get("csv")
    if csv:
        big = csv["csv-1m"]
        out.append(
            (
                "7. CSV export, peak memory 1,000,000 vs 100,000 rows",
                f"{big['rows_per_s']:,} rows/s; peak +{big['peak_growth_mib']} MiB vs "
                f"+{csv['csv-100k']['peak_growth_mib']} MiB",
                f"{csv['memory_ratio']}",
                "≤ 1.5",
            )
        )
    return out


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "var/bench-results.json")
    results = json.loads(path.read_text())
    print(f"Measured {results['date']} on {results['machine']}.\n")
    print("| benchmark | measured | ratio / figure | target |")
    print("|---|---|---|---|")
    for name, measured, figure, target in rows(results):
        print(f"| {name} | {measured} | {figure} | {target} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
