"""Monthly invoices for metered usage, charged off-session to the card on file.

Closing a month (``close_month``, caller's transaction) turns an account's metered usage of
one calendar month, in the account's time zone, into one ``OPEN`` invoice with a line per
process type. The unique ``(account, period_start)`` makes it idempotent.

Charging (``charge_invoice``) owns its transactions, like a purchase:

1. Claim: a conditional update that succeeds only while the invoice is ``OPEN`` and due
   moves ``next_attempt_at`` to the end of a lease, so a second caller finds it not due.
   In the same transaction the attempt's payment row is written (``PENDING``, ``trigger_key``
   ``invoice:{id}:{attempt}``; its unique constraint is the last guard against two charges
   for one attempt).
2. The gateway is called with no transaction open, off-session, with an idempotency key
   derived from the payment row, so repeating an attempt never charges twice.
3. The outcome is applied by ``booking.settle`` (a conditional status
   change), which calls ``settle_payment`` here: the invoice becomes ``PAID`` or counts a
   failed attempt, with its notification, in that same transaction. A Stripe webhook or the
   stuck-payment sweep applying the same outcome goes through the same path, once.

A decline (or no card) is retried with backoff; after ``MAX_ATTEMPTS`` the invoice is
``FAILED`` and the admins are told. An unreachable gateway counts nothing: the attempt is
repeated (same payment, same idempotency key) once the lease has run out.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tortoise.exceptions import IntegrityError
from tortoise.expressions import Q
from tortoise.transactions import in_transaction

from billing import sql
from billing.enums import InvoiceStatus, NotificationKind, PaymentKind, PaymentStatus
from billing.models import Account, Card, Invoice, InvoiceLine, Payment
from billing.notifications import outbox
from billing.payments import cards
from billing.payments.gateways import (
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    GatewayUnavailable,
    PaymentGateway,
    gateway_key,
    minimum_charge_cents,
)
from billing.settlement import booking
from billing.spending.quota import month_bounds

log = logging.getLogger(__name__)

#: Charge attempts before an invoice is FAILED; the waits after the 1st, 2nd, 3rd failure.
MAX_ATTEMPTS = 4
BACKOFF = (timedelta(hours=1), timedelta(hours=6), timedelta(hours=24))
#: How long a claimed attempt is left alone (a gateway outage is retried after it).
CLAIM_LEASE = timedelta(minutes=15)
#: A month is closed this long after it ends, so that usage written in its last instant
#: (its transaction still committing at midnight) is on its invoice, not lost between two.
MONTH_CLOSE_GRACE = timedelta(minutes=5)
#: Wider than any UTC offset (-12h .. +14h): the window that holds every zone's last month.
_ZONE_SPREAD = timedelta(hours=15)
_LAST_INSTANT = timedelta(microseconds=1)
_CHUNK = 500  # account ids per IN (...) list
NO_CARD_MESSAGE = "There is no card on file to charge."
#: The largest invoice the API can show (GraphQL Int; invariant 10).
MAX_INVOICE_CENTS = 2**31 - 1
AUTH_MESSAGE = "The card needs the cardholder to authenticate the payment."


# ---------------------------------------------------------------- periods


def zone_name(timezone: str | None) -> str:
    """The account's IANA time zone, or UTC if it is missing or unknown."""
    if not timezone:
        return "UTC"
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        log.warning("unknown time zone %r: using UTC", timezone)
        return "UTC"
    return timezone


def last_closed_month(now: datetime, timezone: str) -> tuple[datetime, datetime]:
    """The calendar month before the one containing ``now`` in ``timezone``, in UTC."""
    this_start, _ = month_bounds(now, zone_name(timezone))
    return month_bounds(this_start - _LAST_INSTANT, zone_name(timezone))


def _search_window(now: datetime) -> tuple[datetime, datetime]:
    """A UTC range that contains the last closed month of every time zone."""
    early_start, _ = month_bounds(now - _ZONE_SPREAD, "UTC")
    lower, _ = month_bounds(early_start - _LAST_INSTANT, "UTC")
    upper, _ = month_bounds(now + _ZONE_SPREAD, "UTC")
    return lower - _ZONE_SPREAD, upper + _ZONE_SPREAD


@dataclass(frozen=True, slots=True)
class MonthToClose:
    account_id: str
    timezone: str
    period_start: datetime
    period_end: datetime


