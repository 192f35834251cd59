"""Buying credits with a card.

A purchase writes its payment row (``PENDING``) and claims its idempotency key in one
transaction *before* the gateway is called; the gateway's idempotency key is derived from
that row. The outcome is booked in a second transaction by ``booking.settle``, so the
credits land exactly once however many times, and in whatever order, the outcome is seen
(API call, confirm, webhook, sweep).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import timedelta

from tortoise.transactions import in_transaction

from billing import idempotency, sql
from billing.accounts import ensure_account
from billing.enums import ErrorCode, PaymentKind, PaymentStatus, TransactionType
from billing.errors import UserError, fail
from billing.ledger import posting
from billing.models import Account, Card, LedgerEntry, Payment
from billing.payments import cards
from billing.payments.gateways import (
    ChargeRequest,
    GatewayUnavailable,
    PaymentGateway,
    gateway_key,
    minimum_charge_cents,
)
from billing.pricing import PriceBook
from billing.settlement import booking
from billing.settlement.heal import heal_payment

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PaymentOutcome:
    payment: Payment
    entry: LedgerEntry | None
    balance: int
    errors: tuple[UserError, ...]


async def credits_in_flight(account_id: str) -> int:
    """Credits of the account's card payments that may still succeed and credit it
    (``PENDING``, ``REQUIRES_ACTION``): counted against the balance limit before a new one
    is charged."""
    rows = await sql.fetch(
        "SELECT COALESCE(SUM(credits), 0) AS total FROM payment WHERE account_id = ? "
        "AND kind IN (?, ?) AND status IN (?, ?)",
        account_id,
        PaymentKind.PURCHASE.value,
        PaymentKind.AUTO_RECHARGE.value,
        PaymentStatus.PENDING.value,
        PaymentStatus.REQUIRES_ACTION.value,
    )
    return int(rows[0]["total"])


def _price(book: PriceBook, credits: int) -> int:
    """What ``credits`` cost, in cents; refused outside the price book's range or under the
    card payment minimum."""
    if not book.min_purchase_credits <= credits <= book.max_purchase_credits:
        raise fail(
            ErrorCode.INVALID_AMOUNT,
            f"credits must be {book.min_purchase_credits:,} to {book.max_purchase_credits:,}",
            "credits",
        )
    amount_cents = book.amount_cents(credits)
    minimum = minimum_charge_cents(book.currency)
    if amount_cents < minimum:
        raise fail(
            ErrorCode.AMOUNT_TOO_SMALL,
            f"{credits:,} credits cost {amount_cents} cents; the card payment minimum is "
            f"{minimum} cents",
            "credits",
        )
    return amount_cents


@dataclass(frozen=True, slots=True)
class _Purchase:
    """What ``purchase_credits`` asked for."""

    account_id: str
    user_id: str
    credits: int
    amount_cents: int
    currency: str
    card_id: uuid.UUID | None
    card_id_given: bool
    idempotency_key: str

    def params(self) -> dict[str, object]:
        """The request as its idempotency key remembers it."""
        return {
            "credits": self.credits,
            "cardId": str(self.card_id) if self.card_id_given else None,
        }


@dataclass(frozen=True, slots=True)
class _Written:
    """A new PENDING payment, committed, with what charging it needs."""

    payment: Payment
    account: Account
    card: Card


async def _card_of(order: _Purchase) -> Card:
    if order.card_id_given:
        return await cards.get_card(order.card_id, order.account_id)
    card = await cards.primary_card(order.account_id)
    if card is None:
        raise fail(ErrorCode.NO_CARD_ON_FILE, "Add a card before buying credits.")
    return card


async def _write_payment(order: _Purchase) -> PaymentOutcome | _Written:
    """The purchase's payment row (``PENDING``) and its idempotency claim, in one
    transaction; or, for a key already used, what that request came to."""
    async with in_transaction():
        earlier = await idempotency.lookup(
            order.account_id, order.idempotency_key, "purchaseCredits", order.params()
        )
        if earlier is not None:
            return await describe(uuid.UUID(str(earlier.result["payment_id"])))
        payment_id = uuid.uuid4()
        replay = await idempotency.claim(
            order.account_id,
            order.idempotency_key,
            "purchaseCredits",
            order.params(),
            {"payment_id": str(payment_id)},
        )
        if replay is not None:
            return await describe(uuid.UUID(str(replay.result["payment_id"])))
        await posting.lock_account(order.account_id)
        # The card is chosen under the lock: a card removed meanwhile is never charged.
        card = await _card_of(order)
        account = await Account.get(id=order.account_id)
        in_flight = await credits_in_flight(order.account_id)
        if account.balance + in_flight > posting.MAX_BALANCE - order.credits:
            # Checked before the card is charged, counting the payments still in flight:
            # money taken for credits that can't be held would have to be refunded
            # (invariant 10).
            raise posting.balance_limit_error(account.balance + in_flight, order.credits)
        now = sql.now()
        payment = await Payment.create(
            id=payment_id,
            account_id=order.account_id,
            card_id=card.id,
            kind=PaymentKind.PURCHASE,
            status=PaymentStatus.PENDING,
            credits=order.credits,
            amount_cents=order.amount_cents,
            currency=order.currency,
            created_by=order.user_id,
            created_at=now,
            updated_at=now,
        )
    return _Written(payment, account, card)


async def _charge(gateway: PaymentGateway, written: _Written) -> PaymentOutcome:
    """Charge the committed payment (no transaction open) and settle what the gateway says."""
    payment, account = written.payment, written.account
    assert account.gateway_customer_id is not None, "a card implies a gateway customer"
    try:
        result = await gateway.charge(
            ChargeRequest(
                customer_id=account.gateway_customer_id,
                payment_method_id=written.card.gateway_payment_method_id,
                amount_cents=payment.amount_cents,
                currency=payment.currency,
                idempotency_key=gateway_key(payment.id),
                off_session=False,
                description=f"{payment.credits:,} purchase credits",
                metadata={"payment_id": str(payment.id), "account_id": payment.account_id},
            )
        )
    except GatewayUnavailable:
        # Stripe may or may not have charged: the payment stays PENDING and the sweep,
        # a confirm or the webhook settles it, from Stripe's own record.
        log.warning("gateway unavailable for payment %s; left PENDING", payment.id)
        return await describe(payment.id)
    async with in_transaction():
        await booking.settle(payment.id, result)
    return await describe(payment.id)


async def purchase_credits(
    gateway: PaymentGateway,
    book: PriceBook,
    *,
    account_id: str,
    user_id: str,
    credits: int,
    card_id: uuid.UUID | None,
    card_id_given: bool,
    idempotency_key: str,
) -> PaymentOutcome:
    """Buy ``credits`` with a card: the payment row commits before the gateway is called,
    and the outcome is settled in a second transaction. A retry with the same key answers
    what the first request came to (settling it first if a fault left it PENDING)."""
    order = _Purchase(
        account_id=account_id,
        user_id=user_id,
        credits=credits,
        amount_cents=_price(book, credits),
        currency=book.currency,
        card_id=card_id,
        card_id_given=card_id_given,
        idempotency_key=idempotency_key,
    )
    idempotency.check_key(idempotency_key)
    await ensure_account(account_id)
    retried = await idempotency.lookup(
        account_id, idempotency_key, "purchaseCredits", order.params()
    )
    if retried is not None:  # a retry: settle a payment a fault left PENDING (issue 12)
        await settle_stale(gateway, uuid.UUID(str(retried.result["payment_id"])))
    written = await _write_payment(order)
    if isinstance(written, PaymentOutcome):
        return written
    return await _charge(gateway, written)


#: A retry that finds its purchase still PENDING this long after the payment was last
#: written re-reads it at the gateway: the first request was cut off (a restart, a lost
#: answer), and the retry settles it now instead of the sweep minutes later. Younger, the
#: first request may still be waiting for the bank: the retry just reports PENDING.
RESETTLE_AFTER = timedelta(seconds=5)


async def settle_stale(gateway: PaymentGateway, payment_id: uuid.UUID) -> None:
    """Settle a payment left PENDING for ``RESETTLE_AFTER`` from the gateway's own record
    (with the payment's own idempotency key: never a second charge); a no-op otherwise."""
    payment = await Payment.get_or_none(id=payment_id)
    if payment is None or payment.status is not PaymentStatus.PENDING:
        return
    if payment.updated_at > sql.now() - RESETTLE_AFTER:
        return
    try:
        await heal_payment(gateway, payment_id)
    except GatewayUnavailable as exc:
        log.warning("payment %s is still PENDING: the gateway is unavailable (%s)", payment_id, exc)


async def describe(payment_id: uuid.UUID) -> PaymentOutcome:
    """The payment as it stands, its credit entry if any, and the errors it implies."""
    payment = await Payment.get(id=payment_id)
    entry = await LedgerEntry.filter(
        payment_id=payment.id,
        type__in=[TransactionType.PURCHASE, TransactionType.AUTO_RECHARGE],
    ).first()
    balance = entry.balance_after if entry else await posting.balance_of(payment.account_id)
    errors: tuple[UserError, ...] = ()
    if payment.status is PaymentStatus.FAILED:
        code = (
            ErrorCode.AUTHENTICATION_REQUIRED
            if payment.failure_code == "authentication_required"
            else ErrorCode.CARD_DECLINED
        )
        errors = (UserError(code, payment.failure_message or "The card was declined."),)
    return PaymentOutcome(payment, entry, balance, errors)


async def confirm_purchase(
    gateway: PaymentGateway, *, account_id: str, payment_id: uuid.UUID | None
) -> PaymentOutcome:
    """Re-read an unfinished payment at the gateway (after 3-D Secure, say) and apply it.

    Safe to call any number of times, before or after the webhook.
    """
    payment = (
        await Payment.get_or_none(id=payment_id, account_id=account_id) if payment_id else None
    )
    if payment is None:
        raise fail(ErrorCode.NOT_FOUND, "No such payment.", "paymentId")
    # FAILED included: Stripe's requires_payment_method is not final (the customer may
    # retry the same PaymentIntent and pass), so the gateway is asked again.
    open_states = (PaymentStatus.PENDING, PaymentStatus.REQUIRES_ACTION, PaymentStatus.FAILED)
    if payment.status in open_states and payment.gateway_payment_id:
        result = await gateway.retrieve_charge(payment.gateway_payment_id)
        async with in_transaction():
            await booking.settle(payment.id, result)
    return await describe(payment.id)
