"""Many concurrent spends on one account never overdraw, and the ledger stays whole."""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.conftest import Caller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import CONSUME, codes, grant, key


async def test_concurrent_spends_never_overdraw(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    # 100 credits, 60 concurrent postcards at 12 credits: exactly 8 can succeed.
    await grant(staff, service.account_id, 100)

    async def spend() -> list[str]:
        data = await service.gql(
            CONSUME,
            {
                "input": {
                    "accountId": service.account_id,
                    "userId": "u1",
                    "processType": "POSTCARD",
                    "quantity": 1,
                    "idempotencyKey": key(),
                }
            },
        )
        return codes(data["consumeCredits"])

    results = await asyncio.gather(*(spend() for _ in range(60)))
    outcome = Counter(tuple(r) for r in results)
    assert outcome == {(): 8, ("INSUFFICIENT_CREDITS",): 52}
    assert await assert_ledger_consistent(service.account_id) == 100 - 8 * 12


async def test_concurrent_retries_of_one_key_spend_once(service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 1000)
    payload = {
        "input": {
            "accountId": service.account_id,
            "userId": "u1",
            "processType": "HANDWRITTEN_LETTER",
            "quantity": 2,
            "idempotencyKey": key(),
        }
    }
    results = await asyncio.gather(*(service.gql(CONSUME, payload) for _ in range(20)))
    ids = {r["consumeCredits"]["transaction"]["id"] for r in results}
    assert len(ids) == 1
    assert {r["consumeCredits"]["balance"] for r in results} == {1000 - 70}
    assert await assert_ledger_consistent(service.account_id) == 1000 - 70
