"""Gateway events (Stripe webhooks): stored once by id, then processed by a job.

Processing is idempotent: payment outcomes go through ``purchases.apply_charge_result``
(a conditional status change), refunds track the refunded amount on the payment, and a
dispute is keyed by its id, so an event seen twice, or two events telling the same thing,
move nothing twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta
from typing import Any

from billing import cards, ledger, recharge, sql
from billing.enums import PaymentKind, PaymentStatus, ProcessType, TransactionType
from billing.gateways.stripe_gateway import charge_result
from billing.ledger import Movement
from billing.models import Account, Card, LedgerEntry, Payment
from billing.purchases import apply_charge_result

log = logging.getLogger(__name__)

HANDLED = frozenset(
    {
        "payment_intent.succeeded",
        "payment_intent.payment_failed",
        "payment_method.updated",
        "payment_method.automatically_updated",
        "payment_method.detached",
        "charge.refunded",
        "charge.dispute.created",
    }
)


async def record(source: str, event: dict[str, Any], *, rejected: str | None = None) -> int | None:
    """Store an event once; return its row id if this call stored it (then enqueue it).
    A ``rejected`` event (signed, but malformed) is stored as done, with the reason: kept
    for the record, never processed."""
    sql.connection()
    now = sql.now()
    rows = await sql.fetch(
        "INSERT INTO gateway_event (source, external_id, type, payload, received_at, attempts, "
        "processed_at, last_error) "
        "VALUES (?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT (source, external_id) DO NOTHING RETURNING id",
        source,
        str(event["id"]),
        str(event.get("type", ""))[:100],
        json.dumps(event),
        now,
        now if rejected is not None else None,
        f"rejected: {rejected}"[:500] if rejected is not None else None,
    )
    return int(rows[0]["id"]) if rows else None


async def process(event_id: int) -> bool:
    """Apply one stored event (caller's transaction). Returns False if already done."""
    lock = " FOR UPDATE" if sql.is_postgres(sql.connection()) else ""
    rows = await sql.fetch(
        f"SELECT id, type, payload, processed_at FROM gateway_event WHERE id = ?{lock}", event_id
    )
    if not rows or rows[0]["processed_at"] is not None:
        return False
    payload = rows[0]["payload"]
    event = json.loads(payload) if isinstance(payload, str) else payload
    kind = str(event.get("type", ""))
    obj = event.get("data", {}).get("object", {})
    if kind in ("payment_intent.succeeded", "payment_intent.payment_failed"):
        await _payment_intent(obj)
    elif kind in ("payment_method.updated", "payment_method.automatically_updated"):
        await _payment_method_updated(obj)
    elif kind == "payment_method.detached":
        await _payment_method_detached(obj)
    elif kind == "charge.refunded":
        await _charge_refunded(obj)
    elif kind == "charge.dispute.created":
        await _dispute_created(obj)
    else:
        log.info("ignoring gateway event %s of type %s", event.get("id"), kind)
    sql.connection()
    await sql.execute(
        "UPDATE gateway_event SET processed_at = ?, attempts = attempts + 1 WHERE id = ?",
        sql.now(),
        event_id,
    )
    return True


async def pending_event_ids(older_than_seconds: int = 0, limit: int = 100) -> list[int]:
    """Stored events not processed yet (their job was lost, or failed)."""
    cutoff = sql.now() - timedelta(seconds=older_than_seconds)
    rows = await sql.fetch(
        "SELECT id FROM gateway_event WHERE processed_at IS NULL AND received_at <= ? "
        "ORDER BY id LIMIT ?",
        cutoff,
        limit,
    )
    return [int(r["id"]) for r in rows]


async def _find_payment(intent_id: str | None, metadata: dict[str, Any] | None) -> Payment | None:
    if intent_id:
        payment = await Payment.get_or_none(gateway_payment_id=intent_id)
        if payment is not None:
            return payment
    raw = (metadata or {}).get("payment_id")
    try:
        payment_id = uuid.UUID(str(raw)) if raw else None
    except ValueError:
        return None
    return await Payment.get_or_none(id=payment_id) if payment_id else None


async def _payment_intent(intent: dict[str, Any]) -> None:
    payment = await _find_payment(intent.get("id"), intent.get("metadata"))
    if payment is None:
        log.info("payment intent %s is not ours", intent.get("id"))
        return
    await apply_charge_result(payment.id, charge_result(intent))
    if payment.kind is PaymentKind.AUTO_RECHARGE:
        await recharge.settle(payment.id)


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
    payment: Payment, credits: int, kind: TransactionType, description: str
) -> int:
    """Remove up to ``credits`` (never below zero); return the shortfall."""
    await ledger.lock_account(payment.account_id)
    balance = await ledger.balance_of(payment.account_id)
    take = min(credits, balance)
    if take > 0:
        await ledger.post(
            Movement(
                account_id=payment.account_id,
                credits=-take,
                type=kind,
                process_type=_credit_entry_kind(payment),
                description=description,
                payment_id=payment.id,
            )
        )
    return credits - take


async def _flag(account_id: str, reason: str) -> None:
    await Account.filter(id=account_id).update(flag_reason=reason[:500], flagged_at=sql.now())


async def _charge_refunded(charge: dict[str, Any]) -> None:
    payment = await _find_payment(charge.get("payment_intent"), charge.get("metadata"))
    if payment is None or payment.status not in (PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED):
        return
    refunded_total = min(int(charge.get("amount_refunded") or 0), payment.amount_cents)
    if refunded_total <= payment.refunded_cents:
        return  # an older or repeated notice
    # Credits follow the refunded share of the payment, computed on totals so that
    # several partial refunds never drift from one full refund.
    credits = (
        payment.credits * refunded_total // payment.amount_cents
        - payment.credits * payment.refunded_cents // payment.amount_cents
    )
    shortfall = (
        await _take_back(
            payment,
            credits,
            TransactionType.REFUND,
            f"Refund of {refunded_total / 100:.2f} {payment.currency.upper()} on a card payment",
        )
        if credits > 0
        else 0
    )
    status = PaymentStatus.REFUNDED if refunded_total >= payment.amount_cents else payment.status
    await Payment.filter(id=payment.id).update(
        refunded_cents=refunded_total, status=status, updated_at=sql.now()
    )
    if shortfall:
        await _flag(
            payment.account_id,
            f"Refund exceeded the balance by {shortfall} credits (payment {payment.id})",
        )


async def _dispute_created(dispute: dict[str, Any]) -> None:
    payment = await _find_payment(dispute.get("payment_intent"), dispute.get("metadata"))
    if payment is None:
        return
    reference = f"dispute:{dispute.get('id')}"
    if await LedgerEntry.exists(account_id=payment.account_id, reference=reference):
        return
    amount = min(int(dispute.get("amount") or payment.amount_cents), payment.amount_cents)
    credits = payment.credits * amount // payment.amount_cents
    await ledger.lock_account(payment.account_id)
    balance = await ledger.balance_of(payment.account_id)
    take = min(credits, balance)
    if take > 0:
        await ledger.post(
            Movement(
                account_id=payment.account_id,
                credits=-take,
                type=TransactionType.ADJUSTMENT,
                process_type=_credit_entry_kind(payment),
                description=f"Card payment disputed ({dispute.get('reason') or 'no reason given'})",
                reference=reference,
                payment_id=payment.id,
            )
        )
    await _flag(payment.account_id, f"Card payment {payment.id} disputed ({dispute.get('id')})")
