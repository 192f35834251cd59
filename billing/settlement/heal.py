"""Healing: a payment a crash, a lost answer or a lost webhook left unfinished is settled
from the gateway's own record of it (the sweep, and a purchase retried while its first
request's answer is missing)."""

from __future__ import annotations

import uuid
from datetime import timedelta

from tortoise.transactions import in_transaction

from billing import sql
from billing.enums import PaymentKind, PaymentStatus
from billing.models import Account, Card, Payment
from billing.payments.gateways import ChargeRequest, PaymentGateway, gateway_key
from billing.settlement import booking
from billing.settlement.booking import flag, settle

#: Stripe keeps idempotency keys for 24 hours; a charge is repeated with its key only within.
IDEMPOTENCY_KEY_LIFETIME = timedelta(hours=23)


async def heal_payment(gateway: PaymentGateway, payment_id: uuid.UUID) -> PaymentStatus:
    """Settle a stuck or unfinished payment from the gateway's own record of it.

    With the gateway's id known, re-read it (a PENDING, REQUIRES_ACTION or FAILED payment:
    the gateway may have moved on). Without (the process died before Stripe answered),
    repeat the charge with the same idempotency key: Stripe answers with the first
    PaymentIntent instead of charging again."""
    payment = await Payment.get(id=payment_id)
    if payment.status in (PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED):
        return payment.status
    if payment.gateway_payment_id:
        result = await gateway.retrieve_charge(payment.gateway_payment_id)
    elif payment.status is not PaymentStatus.PENDING:
        return payment.status
    elif sql.now() - payment.created_at > IDEMPOTENCY_KEY_LIFETIME:
        # Stripe keeps an idempotency key for 24 hours: sent again now, the same key could
        # charge a second time. Its outcome is for billing staff to look up.
        await flag(
            payment.account_id,
            f"Payment {payment.id} has no gateway answer after a day: look it up at the "
            "gateway (metadata payment_id) before anything is charged again",
        )
        return payment.status
    else:
        card = await Card.get_or_none(id=payment.card_id) if payment.card_id else None
        account = await Account.get(id=payment.account_id)
        if card is None:
            result = None
        else:
            result = await gateway.charge(
                ChargeRequest(
                    customer_id=account.gateway_customer_id or "",
                    payment_method_id=card.gateway_payment_method_id,
                    amount_cents=payment.amount_cents,
                    currency=payment.currency,
                    idempotency_key=gateway_key(payment.id),
                    off_session=payment.kind is not PaymentKind.PURCHASE,
                    description=f"{payment.credits:,} purchase credits",
                    metadata={"payment_id": str(payment.id), "account_id": payment.account_id},
                )
            )
    async with in_transaction():
        if result is not None:
            await settle(payment.id, result)
        await Payment.filter(id=payment.id).update(gateway_checked_at=sql.now())
        if payment.kind is PaymentKind.AUTO_RECHARGE:
            await booking.book(payment)  # the setting, even if the status had moved before
    return (await Payment.get(id=payment_id)).status
