"""consumeCreditsBatch: the same guarantees as consumeCredits, item by item."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any, cast

from billing.enums import Role
from tests.conftest import Caller, MakeCaller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import ERRORS, TX_FIELDS, balance, grant, key

BATCH = f"""mutation($inputs: [ConsumeCreditsInput!]!) {{
  consumeCreditsBatch(inputs: $inputs) {{
    transaction {{ {TX_FIELDS} }} balance freeUnitsApplied {ERRORS}
  }}
}}"""
QUOTAS = "{ creditAccount { freeQuotas { processType allowance used } } }"


def item(
    service: Caller, process: str = "POSTCARD", quantity: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "accountId": service.account_id,
        "userId": "u1",
        "processType": process,
        "quantity": quantity,
        "idempotencyKey": key(),
        **extra,
    }


async def run(service: Caller, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return cast(
        "list[dict[str, Any]]", (await service.gql(BATCH, {"inputs": items}))["consumeCreditsBatch"]
    )


def codes(result: dict[str, Any]) -> list[str]:
    return [e["code"] for e in result["errors"]]


async def test_items_apply_in_order_with_their_own_errors(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, service.account_id, 50)  # postcards cost 12
    results = await run(
        service,
        [
            item(service, quantity=2),  # 24 -> 26 left
            item(service, quantity=3),  # 36: refused
            item(service, quantity=0),  # invalid
            item(service, process="PREMIUM_AUDIO_TRANSCRIPTION"),  # metered: invalid here
            item(service, quantity=1),  # 12 -> 14 left
            item(service, idempotencyKey=""),  # invalid key
        ],
    )
    assert [codes(r) for r in results] == [
        [],
        ["INSUFFICIENT_CREDITS"],
        ["VALIDATION"],
        ["VALIDATION"],
        [],
        ["VALIDATION"],
    ]
    assert [r["balance"] for r in results if not r["errors"]] == [26, 14]
    assert results[0]["transaction"]["balanceAfter"] == 26
    assert results[4]["transaction"]["credits"] == -12
    assert results[2]["errors"][0]["field"] == ["quantity"]
    assert await balance(admin) == 14
    assert await assert_ledger_consistent(service.account_id) == 14
    history = await admin.gql(
        "{ creditAccount { transactions(first: 5, filter: {types: [USAGE]})"
        " { edges { node { credits balanceAfter } } } } }"
    )
    nodes = [e["node"] for e in history["creditAccount"]["transactions"]["edges"]]
    assert nodes == [{"credits": -12, "balanceAfter": 14}, {"credits": -24, "balanceAfter": 26}]


async def test_idempotency_per_item(service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 1000)
    first = [item(service), item(service, process="HANDWRITTEN_LETTER")]
    one = await run(service, first)
    again = await run(service, [*first, item(service)])
    assert [r["transaction"]["id"] for r in again[:2]] == [r["transaction"]["id"] for r in one]
    assert again[1]["balance"] == one[1]["balance"]
    reused = await run(service, [{**first[0], "quantity": 5}])
    assert codes(reused[0]) == ["IDEMPOTENCY_KEY_REUSED"]
    # a key used twice in one batch: the second replays the first, or is refused if it differs
    twin = item(service)
    results = await run(service, [twin, twin, {**twin, "quantity": 2}])
    assert results[0]["transaction"]["id"] == results[1]["transaction"]["id"]
    assert codes(results[2]) == ["IDEMPOTENCY_KEY_REUSED"]
    # the same key as a single consumeCredits replays too
    from tests.support.ops import CONSUME

    single = await service.gql(CONSUME, {"input": first[0]})
    assert single["consumeCredits"]["transaction"]["id"] == one[0]["transaction"]["id"]
    assert await assert_ledger_consistent(service.account_id) == 1000 - 12 - 35 - 12 - 12


async def test_refused_items_are_not_remembered(service: Caller, staff: Caller) -> None:
    short = item(service, quantity=2)
    assert codes((await run(service, [short]))[0]) == ["INSUFFICIENT_CREDITS"]
    await grant(staff, service.account_id, 100)
    assert codes((await run(service, [short]))[0]) == []
    assert await assert_ledger_consistent(service.account_id) == 100 - 24


async def test_free_quota_first_then_credits(admin: Caller, service: Caller, staff: Caller) -> None:
    pricing = (
        await service.gql(
            "{ creditPricing { processes { processType freeMonthlyQuota creditsPerUnit } } }"
        )
    )["creditPricing"]["processes"]
    quota = next(p for p in pricing if p["processType"] == "SMART_MATCH")["freeMonthlyQuota"]
    await grant(staff, service.account_id, 10)
    results = await run(
        service,
        [
            item(service, process="SMART_MATCH", quantity=quota - 2),  # all free
            item(service, process="SMART_MATCH", quantity=5),  # 2 free, 3 paid
            item(service, process="SMART_MATCH", quantity=20),  # 20 paid: refused
            item(service, process="SMART_MATCH", quantity=7),  # 7 paid
        ],
    )
    assert [r["freeUnitsApplied"] for r in results] == [quota - 2, 2, 0, 0]
    assert results[0]["transaction"] is None and results[0]["balance"] == 10
    assert [codes(r) for r in results] == [[], [], ["INSUFFICIENT_CREDITS"], []]
    assert [r["balance"] for r in results] == [10, 7, None, 0]
    used = (await admin.gql(QUOTAS))["creditAccount"]["freeQuotas"]
    assert next(q for q in used if q["processType"] == "SMART_MATCH")["used"] == quota
    assert await assert_ledger_consistent(service.account_id) == 0


async def test_concurrent_batches_never_overdraw(service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 1200)  # 100 postcards
    batches = [[item(service) for _ in range(30)] for _ in range(8)]  # 240 asked for
    results = await asyncio.gather(*(run(service, b) for b in batches))
    outcome = Counter(tuple(codes(r)) for batch in results for r in batch)
    assert outcome == {(): 100, ("INSUFFICIENT_CREDITS",): 140}
    assert await assert_ledger_consistent(service.account_id) == 0


async def test_limits_and_roles(service: Caller, admin: Caller, caller: MakeCaller) -> None:
    error = await service.gql_error(BATCH, {"inputs": []})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    error = await service.gql_error(BATCH, {"inputs": [item(service)] * 1001})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    error = await admin.gql_error(BATCH, {"inputs": [item(service)]})
    assert error["extensions"]["code"] == "FORBIDDEN"
    other = caller(f"other-{uuid.uuid4().hex[:8]}", Role.SERVICE)
    response = await other.raw(BATCH, {"inputs": [item(other), item(service)]})
    body = response.json()
    assert body["data"] is None and body["errors"][0]["extensions"]["code"] == "FORBIDDEN"
    assert await assert_ledger_consistent(service.account_id) == 0


async def test_a_thousand_items_in_one_batch(service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 12_000)
    results = await run(service, [item(service) for _ in range(1000)])
    assert all(r["errors"] == [] for r in results)
    assert results[-1]["balance"] == 0
    assert await assert_ledger_consistent(service.account_id) == 0
