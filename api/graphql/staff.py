"""Billing staff's grants and corrections (in the edge's one transaction)."""

from __future__ import annotations

import strawberry

from api.graphql.run import Tx, run
from api.graphql.spending import CreditTransactionPayload
from api.graphql.types import CtxInfo
from billing.spending import usage


@strawberry.input
class GrantCreditsInput:
    account_id: strawberry.ID
    credits: int
    reason: str
    idempotency_key: str


async def _staff_credits(
    info: CtxInfo, input: GrantCreditsInput, *, adjust: bool
) -> CreditTransactionPayload:
    account_id = str(input.account_id)
    result = await run(
        info,
        lambda who: usage.grant_or_adjust(
            account_id=account_id,
            credits=input.credits,
            reason=input.reason,
            idempotency_key=input.idempotency_key,
            user_id=who.user_id,
            adjust=adjust,
        ),
        tx=Tx.EDGE,
    )
    return CreditTransactionPayload.of(result)


@strawberry.mutation
async def grant_credits(info: CtxInfo, input: GrantCreditsInput) -> CreditTransactionPayload:
    return await _staff_credits(info, input, adjust=False)


@strawberry.mutation
async def adjust_credits(info: CtxInfo, input: GrantCreditsInput) -> CreditTransactionPayload:
    return await _staff_credits(info, input, adjust=True)
