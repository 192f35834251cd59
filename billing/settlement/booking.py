"""Settlement: the one place a payment's outcome at the gateway is booked here.

Every path that learns something about a payment (the purchase's own call, ``confirmPurchase``,
an auto-recharge or invoice run, a Stripe webhook, the sweep) hands ``settle`` what the
gateway says about it now (a ``ChargeResult``), and ``settle`` brings our payment row, the
ledger and the notices to match, idempotently. The rules (invariant 9):

- **The gateway object is checked first.** Its id must be the one we stored (or, for a payment
  whose id we never learnt, it is adopted), and what it charged must be what we asked for:
  amount, currency and customer. A mismatch changes nothing; the account is flagged and the
  caller is told (``Settled.MISMATCH``), so the webhook keeps the event as ``mismatch`` and
  reconciliation reports it.
- **Only the gateway's final states are final here.** A success is applied from ``PENDING``,
  ``REQUIRES_ACTION`` *and* ``FAILED``: Stripe's ``requires_payment_method`` (a failed
  3-D Secure challenge, a decline) can still be retried on the same PaymentIntent and
  succeed. Its credits land once: the status change is a conditional ``UPDATE``.
- A purchase marked ``FAILED`` that the customer retries and that needs authentication again
  goes back to ``REQUIRES_ACTION`` (it can be finished on the billing page); off-session kinds
  (auto-recharge, invoice) never wait for a customer, so they don't.
- What a settled payment means besides credits is booked by its kind: an auto-recharge on its
  setting (``runs.settle``), an invoice payment on its invoice (``invoices.settle_payment``).
  Those modules build on this one, so each registers its booker here when it is imported
  (``register_booker``); settling a kind whose booker is missing raises.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum

from billing import sql
from billing.enums import (
    ErrorCode,
    PaymentKind,
    PaymentStatus,
    ProcessType,
    TransactionType,
)
from billing.errors import BillingError
from billing.ledger import posting
from billing.ledger.posting import Movement
from billing.models import Account, Payment
from billing.payments.gateways import ChargeResult, ChargeStatus

log = logging.getLogger(__name__)

#: What books a finished payment of a kind on what it paid for (caller's transaction).
Booker = Callable[[Payment], Awaitable[object]]
_BOOKERS: dict[PaymentKind, Booker] = {}
#: A purchase means its credits and nothing more.
_NOTHING_TO_BOOK = frozenset({PaymentKind.PURCHASE})


def register_booker(kind: PaymentKind, booker: Booker) -> None:
    """Book ``kind``'s finished payments with ``booker`` (called once, at import, by the
    module that owns the kind: ``billing.recharge.runs``, ``billing.invoices``)."""
    _BOOKERS[kind] = booker


async def book(payment: Payment) -> None:
    """Book what finished ``payment`` means by its kind again (idempotent, as every booker
    is): the sweep's second look at a payment it healed."""
    await _book(payment)


_CREDIT_ENTRY = {
    PaymentKind.PURCHASE: (TransactionType.PURCHASE, ProcessType.MANUAL_PURCHASE, "Purchased"),
    PaymentKind.AUTO_RECHARGE: (
        TransactionType.AUTO_RECHARGE,
        ProcessType.AUTO_RECHARGE,
        "Auto-recharged",
    ),
}
#: States the gateway may still leave: a success is applied from any of them.
_NOT_SUCCEEDED = (
    PaymentStatus.PENDING.value,
    PaymentStatus.REQUIRES_ACTION.value,
    PaymentStatus.FAILED.value,
)


#: How a mismatch flag starts (reconciliation reports the accounts that carry one).
MISMATCH_FLAG = "Gateway mismatch:"


class Settled(StrEnum):
    CHANGED = "changed"  # this call moved the payment (and booked what that means)
    UNCHANGED = "unchanged"  # already there, or a state we keep as it is
    MISMATCH = "mismatch"  # the gateway object contradicts the payment: nothing moved


def _id(value: uuid.UUID) -> object:
    return value if sql.is_postgres(sql.connection()) else str(value)


async def mismatch_of(payment: Payment, seen: ChargeResult) -> str | None:
    """Why ``seen`` is not this payment's gateway object, or ``None`` if it may be."""
    problems: list[str] = []
    if (
        payment.gateway_payment_id
        and seen.gateway_payment_id
        and payment.gateway_payment_id != seen.gateway_payment_id
    ):
        problems.append(
            f"gateway id {seen.gateway_payment_id}, ours is {payment.gateway_payment_id}"
        )
    if seen.amount_cents is not None and seen.amount_cents != payment.amount_cents:
        problems.append(f"amount {seen.amount_cents}, we asked for {payment.amount_cents}")
    if seen.currency is not None and seen.currency.lower() != payment.currency.lower():
        problems.append(f"currency {seen.currency}, we asked for {payment.currency}")
    if seen.customer_id is not None:
        account = await Account.get(id=payment.account_id)
        if account.gateway_customer_id and account.gateway_customer_id != seen.customer_id:
            problems.append(
                f"customer {seen.customer_id}, the account's is {account.gateway_customer_id}"
            )
    return "; ".join(problems) or None


#: How a flag for a card payment taken twice starts (reconciliation reports it too).
PAID_TWICE_FLAG = "Paid twice:"
#: Flags that reconciliation reports: each needs billing staff to act on money.
REPORTED_FLAGS = (MISMATCH_FLAG, PAID_TWICE_FLAG)