# A loose index scan over metered_usage (account_id, created_at): each step jumps to the
# next account id with usage (one index probe), and the EXISTS is one range probe per
# account. It reads accounts that ever had metered usage, never the account table as a whole.
_ACCOUNTS_WITH_USAGE = """
WITH RECURSIVE usage_account(account_id) AS (
    SELECT MIN(account_id) FROM metered_usage
    UNION ALL
    SELECT (SELECT MIN(m.account_id) FROM metered_usage m WHERE m.account_id > u.account_id)
    FROM usage_account u WHERE u.account_id IS NOT NULL
)
SELECT u.account_id AS account_id,
    (SELECT a.timezone FROM credit_account a WHERE a.id = u.account_id) AS timezone
FROM usage_account u
WHERE u.account_id IS NOT NULL AND EXISTS (
    SELECT 1 FROM metered_usage m
    WHERE m.account_id = u.account_id AND m.created_at >= ? AND m.created_at < ?
)
ORDER BY u.account_id
"""


async def months_to_close(now: datetime | None = None) -> list[MonthToClose]:
    """Accounts with metered usage in their last closed month (own time zone, closed
    ``MONTH_CLOSE_GRACE`` after its end) and no invoice for it yet."""
    at = (now or sql.now()) - MONTH_CLOSE_GRACE
    lower, upper = _search_window(at)
    candidates = await sql.fetch(_ACCOUNTS_WITH_USAGE, lower, upper)
    if not candidates:
        return []
    ids = [str(r["account_id"]) for r in candidates]
    invoiced: set[tuple[str, datetime]] = set()
    for chunk in range(0, len(ids), _CHUNK):
        invoiced.update(
            (str(account), start)
            for account, start in await Invoice.filter(
                account_id__in=ids[chunk : chunk + _CHUNK],
                period_start__gte=lower,
                period_start__lt=upper,
            ).values_list("account_id", "period_start")
        )
    due: list[MonthToClose] = []
    for row in candidates:
        account_id, timezone = str(row["account_id"]), zone_name(row["timezone"])
        start, end = last_closed_month(at, timezone)
        if (account_id, start) in invoiced:
            continue
        rows = await sql.fetch(
            "SELECT 1 AS found FROM metered_usage "
            "WHERE account_id = ? AND created_at >= ? AND created_at < ? LIMIT 1",
            account_id,
            start,
            end,
        )
        if rows:
            due.append(MonthToClose(account_id, timezone, start, end))
    return due


# ---------------------------------------------------------------- closing a month


@dataclass(frozen=True, slots=True)
class ClosedMonth:
    invoice: Invoice
    created: bool  # False: the month was closed before (the invoice is the earlier one)


async def close_month(
    account_id: str, period_start: datetime, period_end: datetime, *, currency: str
) -> ClosedMonth | None:
    """Invoice the account's metered usage in [period_start, period_end) (caller's
    transaction). Idempotent per (account, period_start); None if there was no usage.

    Amounts carried from earlier months (each under the gateway's minimum charge) are added
    to this invoice (``carried_in_cents``); if the total is still under the minimum, this
    invoice is ``CARRIED_FORWARD`` too, never sent to the gateway (invariant 11)."""
    rows = await sql.fetch(
        "SELECT process_type, SUM(quantity) AS quantity, SUM(amount_cents) AS amount "
        "FROM metered_usage WHERE account_id = ? AND created_at >= ? AND created_at < ? "
        "GROUP BY process_type ORDER BY process_type",
        account_id,
        period_start,
        period_end,
    )
    if not rows:
        return None
    lines = [(str(r["process_type"]), int(r["quantity"]), int(r["amount"])) for r in rows]
    carried = await Invoice.filter(
        account_id=account_id,
        status=InvoiceStatus.CARRIED_FORWARD,
        carried_into_id=None,
        period_start__lt=period_start,
    )
    usage_cents = sum(amount for _, _, amount in lines)
    carried_in = sum(int(i.amount_cents) for i in carried)
    if usage_cents + carried_in > MAX_INVOICE_CENTS:
        carried, carried_in = [], 0  # kept for a later month: this one is full already
    total = usage_cents + carried_in
    now = sql.now()
    invoice_id = uuid.uuid4()
    if total == 0:
        status = InvoiceStatus.PAID  # nothing to charge (a zero price): settled at once
    elif total < minimum_charge_cents(currency):
        status = InvoiceStatus.CARRIED_FORWARD
    else:
        status = InvoiceStatus.OPEN
    inserted = await sql.fetch(
        "INSERT INTO invoice (id, account_id, period_start, period_end, status, amount_cents, "
        "currency, attempts, paid_at, carried_in_cents, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?) "
        "ON CONFLICT (account_id, period_start) DO NOTHING RETURNING id",
        _uuid_param(invoice_id),
        account_id,
        period_start,
        period_end,
        status.value,
        total,
        currency.lower(),
        now if status is InvoiceStatus.PAID else None,
        carried_in,
        now,
    )
    if not inserted:
        existing = await Invoice.get(account_id=account_id, period_start=period_start)
        return ClosedMonth(existing, created=False)
    if carried:
        await Invoice.filter(id__in=[i.id for i in carried], carried_into_id=None).update(
            carried_into_id=invoice_id
        )
    await InvoiceLine.bulk_create(
        [
            InvoiceLine(
                invoice_id=invoice_id, process_type=process, quantity=qty, amount_cents=amount
            )
            for process, qty, amount in lines
        ]
    )
    return ClosedMonth(await Invoice.get(id=invoice_id), created=True)


