"""Trusted documents (api/trusted.py): the platform's spend sent as text vs by its hash.

One ``python -m api`` process on PostgreSQL (in-process jobs), 100 seeded accounts, wrk
with a Lua script sending consumeCredits (one spend a request) three ways, in turns:

- ``text``: an equivalent document that is not a trusted one (what a client sent before:
  parsed and validated once, then found in the caches by its text on each request);
- ``trusted-text``: the trusted document's own text (found by text: neither parsed nor
  validated, its facts from start-up);
- ``hash``: the persistedQuery extension with its sha256, no text.

Reports spends/s, the server's CPU ms per request and the request body's bytes.
``python -m bench.trusted`` (BENCH_SECONDS, BENCH_ROUNDS; BENCH_DB names the database).
"""

from __future__ import annotations

import json
import os
import statistics
import uuid
from typing import Any

from api.trusted import read, sha256
from bench import common
from bench.spend import LUA_HEAD, MANY, SEED, app_rate

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))

_LUA = (
    LUA_HEAD
    + """request = function()
  local i = math.random(n)
  counter = counter + 1
  local body = {head} .. '{{"input":{{"accountId":"' .. accounts[i] ..
    '","userId":"u1","processType":"POSTCARD","quantity":1,"idempotencyKey":"' ..
    run .. '-' .. (tid or 0) .. '-' .. counter .. '"}}}}}}'
  return wrk.format("POST", "/graphql", {{["Content-Type"] = "application/json",
    ["Authorization"] = "Bearer " .. tokens[i]}}, body)
end
"""
)


def heads() -> dict[str, str]:
    """The body up to its variables' value, each way."""
    trusted = next(text for _, name, text in read() if name == "ConsumeCredits")
    untrusted = trusted.replace("mutation ConsumeCredits(", "mutation Spend(")
    extension = {"persistedQuery": {"version": 1, "sha256Hash": sha256(trusted)}}
    return {
        "text": json.dumps({"query": untrusted})[:-1] + ',"variables":',
        "trusted-text": json.dumps({"query": trusted})[:-1] + ',"variables":',
        "hash": json.dumps({"extensions": extension})[:-1] + ',"variables":',
    }


def lua(head: str, accounts: list[str]) -> str:
    tokens = [common.token(a, "SERVICE") for a in accounts]
    as_lua = lambda xs: "{" + ", ".join(common.lua_string(x) for x in xs) + "}"  # noqa: E731
    return _LUA.format(
        run=uuid.uuid4().hex[:8],
        accounts=as_lua(accounts),
        tokens=as_lua(tokens),
        head=common.lua_string(head),
    )


def main() -> None:
    common.need("wrk", "wrk")
    common.run(common.fresh_database())
    common.run(common.seed_accounts(MANY, SEED))
    ways = heads()
    results: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
    with common.serve(workers=1) as server:
        for way, head in ways.items():  # warm up each way (and check it spends)
            warm = _run(server, head, seconds=2)
            assert warm["spends_per_s"] > 0, (way, warm)
        for _ in range(ROUNDS):
            for way, head in ways.items():
                results[way].append(_run(server, head, seconds=common.DURATION))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    for way, runs in results.items():
        rates = [r["spends_per_s"] for r in runs]
        cpu = [r["cpu_ms_per_request"] for r in runs]
        size = len(ways[way]) + 130  # + the variables (about 130 bytes)
        print(
            f"{way:13s} spends/s median {statistics.median(rates):7.1f} "
            f"({', '.join(f'{x:.0f}' for x in rates)}); CPU ms/request median "
            f"{statistics.median(cpu):.3f} ({', '.join(f'{x:.3f}' for x in cpu)}); "
            f"body ~{size} B; non-2xx {sum(r['wrk']['non_2xx'] for r in runs):.0f}"
        )


def _run(server: common.Server, head: str, *, seconds: int) -> dict[str, Any]:
    import bench.spend as spend

    saved = spend.lua
    spend.lua = lambda accounts, batch=0, delay_ms=0: lua(head, accounts)  # type: ignore[assignment]
    try:
        return app_rate(server, MANY, seconds=seconds)
    finally:
        spend.lua = saved


if __name__ == "__main__":
    main()
