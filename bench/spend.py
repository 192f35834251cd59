"""Benchmarks 1-3: spends per second over HTTP against the raw-SQL debit, same run.

1. one hot account, 32 connections; 2. one spend a request over 100 accounts;
3. consumeCreditsBatch with 100 items a request over 100 accounts.
The app's rate counts the USAGE entries written (so refused or failed requests don't
count), the raw rate is pgbench's transactions per second.
"""

from __future__ import annotations

import time
import uuid
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

_LUA = """
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
local function item(account)
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


def lua(accounts: list[str], batch: int = 0) -> str:
    tokens = [common.token(a, "SERVICE") for a in accounts]
    as_lua = lambda xs: "{" + ", ".join(common.lua_string(x) for x in xs) + "}"  # noqa: E731
    return _LUA.format(
        run=uuid.uuid4().hex[:8], accounts=as_lua(accounts), tokens=as_lua(tokens), batch=batch
    )


def raw_rate(accounts: list[str]) -> float:
    if len(accounts) == 1:
        script = RAW_DEBIT.format(last=0, account=f"'{accounts[0]}'")
    else:
        script = RAW_DEBIT.format(
            last=len(accounts) - 1, account="'bench-raw-' || lpad(:n::text, 3, '0')"
        )
    return common.pgbench(script)


async def usage_count(accounts: list[str]) -> int:
    import asyncpg

    conn = await asyncpg.connect(common.dsn())
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM ledger_entry WHERE type = 'USAGE' AND account_id = ANY($1)",
                accounts,
            )
        )
    finally:
        await conn.close()


def app_rate(server: common.Server, accounts: list[str], batch: int = 0) -> dict[str, Any]:
    before = common.run(usage_count(accounts))
    started = time.monotonic()
    result = common.wrk(f"{server.url}/graphql", lua(accounts, batch))
    elapsed = time.monotonic() - started
    spends = common.run(usage_count(accounts)) - before
    ok, _ = common.run(common.ledger_check(accounts))
    return {
        "spends_per_s": spends / common.DURATION,
        "wrk": result,
        "ledger_ok": ok,
        "elapsed_s": round(elapsed, 1),
    }


def main(workers: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
    common.run(common.fresh_database())
    common.run(common.seed_accounts([HOT, RAW_HOT, *MANY, *RAW_MANY], SEED))
    out: dict[str, Any] = {}
    raw_hot = raw_rate([RAW_HOT])
    raw_many = raw_rate(RAW_MANY)
    out["raw_hot_tps"] = raw_hot
    out["raw_many_tps"] = raw_many
    for n in workers:
        with common.serve(workers=n, pool=max(8, 40 // n)) as server:
            hot = app_rate(server, [HOT])
            many = app_rate(server, MANY)
            batched = app_rate(server, MANY, batch=100)
        out[f"workers_{n}"] = {
            "hot": hot,
            "hot_ratio": hot["spends_per_s"] / raw_hot,
            "many": many,
            "many_ratio": many["spends_per_s"] / raw_many,
            "batch100": batched,
            "batch_ratio": batched["spends_per_s"] / raw_many,
        }
        print(
            f"[spend] {n} worker(s): hot {hot['spends_per_s']:.0f}/s "
            f"({hot['spends_per_s'] / raw_hot:.2f} of raw {raw_hot:.0f}), "
            f"100 accounts {many['spends_per_s']:.0f}/s "
            f"({many['spends_per_s'] / raw_many:.2f} of raw {raw_many:.0f}), "
            f"batches of 100 {batched['spends_per_s']:.0f}/s "
            f"({batched['spends_per_s'] / raw_many:.2f} of raw), "
            f"ledger ok: {hot['ledger_ok'] and many['ledger_ok'] and batched['ledger_ok']}",
            flush=True,
        )
    return out


if __name__ == "__main__":
    main()
