"""Benchmarks 1-3 on the production shape: spends per second over HTTP against the
raw-SQL debit, same run.

The app runs as production runs it: ``python -m api`` with WEB_CONCURRENCY=2 (two uvicorn
processes on the two cores), JOB_QUEUE=arq (jobs and live-balance events through Redis,
db 14) with one ``python -m workers``, PostgreSQL on the same machine; wrk drives it.

1. one hot account, 32 connections; 2. one spend a request over 100 accounts;
3. consumeCreditsBatch with 100 items a request over 100 accounts. Then, on the same
server: the CPU seconds its processes used per request, the latency at half the measured
capacity (wrk paced by a per-connection delay), a py-spy profile of the processes, and the
rate of one API process alone. The app's rate counts the USAGE entries written (so refused
or failed requests don't count), the raw rate is pgbench's transactions per second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import common

HOT = "bench-hot"
RAW_HOT = "bench-raw-hot"
MANY = [f"bench-acct-{i:03d}" for i in range(100)]
RAW_MANY = [f"bench-raw-{i:03d}" for i in range(100)]
SEED = 50_000_000

RAW_DEBIT = """\\set n random(0, {last})
BEGIN;
UPDATE credit_account SET balance = balance - 1
  WHERE id = {account} AND balance >= 1 RETURNING balance AS bal \\gset
INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits,
  balance_after, description)
  VALUES (gen_random_uuid(), {account}, clock_timestamp(), 'USAGE', 'POSTCARD', -1, :bal,
  'raw debit');
COMMIT;
"""

#: The start of every wrk script here (a format string: run, accounts, tokens): each thread
#: numbers itself, so idempotency keys are unique across threads.
LUA_HEAD = """
local counter = 0
local run = "{run}"
local accounts = {accounts}
local tokens = {tokens}
local n = #accounts
local threads = {{}}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  math.randomseed(os.time() * 1000 + (tid or 0))
end
"""

_LUA = (
    LUA_HEAD
    + """local function item(account)
  counter = counter + 1
  return '{{"accountId":"' .. account .. '","userId":"u1","processType":"POSTCARD",' ..
    '"quantity":1,"idempotencyKey":"' .. run .. '-' .. (tid or 0) .. '-' .. counter .. '"}}'