# ---------------------------------------------------------------- charging


class ChargeOutcome(StrEnum):
    PAID = "paid"  # this call (or an earlier one) got it paid
    RETRY_SCHEDULED = "retry_scheduled"  # declined or no card: tried again after a backoff
    FAILED = "failed"  # the last attempt failed (or it had failed before)
    NOT_DUE = "not_due"  # in backoff, or another caller holds the attempt
    IN_FLIGHT = "in_flight"  # the gateway has not finished (processing): looked at later
    GATEWAY_UNAVAILABLE = "gateway_unavailable"  # counted nothing; repeated after the lease
    NOT_FOUND = "not_found"
    CARRIED_FORWARD = "carried_forward"  # under the minimum charge: added to next month's


def trigger_key(invoice_id: uuid.UUID | str, attempt: int) -> str:
    """One payment per charge attempt of an invoice."""
    return f"invoice:{invoice_id}:{attempt}"


def _parse_trigger_key(key: str | None) -> tuple[uuid.UUID, int] | None:
    if not key or not key.startswith("invoice:"):
        return None
    _, raw_id, raw_attempt = key.split(":", 2)
    try:
        return uuid.UUID(raw_id), int(raw_attempt)
    except ValueError:
        return None


def next_attempt(invoice: Invoice) -> int:
    return invoice.attempts + 1


@dataclass(frozen=True, slots=True)
class _Attempt:
    invoice: Invoice
    payment: Payment
    card: Card | None
    customer_id: str
    month: str  # the invoice's month, as the account says it ("March 2031")
    resume: bool  # the attempt's payment existed: repeat it with the same idempotency key


async def charge_invoice(gateway: PaymentGateway, invoice_id: uuid.UUID) -> ChargeOutcome:
    """Try to charge an OPEN, due invoice once (owns its transactions)."""
    try:
        async with in_transaction():
            claim = await _claim(invoice_id)
    except IntegrityError:
        # Another caller wrote this attempt's payment first (trigger_key is unique).
        log.info("invoice %s: attempt already taken by another caller", invoice_id)
        return ChargeOutcome.NOT_DUE
    if isinstance(claim, ChargeOutcome):
        return claim
    payment = claim.payment
    try:
        if claim.resume and payment.gateway_payment_id:
            result = await gateway.retrieve_charge(payment.gateway_payment_id)
        else:
            result = await gateway.charge(
                ChargeRequest(
                    customer_id=claim.customer_id,
                    payment_method_id=claim.card.gateway_payment_method_id if claim.card else "",
                    amount_cents=payment.amount_cents,
                    currency=payment.currency,
                    idempotency_key=gateway_key(payment.id),
                    off_session=True,
                    description=f"Invoice for {claim.month} metered usage",
                    metadata={
                        "payment_id": str(payment.id),
                        "account_id": payment.account_id,
                        "invoice_id": str(claim.invoice.id),
                    },
                )
            )
    except GatewayUnavailable:
        # Charged or not, we can't tell: the payment stays PENDING and the same attempt is
        # repeated with the same idempotency key after the lease (or by the payment sweep).
        log.warning("gateway unavailable for invoice %s; attempt left for later", invoice_id)
        return ChargeOutcome.GATEWAY_UNAVAILABLE
    if result.status is ChargeStatus.REQUIRES_ACTION:
        # Off-session there is nobody to authenticate: that is a failed attempt.
        result = ChargeResult(
            ChargeStatus.FAILED,
            result.gateway_payment_id,
            failure_code="authentication_required",
            decline_code="authentication_required",
            failure_message=AUTH_MESSAGE,
        )
    async with in_transaction():
        await booking.settle(payment.id, result)
        invoice = await Invoice.get(id=invoice_id)
    if result.status is ChargeStatus.PROCESSING:
        return ChargeOutcome.IN_FLIGHT
    return _outcome_of(invoice)


