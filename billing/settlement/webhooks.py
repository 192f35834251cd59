"""Gateway events (Stripe webhooks): stored once by id, then processed by a job.

Stripe delivers events late, twice, or out of order, so no handler trusts the order or
drops an event because our state is not there yet:

- every gateway object is matched by its own id (the PaymentIntent id we stored) and checked
  against what we asked for (``booking.settle``: amount, currency, customer); metadata
  only helps find a payment whose id we never learnt, and is checked the same way;
- a handler applies from the object's *current* state: a refund whose charge succeeded books
  the success first (``booking.settle``) and then the refund, whatever came first;
- an event that still can't apply (its payment unknown, a dispute on a payment not yet
  paid) is kept: ``processed_at`` stays empty, ``outcome`` is ``pending``, and the sweep
  applies it once it can; reconciliation reports one still pending after a day;
- an object that contradicts our payment changes nothing: the event is ``mismatch``, the
  account flagged, reconciliation reports it.

Processing is idempotent: a payment's status moves by conditional updates, refunds follow
the refunded *total*, disputes are keyed by their id.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta
from enum import StrEnum
from typing import Any

from billing import sql
from billing.enums import ErrorCode, PaymentKind, PaymentStatus, ProcessType, TransactionType
from billing.errors import BillingError
from billing.ledger import posting
from billing.ledger.posting import Movement
from billing.models import Account, Card, GatewayEvent, LedgerEntry, Payment
from billing.payments import cards
from billing.payments.gateways import ChargeResult, ChargeStatus
from billing.payments.gateways.stripe_gateway import charge_result
from billing.settlement import booking
from billing.settlement.booking import Settled

log = logging.getLogger(__name__)


class EventOutcome(StrEnum):
    APPLIED = "applied"
    IGNORED = "ignored"  # not ours, or nothing to do
    PENDING = "pending"  # can't apply yet: kept, and the sweep tries again
    MISMATCH = "mismatch"  # contradicts our payment: nothing changed, account flagged
    REJECTED = "rejected"  # signed but malformed: kept for the record, never processed


HANDLED = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_method.updated",
        "payment_method.automatically_updated",
        "payment_method.detached",
        "charge.refunded",
        "charge.dispute.created",
        "charge.dispute.closed",
    }
)


async def record(source: str, event: dict[str, Any], *, rejected: str | None = None) -> int | None:
    """Store an event once; return its row id if this call stored it (then enqueue it).
    A ``rejected`` event (signed, but malformed) is stored as done, with the reason: kept
    for the record, never processed."""
    sql.connection()
    now = sql.now()
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    object_id = _str_id(obj) if isinstance(obj, dict) else None
    rows = await sql.fetch(
        "INSERT INTO gateway_event (source, external_id, type, payload, received_at, attempts, "
        "processed_at, last_error, outcome, object_id) "
        "VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?, ?) "
        "ON CONFLICT (source, external_id) DO NOTHING RETURNING id",
        source,
        str(event["id"]),
        str(event.get("type", ""))[:100],
        json.dumps(event),
        now,
        now if rejected is not None else None,
        f"rejected: {rejected}"[:500] if rejected is not None else None,
        EventOutcome.REJECTED.value if rejected is not None else None,
        object_id[:255] if object_id else None,
    )
    return int(rows[0]["id"]) if rows else None


async def process(event_id: int) -> bool:
    """Apply one stored event (caller's transaction). Returns False if already done or if
    it is still pending (kept for the sweep)."""
    lock = " FOR UPDATE" if sql.is_postgres(sql.connection()) else ""
    rows = await sql.fetch(
        f"SELECT id, type, payload, processed_at FROM gateway_event WHERE id = ?{lock}", event_id
    )
    if not rows or rows[0]["processed_at"] is not None:
        return False
    payload = rows[0]["payload"]
    event = json.loads(payload) if isinstance(payload, str) else payload
    kind = str(event.get("type", ""))
    data = event.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    if not isinstance(obj, dict):
        outcome, why = EventOutcome.IGNORED, "the event carries no object"
    else:
        outcome, why = await _dispatch(kind, obj)
    if outcome is not EventOutcome.APPLIED:
        log.info("gateway event %s (%s): %s: %s", event.get("id"), kind, outcome.value, why)
    await sql.execute(
        "UPDATE gateway_event SET processed_at = ?, attempts = attempts + 1, outcome = ?, "
        "last_error = ? WHERE id = ?",
        None if outcome is EventOutcome.PENDING else sql.now(),
        outcome.value,
        (why or None) and why[:500],
        event_id,
    )
    return outcome is not EventOutcome.PENDING


Handled = tuple[EventOutcome, str]


async def _dispatch(kind: str, obj: dict[str, Any]) -> Handled:
    if kind in ("payment_intent.succeeded", "payment_intent.payment_failed"):
        return await _payment_intent(obj)
    if kind in ("payment_method.updated", "payment_method.automatically_updated"):
        await _payment_method_updated(obj)
        return EventOutcome.APPLIED, ""
    if kind == "payment_method.detached":
        await _payment_method_detached(obj)
        return EventOutcome.APPLIED, ""
    if kind == "charge.refunded":
        return await _charge_refunded(obj)
    if kind == "charge.dispute.created":
        return await _dispute_created(obj)
    if kind == "charge.dispute.closed":
        return await _dispute_closed(obj)
    return EventOutcome.IGNORED, f"type {kind!r} is not handled"


async def count_failed_attempt(event_id: int, error: str) -> None:
    """An attempt that raised (its transaction rolled back): count it, keep the reason."""
    await sql.execute(
        "UPDATE gateway_event SET attempts = attempts + 1, last_error = ? "
        "WHERE id = ? AND processed_at IS NULL",
        error[:500],
        event_id,
    )


async def pending_events(older_than_seconds: int = 0, limit: int = 100) -> list[tuple[int, int]]:
    """Stored events not processed yet (their job was lost or failed, or they wait for a
    state they need), with their attempt counts, oldest first."""
    cutoff = sql.now() - timedelta(seconds=older_than_seconds)
    rows = await sql.fetch(
        "SELECT id, attempts FROM gateway_event WHERE processed_at IS NULL AND received_at <= ? "
        "ORDER BY attempts, id LIMIT ?",
        cutoff,
        limit,
    )
    return [(int(r["id"]), int(r["attempts"])) for r in rows]


def _str_id(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


async def _match(intent_id: str | None, metadata: Any) -> Payment | Handled | None:
    """Our payment for a gateway object: by the PaymentIntent id we stored. Metadata only
    finds a payment whose id we never learnt (a crash between the charge and its answer);
    metadata naming a payment that has another id is a mismatch, never a match."""
    if intent_id:
        payment = await Payment.get_or_none(gateway_payment_id=intent_id)
        if payment is not None:
            return payment
    raw = metadata.get("payment_id") if isinstance(metadata, dict) else None
    try:
        payment_id = uuid.UUID(str(raw)) if raw else None
    except ValueError:
        return None
    payment = await Payment.get_or_none(id=payment_id) if payment_id else None
    if payment is not None and payment.gateway_payment_id:
        reason = (
            f"names payment {payment.id} in its metadata but is {intent_id or 'no intent'}; "
            f"ours is {payment.gateway_payment_id}"
        )
        await booking.flag(payment.account_id, f"{booking.MISMATCH_FLAG} {reason}")
        return EventOutcome.MISMATCH, reason
    return payment


async def _may_become_ours(customer: Any, metadata: Any, amount: Any = None) -> bool:
    """Whether an object we can't match yet may still be ours: its customer has a payment
    whose gateway id we never learnt (a crash between the charge and its answer), and the
    object names a payment in its metadata (our PaymentIntents always do) or, for a charge
    (Stripe does not copy the intent's metadata onto it), has that payment's amount.
    Anything else (a charge made by hand in the dashboard, say) is not ours."""
    customer_id = _str_id(customer)
    named = isinstance(metadata, dict) and bool(metadata.get("payment_id"))
    if not customer_id or not (named or amount is not None):
        return False
    account = await Account.get_or_none(gateway_customer_id=customer_id)
    if account is None:
        return False
    unknown = Payment.filter(account_id=account.id, status=PaymentStatus.PENDING)
    unknown = unknown.filter(gateway_payment_id=None)
    if not named:
        try:
            unknown = unknown.filter(amount_cents=int(amount))
        except (TypeError, ValueError):
            return False
    return await unknown.exists()


async def _locked(payment: Payment) -> Payment:
    """The payment, re-read under its row lock (PostgreSQL): events of one payment that
    are processed at once (two workers) are applied one after the other."""
    if sql.is_postgres(sql.connection()):
        await sql.fetch("SELECT id FROM payment WHERE id = ? FOR UPDATE", payment.id)
    return await Payment.get(id=payment.id)


def _settled_outcome(result: Settled, payment: Payment) -> Handled:
    if result is Settled.MISMATCH:
        return EventOutcome.MISMATCH, f"does not match payment {payment.id}"
    return EventOutcome.APPLIED, ""


async def _payment_intent(intent: dict[str, Any]) -> Handled:
    intent_id = _str_id(intent.get("id"))
    found = await _match(intent_id, intent.get("metadata"))
    if isinstance(found, tuple):
        return found
    if found is None:
        if await _may_become_ours(intent.get("customer"), intent.get("metadata")):
            return EventOutcome.PENDING, f"no payment of ours for {intent_id} yet"
        return EventOutcome.IGNORED, f"payment intent {intent_id} is not ours"
    try:
        seen = charge_result(intent)
    except KeyError as exc:
        return EventOutcome.IGNORED, f"malformed payment intent: no {exc}"
    payment = await _locked(found)
    return _settled_outcome(await booking.settle(payment.id, seen), payment)


async def _payment_method_updated(pm: dict[str, Any]) -> None:
    card_info = pm.get("card") or {}
    billing = pm.get("billing_details") or {}
    address = billing.get("address") or {}
    for card in await Card.filter(gateway_payment_method_id=pm.get("id")):
        if card_info.get("exp_month"):
            card.exp_month = int(card_info["exp_month"])
        if card_info.get("exp_year"):
            card.exp_year = int(card_info["exp_year"])
        if card_info.get("last4"):
            card.last4 = str(card_info["last4"])[:4]
        if card_info.get("brand"):
            card.brand = str(card_info["brand"])[:32]
        if billing.get("name"):
            card.cardholder_name = str(billing["name"])[:200]
        if address:
            card.address_line1 = address.get("line1") or card.address_line1
            card.address_line2 = address.get("line2") or card.address_line2
            card.address_city = address.get("city") or card.address_city
            card.address_state = address.get("state") or card.address_state
            card.address_postal_code = address.get("postal_code") or card.address_postal_code
            card.address_country = address.get("country") or card.address_country
        await card.save()


async def _payment_method_detached(pm: dict[str, Any]) -> None:
    card = await Card.get_or_none(gateway_payment_method_id=pm.get("id"), removed_at=None)
    if card is not None:  # gone at the gateway: it cannot be charged, whatever the rule
        await cards.remove(card_id=card.id, scope_account_id=None, is_staff=True)


def _credit_entry_kind(payment: Payment) -> ProcessType:
    return (
        ProcessType.AUTO_RECHARGE
        if payment.kind is PaymentKind.AUTO_RECHARGE
        else ProcessType.MANUAL_PURCHASE
    )


async def _take_back(
    payment: Payment, credits: int, kind: TransactionType, description: str, reference: str | None
) -> int:
    """Remove up to ``credits`` (never below zero); return the shortfall."""
    await posting.lock_account(payment.account_id)
    balance = await posting.balance_of(payment.account_id)
    take = min(credits, balance)
    if take > 0:
        await posting.post(
            Movement(
                account_id=payment.account_id,
                credits=-take,
                type=kind,
                process_type=_credit_entry_kind(payment),
                description=description,
                reference=reference,
                payment_id=payment.id,
                opens_crossing=False,
            )
        )
    return credits - take


async def _credited(payment: Payment) -> int:
    """The credits this payment actually granted (0 if they could not be held)."""
    entry = await LedgerEntry.filter(
        payment_id=payment.id,
        type__in=[TransactionType.PURCHASE, TransactionType.AUTO_RECHARGE],
    ).first()
    return int(entry.credits) if entry else 0


async def _charge_payment(charge: dict[str, Any]) -> Payment | Handled:
    """The payment a charge belongs to, locked, checked against the charge (amount,
    currency, customer), and booked as succeeded if the charge says it was paid (a refund
    may arrive before ``payment_intent.succeeded``)."""
    intent_id = _str_id(charge.get("payment_intent"))
    found = await _match(intent_id, charge.get("metadata"))
    if isinstance(found, tuple):
        return found
    if found is None:
        if intent_id and await _may_become_ours(
            charge.get("customer"), charge.get("metadata"), charge.get("amount")
        ):
            return EventOutcome.PENDING, f"no payment of ours for {intent_id} yet"
        return EventOutcome.IGNORED, f"charge of payment intent {intent_id} is not ours"
    payment = await _locked(found)
    seen = ChargeResult(
        ChargeStatus.SUCCEEDED,
        intent_id,
        amount_cents=int(charge["amount"]) if charge.get("amount") is not None else None,
        currency=str(charge["currency"]).lower() if charge.get("currency") else None,
        customer_id=_str_id(charge.get("customer")),
    )
    problem = await booking.mismatch_of(payment, seen)
    if problem is not None:
        await booking.flag(
            payment.account_id, f"{booking.MISMATCH_FLAG} payment {payment.id}: {problem}"
        )
        return EventOutcome.MISMATCH, f"does not match payment {payment.id}: {problem}"
    if payment.status not in (PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED):
        if charge.get("status") == "succeeded" or charge.get("paid") is True:
            await booking.settle(payment.id, seen)
            payment = await Payment.get(id=payment.id)
        else:
            return EventOutcome.PENDING, f"payment {payment.id} is not paid yet"
    return payment


async def _charge_refunded(charge: dict[str, Any]) -> Handled:
    found = await _charge_payment(charge)
    if not isinstance(found, Payment):
        return found
    payment = found
    refunded_total = min(int(charge.get("amount_refunded") or 0), payment.amount_cents)
    if refunded_total <= payment.refunded_cents:
        return EventOutcome.IGNORED, "an older or repeated notice"
    # Credits follow the refunded share of what the payment granted, computed on totals so
    # that several partial refunds never drift from one full refund. A payment whose
    # credits could not be held granted nothing, so its refund takes nothing.
    credited = await _credited(payment)
    credits = (
        credited * refunded_total // payment.amount_cents
        - credited * payment.refunded_cents // payment.amount_cents
    )
    shortfall = (
        await _take_back(
            payment,
            credits,
            TransactionType.REFUND,
            f"Refund of {refunded_total / 100:.2f} {payment.currency.upper()} on a card payment",
            None,
        )
        if credits > 0
        else 0
    )
    status = PaymentStatus.REFUNDED if refunded_total >= payment.amount_cents else payment.status
    await Payment.filter(id=payment.id).update(
        refunded_cents=refunded_total, status=status, updated_at=sql.now()
    )
    if shortfall:
        await booking.flag(
            payment.account_id,
            f"Refund exceeded the balance by {shortfall} credits (payment {payment.id})",
        )
    return EventOutcome.APPLIED, ""


def _dispute_reference(dispute: dict[str, Any]) -> str:
    return f"dispute:{dispute.get('id')}"


#: Stripe's inquiries (``warning_*``) withdraw no funds: nothing is taken or given back.
_INQUIRY_PREFIX = "warning_"


async def _dispute_payment(dispute: dict[str, Any]) -> Payment | Handled:
    intent_id = _str_id(dispute.get("payment_intent"))
    found = await _match(intent_id, dispute.get("metadata"))
    if isinstance(found, tuple):
        return found
    if found is None:
        return EventOutcome.IGNORED, f"dispute of payment intent {intent_id} is not ours"
    payment = await _locked(found)
    currency = dispute.get("currency")
    if currency and str(currency).lower() != payment.currency.lower():
        reason = f"dispute in {currency}, payment {payment.id} is in {payment.currency}"
        await booking.flag(payment.account_id, f"{booking.MISMATCH_FLAG} {reason}")
        return EventOutcome.MISMATCH, reason
    if payment.status not in (PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED):
        # A dispute is of a paid charge: wait for the success to be booked (the sweep
        # re-reads the PaymentIntent), then take the credits.
        return EventOutcome.PENDING, f"payment {payment.id} is not paid yet"
    return payment


async def _dispute_created(dispute: dict[str, Any]) -> Handled:
    if str(dispute.get("status") or "").startswith(_INQUIRY_PREFIX):
        return EventOutcome.IGNORED, "an inquiry: no funds are withdrawn"
    found = await _dispute_payment(dispute)
    if not isinstance(found, Payment):
        return found
    payment = found
    reference = _dispute_reference(dispute)
    if await LedgerEntry.exists(account_id=payment.account_id, reference=reference):
        return EventOutcome.IGNORED, "dispute already booked"
    open_cents = payment.amount_cents - payment.refunded_cents
    amount = min(int(dispute.get("amount") or open_cents), open_cents)
    credits = (await _credited(payment)) * amount // payment.amount_cents
    if credits > 0:
        await _take_back(
            payment,
            credits,
            TransactionType.ADJUSTMENT,
            f"Card payment disputed ({dispute.get('reason') or 'no reason given'})",
            reference,
        )
    await booking.flag(
        payment.account_id, f"Card payment {payment.id} disputed ({dispute.get('id')})"
    )
    return EventOutcome.APPLIED, ""


async def _dispute_closed(dispute: dict[str, Any]) -> Handled:
    """A dispute won gives back what its opening took; lost (or an inquiry) keeps it."""
    if dispute.get("status") != "won":
        return EventOutcome.IGNORED, f"dispute closed as {dispute.get('status')}"
    found = await _dispute_payment(dispute)
    if not isinstance(found, Payment):
        return found
    payment = found
    reference = _dispute_reference(dispute)
    taken = await LedgerEntry.filter(account_id=payment.account_id, reference=reference).first()
    if taken is None:
        opened = await GatewayEvent.exists(
            type="charge.dispute.created",
            object_id=str(dispute.get("id")),
            outcome=EventOutcome.APPLIED.value,
        )
        if opened:
            return EventOutcome.IGNORED, "the dispute's opening took no credits"
        return EventOutcome.PENDING, "the dispute's opening is not booked yet"
    won = f"{reference}:won"
    if await LedgerEntry.exists(account_id=payment.account_id, reference=won):
        return EventOutcome.IGNORED, "dispute win already booked"
    await posting.lock_account(payment.account_id)
    try:
        await posting.post(
            Movement(
                account_id=payment.account_id,
                credits=-taken.credits,
                type=TransactionType.ADJUSTMENT,
                process_type=_credit_entry_kind(payment),
                description="Card payment dispute won: credits returned",
                reference=won,
                payment_id=payment.id,
            )
        )
    except BillingError as exc:
        if not any(e.code is ErrorCode.BALANCE_LIMIT for e in exc.errors):
            raise
        await booking.flag(
            payment.account_id,
            f"Dispute {dispute.get('id')} won, but its {-taken.credits:,} credits would pass "
            "the balance limit: not returned",
        )
        return EventOutcome.APPLIED, "won, but the credits could not be held (flagged)"
    return EventOutcome.APPLIED, ""