async def flag(account_id: str, reason: str) -> None:
    """Mark an account for billing staff (shown on the account; the kinds in
    ``REPORTED_FLAGS`` also by reconciliation). A new reason is added in front of the ones
    already there, so an earlier one is not lost before staff have cleared it."""
    account = await Account.get_or_none(id=account_id)
    earlier = account.flag_reason if account is not None else None
    text = reason if not earlier or reason in earlier else f"{reason} | {earlier}"
    await Account.filter(id=account_id).update(flag_reason=text[:500], flagged_at=sql.now())


async def settle(payment_id: uuid.UUID, seen: ChargeResult) -> Settled:
    """Bring payment ``payment_id`` to what the gateway says (``seen``). Caller's transaction.

    Idempotent: the same ``seen`` twice, or in any order with other observations, books each
    outcome once. Returns what happened; ``MISMATCH`` changes nothing but the account's flag.
    """
    payment = await Payment.get(id=payment_id)
    problem = await mismatch_of(payment, seen)
    if problem is not None:
        log.warning("payment %s: gateway object does not match: %s", payment.id, problem)
        await flag(payment.account_id, f"{MISMATCH_FLAG} payment {payment.id}: {problem}")
        return Settled.MISMATCH
    now = sql.now()
    if seen.status is ChargeStatus.SUCCEEDED:
        return await _succeeded(payment, seen, now)
    if seen.status is ChargeStatus.REQUIRES_ACTION:
        reopen = (PaymentStatus.PENDING.value,) + (
            (PaymentStatus.FAILED.value,) if payment.kind is PaymentKind.PURCHASE else ()
        )
        marks = ", ".join("?" * len(reopen))
        changed = await sql.execute(
            "UPDATE payment SET status = ?, gateway_payment_id = COALESCE(gateway_payment_id, ?), "
            "client_secret = ?, failure_code = NULL, failure_message = NULL, updated_at = ? "
            f"WHERE id = ? AND status IN ({marks})",
            PaymentStatus.REQUIRES_ACTION.value,
            seen.gateway_payment_id,
            seen.client_secret,
            now,
            _id(payment.id),
            *reopen,
        )
        return Settled.CHANGED if changed else Settled.UNCHANGED
    if seen.status is ChargeStatus.FAILED:
        changed = await sql.execute(
            "UPDATE payment SET status = ?, gateway_payment_id = COALESCE(gateway_payment_id, ?), "
            "client_secret = NULL, failure_code = ?, failure_message = ?, updated_at = ? "
            "WHERE id = ? AND status IN (?, ?)",
            PaymentStatus.FAILED.value,
            seen.gateway_payment_id,
            seen.decline_code or seen.failure_code,
            (seen.failure_message or "The card was declined.")[:500],
            now,
            _id(payment.id),
            PaymentStatus.PENDING.value,
            PaymentStatus.REQUIRES_ACTION.value,
        )
        if changed:
            await _book(await Payment.get(id=payment.id))
        return Settled.CHANGED if changed else Settled.UNCHANGED
    # PROCESSING: nothing final; remember the gateway's id so the sweep can re-read it.
    if seen.gateway_payment_id and not payment.gateway_payment_id:
        await sql.execute(
            "UPDATE payment SET gateway_payment_id = ?, updated_at = ? "
            "WHERE id = ? AND gateway_payment_id IS NULL",
            seen.gateway_payment_id,
            now,
            _id(payment.id),
        )
    return Settled.UNCHANGED


async def _succeeded(payment: Payment, seen: ChargeResult, now: object) -> Settled:
    marks = ", ".join("?" * len(_NOT_SUCCEEDED))
    changed = await sql.execute(
        "UPDATE payment SET status = ?, gateway_payment_id = COALESCE(gateway_payment_id, ?), "
        "client_secret = NULL, failure_code = NULL, failure_message = NULL, settled_at = NULL, "
        f"updated_at = ? WHERE id = ? AND status IN ({marks})",
        PaymentStatus.SUCCEEDED.value,
        seen.gateway_payment_id,
        now,
        _id(payment.id),
        *_NOT_SUCCEEDED,
    )
    if not changed:
        return Settled.UNCHANGED
    if payment.status is PaymentStatus.FAILED:
        log.info("payment %s failed here but succeeded at the gateway: booked now", payment.id)
    payment = await Payment.get(id=payment.id)
    if payment.kind in _CREDIT_ENTRY:
        kind, process, verb = _CREDIT_ENTRY[payment.kind]
        try:
            await posting.post(
                Movement(
                    account_id=payment.account_id,
                    credits=payment.credits,
                    type=kind,
                    process_type=process,
                    description=f"{verb} {payment.credits:,} credits",
                    user_id=payment.created_by,
                    payment_id=payment.id,
                )
            )
        except BillingError as exc:
            if not any(e.code is ErrorCode.BALANCE_LIMIT for e in exc.errors):
                raise
            # Paid, but the credits can't be held: never drop the money silently.
            await flag(
                payment.account_id,
                f"Payment {payment.id} succeeded but its {payment.credits:,} credits would "
                "pass the balance limit: refund it or move credits",
            )
    await _book(payment)
    return Settled.CHANGED


async def _book(payment: Payment) -> None:
    """What a finished payment means besides credits, by kind (caller's transaction)."""
    if payment.kind in _NOTHING_TO_BOOK:
        return
    booker = _BOOKERS.get(payment.kind)
    if booker is None:  # a programming error: the module that books this kind is not loaded
        raise RuntimeError(f"no booker registered for {payment.kind} payments")
    await booker(payment)