def _outcome_of(invoice: Invoice) -> ChargeOutcome:
    if invoice.status is InvoiceStatus.PAID:
        return ChargeOutcome.PAID
    if invoice.status is InvoiceStatus.CARRIED_FORWARD:
        return ChargeOutcome.CARRIED_FORWARD
    if invoice.status is InvoiceStatus.FAILED:
        return ChargeOutcome.FAILED
    return ChargeOutcome.RETRY_SCHEDULED


async def _claim(invoice_id: uuid.UUID) -> _Attempt | ChargeOutcome:
    """Take the next attempt of an OPEN, due invoice and write its payment row."""
    now = sql.now()
    claimed = await Invoice.filter(
        Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now),
        id=invoice_id,
        status=InvoiceStatus.OPEN,
    ).update(next_attempt_at=now + CLAIM_LEASE)
    if not claimed:
        current = await Invoice.get_or_none(id=invoice_id)
        if current is None:
            return ChargeOutcome.NOT_FOUND
        if current.status is InvoiceStatus.OPEN:
            return ChargeOutcome.NOT_DUE
        return _outcome_of(current)
    invoice = await Invoice.get(id=invoice_id)
    if invoice.amount_cents < minimum_charge_cents(invoice.currency):
        # Closed before the minimum was known here: never sent under it (invariant 11).
        await Invoice.filter(id=invoice.id, status=InvoiceStatus.OPEN).update(
            status=InvoiceStatus.CARRIED_FORWARD, next_attempt_at=None
        )
        return ChargeOutcome.CARRIED_FORWARD
    attempt = next_attempt(invoice)
    key = trigger_key(invoice.id, attempt)
    account = await Account.get(id=invoice.account_id)
    existing = await Payment.get_or_none(trigger_key=key)
    if existing is not None:
        if existing.status in (PaymentStatus.SUCCEEDED, PaymentStatus.FAILED):
            # Applied but not booked on the invoice (should not happen): book it now.
            await settle_payment(existing)
            return _outcome_of(await Invoice.get(id=invoice_id))
        card = await Card.get_or_none(id=existing.card_id) if existing.card_id else None
        return _Attempt(
            invoice,
            existing,
            card,
            account.gateway_customer_id or "",
            _month_label(invoice, account.timezone),
            resume=True,
        )
    card = await cards.primary_card(invoice.account_id)
    if card is None or account.gateway_customer_id is None:
        final = await record_failed_attempt(invoice.id, attempt, NO_CARD_MESSAGE)
        return ChargeOutcome.FAILED if final else ChargeOutcome.RETRY_SCHEDULED
    payment = await Payment.create(
        id=uuid.uuid4(),
        account_id=invoice.account_id,
        card_id=card.id,
        kind=PaymentKind.INVOICE,
        status=PaymentStatus.PENDING,
        credits=0,
        amount_cents=invoice.amount_cents,
        currency=invoice.currency,
        trigger_key=key,
        created_by=None,
        created_at=now,
        updated_at=now,
    )
    await Invoice.filter(id=invoice.id).update(payment_id=payment.id)
    return _Attempt(
        invoice,
        payment,
        card,
        account.gateway_customer_id,
        _month_label(invoice, account.timezone),
        resume=False,
    )


# ---------------------------------------------------------------- booking an outcome


async def settle_payment(payment: Payment) -> None:
    """Book a finished INVOICE payment on its invoice (caller's transaction). Idempotent:
    called by ``booking.settle`` when the payment's status changes."""
    ref = _parse_trigger_key(payment.trigger_key)
    if payment.kind is not PaymentKind.INVOICE or ref is None:
        log.error("payment %s is not an invoice payment", payment.id)
        return
    invoice_id, attempt = ref
    if payment.status is PaymentStatus.SUCCEEDED:
        await _mark_paid(invoice_id, attempt, payment)
    elif payment.status is PaymentStatus.FAILED:
        await record_failed_attempt(
            invoice_id, attempt, payment.failure_message or "The card was declined."
        )


