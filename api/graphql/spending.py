"""Spending credits (one use, a batch, metered), and reversing a spend. A single spend
owns its transaction (one statement when it can); the others run in the edge's one."""

from __future__ import annotations

import strawberry

from api import ids, metrics
from api.context import bad_input
from api.graphql.run import Caller, Tx, run
from api.graphql.types import CtxInfo, ProcessType, UserError, user_errors
from api.graphql.types.history import CreditTransaction, MeteredUsage, transaction_or_none
from billing.errors import BillingError
from billing.spending import batch, usage


@strawberry.input
class ConsumeCreditsInput:
    account_id: strawberry.ID
    user_id: strawberry.ID
    process_type: ProcessType
    quantity: int
    idempotency_key: str
    reference: str | None = None

    def to_item(self) -> batch.SpendItem:
        return batch.SpendItem(
            account_id=str(self.account_id),
            user_id=str(self.user_id),
            process_type=self.process_type,
            quantity=self.quantity,
            reference=self.reference,
            idempotency_key=self.idempotency_key,
        )


@strawberry.type
class ConsumeCreditsPayload:
    transaction: CreditTransaction | None = None
    balance: int | None = None
    free_units_applied: int = 0
    errors: list[UserError] = strawberry.field(default_factory=list)

    @classmethod
    def of(cls, result: usage.ConsumeResult | list[UserError]) -> ConsumeCreditsPayload:
        if isinstance(result, list):
            return cls(errors=result)
        return cls(
            transaction=transaction_or_none(result.entry),
            balance=result.balance,
            free_units_applied=result.free_units_applied,
        )


@strawberry.input
class ReverseUsageInput:
    transaction_id: strawberry.ID
    reason: str
    idempotency_key: str


@strawberry.type
class CreditTransactionPayload:
    transaction: CreditTransaction | None = None
    balance: int | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)

    @classmethod
    def of(cls, result: usage.EntryResult | list[UserError]) -> CreditTransactionPayload:
        if isinstance(result, list):
            return cls(errors=result)
        return cls(transaction=CreditTransaction(model=result.entry), balance=result.balance)


@strawberry.input
class RecordMeteredUsageInput:
    account_id: strawberry.ID
    user_id: strawberry.ID
    process_type: ProcessType
    quantity: int
    idempotency_key: str
    reference: str | None = None


@strawberry.type
class MeteredUsagePayload:
    usage: MeteredUsage | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.mutation(extensions=[metrics.spends()])
async def consume_credits(info: CtxInfo, input: ConsumeCreditsInput) -> ConsumeCreditsPayload:
    account_id = str(input.account_id)
    result = await run(
        info,
        lambda who: usage.consume(
            who.ctx.book,
            account_id=account_id,
            user_id=str(input.user_id),
            process_type=input.process_type,
            quantity=input.quantity,
            reference=input.reference,
            idempotency_key=input.idempotency_key,
        ),
        tx=Tx.OWN,  # owns its transaction (one statement when it can)
        acting_for=[account_id],
    )
    return ConsumeCreditsPayload.of(result)


@strawberry.mutation(
    description="Spend for up to 1,000 uses at once (a list import's appends, say): one "
    "result per item, in order, each with its own errors and idempotency key, as if "
    "consumeCredits were called for each in turn; applied in one transaction with one "
    "balance update per account."
)
async def consume_credits_batch(
    info: CtxInfo, inputs: list[ConsumeCreditsInput]
) -> list[ConsumeCreditsPayload]:
    if not 1 <= len(inputs) <= batch.MAX_BATCH:
        raise bad_input(f"inputs must hold 1 to {batch.MAX_BATCH:,} items")
    result = await run(
        info,
        lambda who: _consume_batch(who, inputs),
        tx=Tx.EDGE,
        acting_for=[str(i.account_id) for i in inputs],
    )
    if isinstance(result, list):  # the whole batch refused
        return [ConsumeCreditsPayload(errors=result) for _ in inputs]
    return [
        ConsumeCreditsPayload(errors=user_errors(o.errors))
        if isinstance(o, BillingError)
        else ConsumeCreditsPayload.of(o)
        for o in result
    ]


async def _consume_batch(
    who: Caller, inputs: list[ConsumeCreditsInput]
) -> tuple[batch.Outcome, ...]:
    """The batch's outcomes as a tuple (``run`` answers a whole refusal with a list)."""
    return tuple(await batch.consume_batch(who.ctx.book, [i.to_item() for i in inputs]))


@strawberry.mutation
async def reverse_usage(info: CtxInfo, input: ReverseUsageInput) -> CreditTransactionPayload:
    result = await run(
        info,
        lambda who: usage.reverse_usage(
            entry_id=ids.decode("CreditTransaction", str(input.transaction_id)),
            reason=input.reason,
            idempotency_key=input.idempotency_key,
            user_id=who.user_id,
            scope_account_id=who.scope_account_id,
        ),
        tx=Tx.EDGE,
    )
    return CreditTransactionPayload.of(result)


@strawberry.mutation
async def record_metered_usage(
    info: CtxInfo, input: RecordMeteredUsageInput
) -> MeteredUsagePayload:
    account_id = str(input.account_id)
    result = await run(
        info,
        lambda who: usage.record_metered(
            who.ctx.book,
            account_id=account_id,
            user_id=str(input.user_id),
            process_type=input.process_type,
            quantity=input.quantity,
            reference=input.reference,
            idempotency_key=input.idempotency_key,
        ),
        tx=Tx.EDGE,
        acting_for=[account_id],
    )
    if isinstance(result, list):
        return MeteredUsagePayload(errors=result)
    return MeteredUsagePayload(usage=MeteredUsage(model=result))