end
request = function()
  local i = math.random(n)
  local body
  if {batch} > 0 then
    local items = {{}}
    for k = 1, {batch} do items[k] = item(accounts[i]) end
    body = '{{"query":"mutation($i:[ConsumeCreditsInput!]!){{consumeCreditsBatch(inputs:$i)' ..
      '{{balance errors{{code}}}}}}","variables":{{"i":[' .. table.concat(items, ",") .. ']}}}}'
  else
    body = '{{"query":"mutation($i:ConsumeCreditsInput!){{consumeCredits(input:$i)' ..
      '{{balance errors{{code}}}}}}","variables":{{"i":' .. item(accounts[i]) .. '}}}}'
  end
  return wrk.format("POST", "/graphql", {{["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[i]}}, body)
end
"""
)


def lua(accounts: list[str], batch: int = 0, delay_ms: float = 0) -> str:
    tokens = [common.token(a, "SERVICE") for a in accounts]
    as_lua = lambda xs: "{" + ", ".join(common.lua_string(x) for x in xs) + "}"  # noqa: E731
    script = _LUA.format(
        run=uuid.uuid4().hex[:8], accounts=as_lua(accounts), tokens=as_lua(tokens), batch=batch
    )
    if delay_ms:  # wrk waits this long before each request of a connection
        script += f"function delay() return {delay_ms:.0f} end\n"
    return script


def raw_rate(accounts: list[str], script: str = RAW_DEBIT) -> float:
    if len(accounts) == 1:
        sql = script.format(last=0, account=f"'{accounts[0]}'")
    else:
        sql = script.format(
            last=len(accounts) - 1, account="'bench-raw-' || lpad(:n::text, 3, '0')"
        )
    return common.pgbench(sql)


async def usage_count(accounts: list[str]) -> int:
    conn = await common.connect()
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM ledger_entry WHERE type = 'USAGE' AND account_id = ANY($1)",
                accounts,
            )
        )
    finally:
        await conn.close()


def app_rate(
    server: common.Server,
    accounts: list[str],
    batch: int = 0,
    *,
    delay_ms: float = 0,
    connections: int = common.CONNECTIONS,
    seconds: int = common.DURATION,
) -> dict[str, Any]:
    """Spends/s over wrk, and the CPU the server's processes used per request."""
    before = common.run(usage_count(accounts))
    cpu = server.cpu_seconds()
    started = time.monotonic()
    result = common.wrk(
        f"{server.url}/graphql",
        lua(accounts, batch, delay_ms),
        connections=connections,
        seconds=seconds,
    )
    elapsed = time.monotonic() - started
    cpu = server.cpu_seconds() - cpu
    spends = common.run(usage_count(accounts)) - before
    ok, _ = common.run(common.ledger_check(accounts))
    requests = result.get("requests") or 1.0
    return {
        "spends_per_s": spends / seconds,
        "wrk": result,
        "cpu_s": round(cpu, 2),
        "cpu_ms_per_request": round(1000 * cpu / requests, 3),
        "cpu_ms_per_spend": round(1000 * cpu / max(spends, 1), 3),
        "ledger_ok": ok,
        "elapsed_s": round(elapsed, 1),
    }


def paced_run(server: common.Server, accounts: list[str], rate: float) -> dict[str, Any]:
    """Latency at a given request rate. wrk2 is not packaged, so wrk paces itself: each
    connection waits ``delay`` before its next request, making C / (delay + latency)
    requests a second. A short first run measures the latency at about that rate; the
    second corrects the delay for it. (A closed loop: a stall delays the requests behind
    it rather than queueing them, so the p99 is a lower bound of an open loop's.)"""
    c = PACED_CONNECTIONS
    delay = 1000 * c / rate
    probe = app_rate(server, accounts, delay_ms=delay, connections=c, seconds=4)
    latency = 1000 * c / max(probe["wrk"]["rps"], 1.0) - delay  # ms a request takes
    delay = max(1.0, 1000 * c / rate - latency)
    paced = app_rate(server, accounts, delay_ms=delay, connections=c)
    paced["target_rps"] = round(rate, 1)
    paced["delay_ms"] = round(delay, 1)
    return paced


# ------------------------------------------------------------------ py-spy's profile

#: Where a sample's CPU goes, by the innermost frame that names one of these (in order).
PLACES = (
    ("Strawberry and graphql-core (parse, validate, execute, hooks)", ("strawberry/", "graphql/")),
    ("our guards (api/guards, bounded, cost)", ("api/guards", "api/bounded", "api/cost")),
    ("token verification (api/auth, PyJWT, cryptography)", ("api/auth", "jwt/", "cryptography/")),
    ("logging and the request id", ("logging/", "pythonjsonlogger/", "billing/logs", "api/observ")),
    ("our API (resolvers, context, app, errors)", ("api/",)),
    ("the domain (billing/)", ("billing/",)),
    ("database driver (asyncpg, Tortoise)", ("asyncpg/", "tortoise/", "pypika")),
    ("Redis (live events, queue)", ("redis/", "arq/", "workers/")),
    ("HTTP (uvicorn, h11, Starlette)", ("uvicorn/", "h11/", "starlette/", "httptools/")),
    ("JSON", ("json/", "orjson")),
    ("event loop (asyncio, uvloop)", ("asyncio/", "uvloop/", "selectors")),
)


def _place(frame: str) -> str | None:
    path = frame.rsplit("(", 1)[-1]
    for name, marks in PLACES:
        if any(path.startswith(m) or f"/{m}" in path for m in marks):
            return name
    return None


def summarise(raw: str, skip_pid: int | None = None) -> dict[str, Any]:
    """py-spy's raw (collapsed) stacks: shares of samples by place and by function
    (``skip_pid``: a process whose own samples don't count, uvicorn's supervisor)."""
    places: Counter[str] = Counter()
    functions: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        processes = [f for f in frames if f.startswith("process ")]
        if processes and processes[-1].startswith(f"process {skip_pid}:"):
            continue
        frames = frames[len(processes) :] if frames[: len(processes)] == processes else frames
        frames = [f for f in frames if not f.startswith("process ")]
        if not frames or any("always_pong (" in f for f in frames):
            continue  # uvicorn's thread that waits on the supervisor's pipe: not work
        total += n
        functions[frames[-1]] += n
        place = next((p for f in reversed(frames) if (p := _place(f))), "other (stdlib)")
        places[place] += n
    share = lambda n: round(100 * n / max(total, 1), 1)  # noqa: E731
    return {
        "samples": total,
        "places": [(p, share(n)) for p, n in places.most_common()],
        "functions": [(f, share(n)) for f, n in functions.most_common(12)],
    }


def profile(server: common.Server, accounts: list[str], seconds: int) -> dict[str, Any] | None:
    """py-spy on every process of the server while wrk drives spends at capacity."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("[spend] py-spy is missing (make install): no profile", flush=True)
        return None
    out = Path(tempfile.mkdtemp()) / "spend.txt"
    with ThreadPoolExecutor(1) as pool:
        load = pool.submit(common.wrk, f"{server.url}/graphql", lua(accounts), seconds=seconds + 3)
        time.sleep(1.0)
        done = subprocess.run(
            [
                spy,
                "record",
                "--pid",
                str(server.proc.pid),
                "--subprocesses",
                "--format",
                "raw",
                "--rate",
                "100",
                "--nonblocking",
                "--duration",
                str(seconds),
                "-o",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        load.result()
    if done.returncode != 0 or not out.exists():
        print(f"[spend] py-spy failed: {done.stderr.strip()[-300:]}", flush=True)
        return None
    supervisor = server.proc.pid if server.api_processes() > 1 else None
    summary = summarise(out.read_text(), skip_pid=supervisor)
    shutil.rmtree(out.parent, ignore_errors=True)
    return summary


# ------------------------------------------------------------------ the run

SHAPE = int(os.environ.get("BENCH_WEB_CONCURRENCY", "2"))
PROFILE_SECONDS = int(os.environ.get("BENCH_PROFILE_SECONDS", "8"))
PACED_CONNECTIONS = 16
# Connections per API process: wrk's 32 spread over two processes is 16 in flight each.
POOL = 16

RAW_INSERT = """\\set n random(0, {last})
INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits,
  balance_after, description)
  VALUES (gen_random_uuid(), {account}, clock_timestamp(), 'USAGE', 'POSTCARD', -1, 0,
  'raw ledger insert');
"""


def main() -> dict[str, Any]:
    common.run(common.fresh_database())
    common.run(common.seed_accounts([HOT, RAW_HOT, *MANY, *RAW_MANY], SEED))
    common.run(common.flush_redis())
    out: dict[str, Any] = {"shape": f"WEB_CONCURRENCY={SHAPE}, JOB_QUEUE=arq, PostgreSQL"}
    raw_hot = raw_rate([RAW_HOT])
    raw_many = raw_rate(RAW_MANY)
    out["raw_hot_tps"] = raw_hot
    out["raw_many_tps"] = raw_many
    print(
        f"[spend] raw SQL: one account {raw_hot:.0f}/s, 100 accounts {raw_many:.0f}/s", flush=True
    )
    env = {
        "JOB_QUEUE": "arq",
        "REDIS_URL": common.REDIS_URL,
        "PAYMENT_GATEWAY": "sandbox",
    }
    with (
        common.arq_worker(),
        common.serve(workers=None, pool=POOL, WEB_CONCURRENCY=str(SHAPE), **env) as server,
    ):
        processes = server.api_processes()
        hot = app_rate(server, [HOT])
        many = app_rate(server, MANY)
        batched = app_rate(server, MANY, batch=100)
        half = many["wrk"]["rps"] / 2
        paced = paced_run(server, MANY, half)
        profiled = profile(server, MANY, PROFILE_SECONDS)
    with common.serve(workers=1, pool=POOL, **env) as server:
        single = app_rate(server, MANY)
    # The ledger's write rate alone: inserts without the balance update (the raw accounts).
    raw_insert = raw_rate(RAW_MANY, RAW_INSERT)
    out[f"workers_{SHAPE}"] = {
        "api_processes": processes,
        "hot": hot,
        "hot_ratio": hot["spends_per_s"] / raw_hot,
        "many": many,
        "many_ratio": many["spends_per_s"] / raw_many,
        "batch100": batched,
        "batch_ratio": batched["spends_per_s"] / raw_many,
        "paced_half_capacity": paced,
        "profile": profiled,
    }
    out["workers_1"] = {"many": single, "many_ratio": single["spends_per_s"] / raw_many}
    out["raw_ledger_insert_tps"] = raw_insert
    ok = hot["ledger_ok"] and many["ledger_ok"] and batched["ledger_ok"] and single["ledger_ok"]
    print(
        f"[spend] {processes} API processes (WEB_CONCURRENCY={SHAPE}, JOB_QUEUE=arq):\n"
        f"  1. hot account     {hot['spends_per_s']:7.0f}/s  {hot['spends_per_s'] / raw_hot:5.2f}x"
        f" of raw {raw_hot:.0f}/s  (goal >= 0.8)\n"
        f"  2. 100 accounts    {many['spends_per_s']:7.0f}/s  "
        f"{many['spends_per_s'] / raw_many:5.2f}x of raw {raw_many:.0f}/s  (goal >= 0.3)\n"
        f"  3. batches of 100  {batched['spends_per_s']:7.0f}/s  "
        f"{batched['spends_per_s'] / raw_many:5.2f}x of raw {raw_many:.0f}/s  (goal >= 2.5)\n"
        f"  CPU of the API processes per request: hot {hot['cpu_ms_per_request']:.2f} ms, "
        f"100 accounts {many['cpu_ms_per_request']:.2f} ms, batch of 100 "
        f"{batched['cpu_ms_per_request']:.1f} ms ({batched['cpu_ms_per_spend']:.3f} ms a spend)\n"
        f"  latency at half capacity ({paced['wrk']['rps']:.0f} of {half:.0f} requests/s "
        f"targeted, 100 accounts): p50 {paced['wrk'].get('p50_ms', 0):.1f} ms, "
        f"p99 {paced['wrk'].get('p99_ms', 0):.1f} ms  (goal p99 < 20 ms)\n"
        f"  one API process alone, 100 accounts: {single['spends_per_s']:.0f}/s "
        f"({single['cpu_ms_per_request']:.2f} ms CPU a request)\n"
        f"  raw ledger inserts alone (no balance update), 100 accounts: {raw_insert:.0f}/s\n"
        f"  ledger ok: {ok}",
        flush=True,
    )
    if profiled:
        print(
            f"  py-spy, {PROFILE_SECONDS} s at capacity over 100 accounts "
            f"({profiled['samples']} samples of the API processes):",
            flush=True,
        )
        print("    | where | share of samples |\n    |---|---|")
        for place, pct in profiled["places"]:
            print(f"    | {place} | {pct:.1f} % |")
        print("    top functions (self):")
        for function, pct in profiled["functions"]:
            print(f"    {pct:5.1f} %  {function}")
    return out


if __name__ == "__main__":
    main()
