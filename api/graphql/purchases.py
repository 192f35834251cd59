"""Buying credits with a card, and confirming a purchase that needed 3-D Secure. Both
call the gateway, so the purchase flow owns its transactions (``run.Tx.OWN``)."""

from __future__ import annotations

import strawberry

from api import ids, metrics
from api.graphql.run import Tx, run
from api.graphql.types import CtxInfo, UserError, user_errors
from api.graphql.types.cards import card_id
from api.graphql.types.history import CreditTransaction, transaction_or_none
from api.graphql.types.payments import Payment
from billing.payments import purchases


@strawberry.input
class PurchaseCreditsInput:
    credits: int
    idempotency_key: str
    card_id: strawberry.ID | None = strawberry.UNSET


@strawberry.type
class PurchaseCreditsPayload:
    payment: Payment | None = None
    transaction: CreditTransaction | None = None
    balance: int | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)

    @classmethod
    def of(cls, result: purchases.PaymentOutcome | list[UserError]) -> PurchaseCreditsPayload:
        if isinstance(result, list):
            return cls(errors=result)
        return cls(
            payment=Payment(model=result.payment),
            transaction=transaction_or_none(result.entry),
            balance=result.balance,
            errors=user_errors(result.errors),
        )


@strawberry.input
class ConfirmPurchaseInput:
    payment_id: strawberry.ID


@strawberry.mutation(extensions=[metrics.purchases()])
async def purchase_credits(info: CtxInfo, input: PurchaseCreditsInput) -> PurchaseCreditsPayload:
    given = input.card_id is not strawberry.UNSET and input.card_id is not None
    result = await run(
        info,
        lambda who: purchases.purchase_credits(
            who.ctx.gateway,
            who.ctx.book,
            account_id=who.account_id,
            user_id=who.user_id,
            credits=input.credits,
            card_id=card_id(input.card_id) if given else None,
            card_id_given=given,
            idempotency_key=input.idempotency_key,
        ),
        tx=Tx.OWN,
    )
    return PurchaseCreditsPayload.of(result)


@strawberry.mutation(
    description="Re-read a purchase that needed 3-D Secure (or is still pending) at the "
    "gateway and apply its outcome; credits land once, whether this or the webhook "
    "comes first."
)
async def confirm_purchase(info: CtxInfo, input: ConfirmPurchaseInput) -> PurchaseCreditsPayload:
    result = await run(
        info,
        lambda who: purchases.confirm_purchase(
            who.ctx.gateway,
            account_id=who.account_id,
            payment_id=ids.decode("Payment", str(input.payment_id)),
        ),
        tx=Tx.OWN,
    )
    return PurchaseCreditsPayload.of(result)
