"""Run the benchmarks: ``python -m bench [spend|latency|recharge|schedule|csv|page ...]``.

Each prints its figures and the whole run is written to var/bench-results.json. They
need PostgreSQL on 127.0.0.1:5432 (a database ``credits_bench`` is created and dropped),
Redis on 127.0.0.1:6379 (db 14, for the recharge benchmark), and wrk and pgbench
(``apt-get install -y wrk postgresql-client``). Nothing here asserts anything about time.
"""

from __future__ import annotations

import importlib
import json
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

NAMES = ("spend", "latency", "recharge", "schedule", "csv", "page")
MODULES = {
    "spend": "bench.spend",
    "latency": "bench.latency",
    "recharge": "bench.recharge",
    "schedule": "bench.schedule",
    "csv": "bench.csv_export",
    "page": "bench.page",
}


def machine() -> str:
    cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    mem = Path("/proc/meminfo").read_text().split("\n")[0].split()[1]
    return (
        f"{platform.machine()}, {cpus} cores, {int(mem) // 1024 // 1024} GiB, "
        f"Python {platform.python_version()}"
    )


def main(argv: list[str]) -> int:
    names = argv or list(NAMES)
    unknown = set(names) - set(NAMES)
    if unknown:
        print(f"unknown benchmark(s): {', '.join(sorted(unknown))}; known: {', '.join(NAMES)}")
        return 2
    results: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    for name in names:
        started = time.monotonic()
        print(f"== {name}", flush=True)
        results[name] = importlib.import_module(MODULES[name]).main()
        print(f"== {name} took {time.monotonic() - started:.0f} s", flush=True)
    out = Path("var/bench-results.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