async def _mark_paid(invoice_id: uuid.UUID, attempt: int, payment: Payment) -> None:
    now = sql.now()
    # The money was taken: even an invoice given up on (FAILED) is paid now.
    changed = await Invoice.filter(
        id=invoice_id, status__in=[InvoiceStatus.OPEN, InvoiceStatus.FAILED]
    ).update(
        status=InvoiceStatus.PAID,
        paid_at=now,
        payment_id=payment.id,
        attempts=attempt,
        next_attempt_at=None,
        failure_message=None,
    )
    invoice = await Invoice.get(id=invoice_id)
    if not changed:
        if str(invoice.payment_id) != str(payment.id):
            log.error(
                "invoice %s was already paid; payment %s also succeeded", invoice_id, payment.id
            )
            await booking.flag(
                invoice.account_id,
                f"{booking.PAID_TWICE_FLAG} invoice {invoice_id} was already paid; payment "
                f"{payment.id} succeeded too: refund it",
            )
        return
    card = await Card.get_or_none(id=payment.card_id) if payment.card_id else None
    on_card = f" to the {card.brand} card ending {card.last4}" if card else ""
    await outbox.queue(
        invoice.account_id,
        NotificationKind.INVOICE_PAID,
        dedupe_key=f"invoice-paid:{invoice.id}",
        subject=f"Invoice paid: {await _month_label_of(invoice)} metered usage",
        body=(
            f"We charged {money(invoice.amount_cents, invoice.currency)}{on_card} for your "
            f"metered usage in {await _month_label_of(invoice)}.\n\n"
            f"{await _lines_text(invoice)}"
        ),
    )


async def record_failed_attempt(invoice_id: uuid.UUID, attempt: int, message: str) -> bool:
    """Count failed attempt ``attempt`` (once): back off, or after the last one mark the
    invoice FAILED and tell the admins. Caller's transaction. True if it is now FAILED."""
    final = attempt >= MAX_ATTEMPTS
    reason = message[:500]
    open_at_attempt = Invoice.filter(id=invoice_id, status=InvoiceStatus.OPEN, attempts=attempt - 1)
    if not final:
        await open_at_attempt.update(
            attempts=attempt,
            next_attempt_at=sql.now() + BACKOFF[min(attempt, len(BACKOFF)) - 1],
            failure_message=reason,
        )
        return False
    changed = await open_at_attempt.update(
        status=InvoiceStatus.FAILED,
        attempts=attempt,
        next_attempt_at=None,
        failure_message=reason,
    )
    if changed:
        invoice = await Invoice.get(id=invoice_id)
        label = await _month_label_of(invoice)
        await outbox.queue(
            invoice.account_id,
            NotificationKind.INVOICE_FAILED,
            dedupe_key=f"invoice-failed:{invoice.id}",
            subject=f"We could not charge your invoice for {label}",
            body=(
                f"The invoice of {money(invoice.amount_cents, invoice.currency)} for your "
                f"metered usage in {label} could not be charged after {attempt} attempts. "
                f"Last answer: {reason}\n\nPlease update the card on file and contact "
                f"accounting to settle it.\n\n{await _lines_text(invoice)}"
            ),
        )
    return True


# ---------------------------------------------------------------- reading


async def due_invoices(limit: int = 500) -> list[Invoice]:
    """OPEN invoices to (re)try now: never tried, or their backoff has run out (an indexed
    range on (status, next_attempt_at))."""
    now = sql.now()
    return (
        await Invoice.filter(
            Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now),
            status=InvoiceStatus.OPEN,
        )
        .order_by("created_at")
        .limit(limit)
    )


async def account_invoices(account_id: str, limit: int = 24) -> list[Invoice]:
    """The account's invoices, newest period first, with their lines."""
    return (
        await Invoice.filter(account_id=account_id)
        .order_by("-period_start")
        .limit(limit)
        .prefetch_related("lines")
    )


def money(cents: int, currency: str) -> str:
    sign = "-" if cents < 0 else ""
    whole, part = divmod(abs(cents), 100)
    return f"{sign}{whole:,}.{part:02d} {currency.upper()}"


def _month_label(invoice: Invoice, timezone: str = "UTC") -> str:
    return invoice.period_start.astimezone(ZoneInfo(zone_name(timezone))).strftime("%B %Y")


async def _month_label_of(invoice: Invoice) -> str:
    account = await Account.get(id=invoice.account_id)
    return _month_label(invoice, account.timezone)


async def _lines_text(invoice: Invoice) -> str:
    lines = await InvoiceLine.filter(invoice_id=invoice.id).order_by("process_type")
    return "\n".join(
        f"{line.process_type.value.replace('_', ' ').title()}: {line.quantity:,} units, "
        f"{money(line.amount_cents, invoice.currency)}"
        for line in lines
    )


def _uuid_param(value: uuid.UUID) -> object:
    return value if sql.is_postgres(sql.connection()) else str(value)


booking.register_booker(PaymentKind.INVOICE, settle_payment)
