"""Auto-recharge: top the balance up off-session, on a threshold or on a schedule.

Each run owns its transactions, like a purchase: under the account lock it decides
whether a charge is due and writes the payment row (``PENDING``, with a ``trigger_key``
that is unique per crossing or per scheduled run) before the gateway is called; the
outcome is applied in a second transaction with the ledger entry, the setting's
bookkeeping and the outbox row. So one crossing charges at most once however many jobs
run for it, and a decline never turns into a loop: backoff between tries, and after
``MAX_FAILURES`` (or a card that needs authentication) the setting pauses itself.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from tortoise.transactions import in_transaction

from billing import changes, sql
from billing.enums import (
    AutoRechargeTrigger,
    NotificationKind,
    PaymentKind,
    PaymentStatus,
)
from billing.ledger import posting
from billing.models import Account, AutoRechargeSetting, Card, Payment
from billing.notifications import outbox
from billing.payments.gateways import (
    ChargeRequest,
    GatewayUnavailable,
    PaymentGateway,
    gateway_key,
    minimum_charge_cents,
)
from billing.payments.purchases import credits_in_flight
from billing.pricing import PriceBook
from billing.settlement import booking
from billing.spending.quota import month_bounds

log = logging.getLogger(__name__)

MAX_FAILURES = 3
#: Wait after the n-th consecutive decline before trying that card again.
BACKOFF = (timedelta(hours=4), timedelta(hours=12))
#: A payment PENDING this long is settled from the gateway with its own key (never a
#: second charge); past a charge job's time limit, so a running job is not raced.
STUCK_AFTER = timedelta(seconds=30)
IN_FLIGHT = (PaymentStatus.PENDING, PaymentStatus.REQUIRES_ACTION)


class Outcome(StrEnum):
    CHARGED = "charged"
    DECLINED = "declined"
    PAUSED = "paused"
    NOT_NEEDED = "not_needed"
    IN_FLIGHT = "in_flight"
    BACKOFF = "backoff"
    CAPPED = "capped"
    DISABLED = "disabled"
    PENDING = "pending"


@dataclass(frozen=True, slots=True)
class RechargeResult:
    outcome: Outcome
    payment_id: uuid.UUID | None = None


async def sync_threshold(setting: AutoRechargeSetting) -> None:
    await Account.filter(id=setting.account_id).update(recharge_threshold=setting.threshold_level())


async def _card_for(setting: AutoRechargeSetting) -> Card | None:
    if not setting.use_primary_card and setting.card_id is not None:
        card = await Card.get_or_none(id=setting.card_id, removed_at=None)
        if card is not None:
            return card
    return await Card.filter(
        account_id=setting.account_id, removed_at=None, is_primary=True
    ).first()


async def _recharged_this_month(account: Account) -> int:
    start, end = month_bounds(sql.now(), account.timezone)
    rows = await sql.fetch(
        "SELECT COALESCE(SUM(credits), 0) AS total FROM payment WHERE account_id = ? AND kind = ? "
        "AND status IN (?, ?, ?) AND created_at >= ? AND created_at < ?",
        account.id,
        PaymentKind.AUTO_RECHARGE.value,
        PaymentStatus.SUCCEEDED.value,
        PaymentStatus.PENDING.value,
        PaymentStatus.REQUIRES_ACTION.value,
        start,
        end,
    )
    return int(rows[0]["total"])


@dataclass(frozen=True, slots=True)
class _Due:
    """A charge that is due: its payment row (written, PENDING) and what charging needs."""

    payment: Payment
    card: Card
    account: Account


async def _start(
    book: PriceBook, account_id: str, trigger: AutoRechargeTrigger, due_at: datetime | None
) -> RechargeResult | _Due:
    """Under the account lock: decide, and write the payment row if a charge is due."""
    await posting.lock_account(account_id)
    account = await Account.get_or_none(id=account_id)
    setting = await AutoRechargeSetting.get_or_none(account_id=account_id)
    if account is None or setting is None or not setting.enabled or setting.trigger is not trigger:
        return RechargeResult(Outcome.DISABLED)
    if setting.paused_reason is not None:
        return RechargeResult(Outcome.PAUSED)
    now = sql.now()
    not_due = (
        await _threshold_not_due(account, setting, now)
        if trigger is AutoRechargeTrigger.THRESHOLD
        else _schedule_not_due(setting, now, due_at)
    )
    if not_due is not None:
        return not_due
    refused = await _refused(book, account, setting, trigger)
    if refused is not None:
        return refused
    card = await _card_for(setting)
    if card is None:
        await _pause(setting, "No card on file: add a card to resume auto-recharge.")
        return RechargeResult(Outcome.PAUSED)
    credits = int(setting.recharge_credits or 0)
    if book.amount_cents(credits) < minimum_charge_cents(book.currency):
        # Saved before a price change made it too small: never sent under the minimum.
        await _pause(
            setting,
            f"{credits:,} credits now cost less than the card payment minimum: raise the "
            "recharge amount to resume auto-recharge.",
        )
        return RechargeResult(Outcome.PAUSED)
    key = _trigger_key(account, setting, trigger)
    if await Payment.exists(trigger_key=key):
        return RechargeResult(Outcome.IN_FLIGHT)
    payment = await Payment.create(
        id=uuid.uuid4(),
        account_id=account_id,
        card_id=card.id,
        kind=PaymentKind.AUTO_RECHARGE,
        status=PaymentStatus.PENDING,
        credits=credits,
        amount_cents=book.amount_cents(credits),
        currency=book.currency,
        trigger_key=key,
        created_by=None,
        created_at=now,
        updated_at=now,
    )
    return _Due(payment, card, account)


async def _threshold_not_due(
    account: Account, setting: AutoRechargeSetting, now: datetime
) -> RechargeResult | None:
    if not account.recharge_crossed:
        # No open crossing: this one was served (or never happened). A balance that
        # stays under the threshold is not a new crossing (DESIGN.md section 3).
        return RechargeResult(Outcome.NOT_NEEDED)
    if setting.next_attempt_at is not None and setting.next_attempt_at > now:
        return RechargeResult(Outcome.BACKOFF)
    if setting.threshold_credits is None or account.balance >= setting.threshold_credits:
        await close_crossing(account.id)  # topped up meanwhile: nothing to serve
        return RechargeResult(Outcome.NOT_NEEDED)
    return None


def _schedule_not_due(
    setting: AutoRechargeSetting, now: datetime, due_at: datetime | None
) -> RechargeResult | None:
    if (
        setting.next_run_at is None
        or setting.next_run_at > now
        or (due_at is not None and setting.next_run_at != due_at)
    ):
        return RechargeResult(Outcome.NOT_NEEDED)
    return None


async def _refused(
    book: PriceBook, account: Account, setting: AutoRechargeSetting, trigger: AutoRechargeTrigger
) -> RechargeResult | None:
    """A recharge in flight already, none configured, or over a limit."""
    if await Payment.exists(
        account_id=account.id, kind=PaymentKind.AUTO_RECHARGE, status__in=list(IN_FLIGHT)
    ):
        return RechargeResult(Outcome.IN_FLIGHT)
    credits = int(setting.recharge_credits or 0)
    if credits <= 0:
        return RechargeResult(Outcome.DISABLED)
    cap = setting.monthly_limit_credits
    if (cap is not None and await _recharged_this_month(account) + credits > cap) or (
        account.balance + await credits_in_flight(account.id) > posting.MAX_BALANCE - credits
    ):
        # Over the monthly cap, or the credits could not be held (invariant 10): this
        # crossing is not served, and it is closed, so the sweep does not ask again.
        if trigger is AutoRechargeTrigger.THRESHOLD:
            await close_crossing(account.id)
        return RechargeResult(Outcome.CAPPED)
    return None


def _trigger_key(
    account: Account, setting: AutoRechargeSetting, trigger: AutoRechargeTrigger
) -> str:
    """Unique per crossing or per scheduled run: one payment each."""
    if trigger is AutoRechargeTrigger.THRESHOLD:
        return f"threshold:{account.id}:{account.recharge_seq}"
    assert setting.next_run_at is not None
    return f"schedule:{account.id}:{setting.next_run_at.isoformat()}"


async def run(
    gateway: PaymentGateway,
    book: PriceBook,
    account_id: str,
    trigger: AutoRechargeTrigger,
    due_at: datetime | None = None,
) -> RechargeResult:
    """One auto-recharge attempt for ``account_id`` if (and only if) one is due."""
    async with in_transaction():
        started = await _start(book, account_id, trigger, due_at)
    if isinstance(started, RechargeResult):
        return started
    return await _charge(gateway, started.payment, started.card, started.account)


async def _charge(
    gateway: PaymentGateway, payment: Payment, card: Card, account: Account
) -> RechargeResult:
    customer_id = account.gateway_customer_id or ""
    try:
        result = await gateway.charge(
            ChargeRequest(
                customer_id=customer_id,
                payment_method_id=card.gateway_payment_method_id,
                amount_cents=payment.amount_cents,
                currency=payment.currency,
                idempotency_key=gateway_key(payment.id),
                off_session=True,
                description=f"Auto-recharge of {payment.credits:,} credits",
                metadata={"payment_id": str(payment.id), "account_id": account.id},
            )
        )
    except GatewayUnavailable:
        log.warning(
            "gateway unavailable for auto-recharge %s; the sweep will settle it", payment.id
        )
        return RechargeResult(Outcome.PENDING, payment.id)
    async with in_transaction():
        await booking.settle(payment.id, result)
        return await settle(payment.id)


async def settle(payment_id: uuid.UUID) -> RechargeResult:
    """Book the outcome of an auto-recharge payment on its setting (caller's transaction).

    Idempotent: a payment is settled once (its setting remembers the last one)."""
    payment = await Payment.get(id=payment_id)
    setting = await AutoRechargeSetting.get_or_none(account_id=payment.account_id)
    if setting is None or payment.status in IN_FLIGHT:
        return RechargeResult(Outcome.PENDING, payment.id)
    if not await _first_settlement(payment.id):
        return _settled_before(payment, setting)
    if payment.status is PaymentStatus.SUCCEEDED:
        await _charged(payment, setting)
        return RechargeResult(Outcome.CHARGED, payment.id)
    # Declined (or authentication required, which off-session can't satisfy).
    paused = await _declined(payment, setting)
    return RechargeResult(Outcome.PAUSED if paused else Outcome.DECLINED, payment.id)


def _settled_before(payment: Payment, setting: AutoRechargeSetting) -> RechargeResult:
    """Booked already (by settlement, a webhook, the sweep): what it came to."""
    if payment.status is PaymentStatus.SUCCEEDED:
        return RechargeResult(Outcome.CHARGED, payment.id)
    paused = setting.paused_reason is not None
    return RechargeResult(Outcome.PAUSED if paused else Outcome.DECLINED, payment.id)


async def _charged(payment: Payment, setting: AutoRechargeSetting) -> None:
    """A success: the failures are forgotten, the schedule moves on, the crossing is
    served, the admins told (if they asked)."""
    now = sql.now()
    setting.consecutive_failures = 0
    setting.next_attempt_at = None
    setting.last_run_at = now
    if setting.trigger is AutoRechargeTrigger.SCHEDULE and setting.next_run_at is not None:
        setting.next_run_at = _advance(setting.next_run_at, setting.interval_days or 1, now)
    await setting.save()
    await _next_crossing(payment, served=True)
    if setting.notify:
        await outbox.queue(
            payment.account_id,
            NotificationKind.RECHARGE_SUCCEEDED,
            dedupe_key=f"recharge-succeeded:{payment.id}",
            subject=f"Auto-recharge added {payment.credits:,} credits",
            body=(
                f"Your account was auto-recharged with {payment.credits:,} purchase "
                f"credits for {payment.amount_cents / 100:.2f} {payment.currency.upper()}."
            ),
            recipients=list(setting.notify_emails or []) or None,
        )


async def _declined(payment: Payment, setting: AutoRechargeSetting) -> bool:
    """A decline: pause after ``MAX_FAILURES`` (or a card that needs authentication),
    else back off and tell the admins (if they asked). True if paused."""
    await _next_crossing(payment, served=False)
    setting.consecutive_failures += 1
    needs_auth = payment.failure_code == "authentication_required"
    reason = payment.failure_message or "The card was declined."
    if needs_auth or setting.consecutive_failures >= MAX_FAILURES:
        why = (
            "The card needs the cardholder to authenticate each payment."
            if needs_auth
            else f"The card was declined {setting.consecutive_failures} times in a row."
        )
        await _pause(setting, f"{why} Last answer: {reason}")
        return True
    now = sql.now()
    wait = BACKOFF[min(setting.consecutive_failures, len(BACKOFF)) - 1]
    setting.next_attempt_at = now + wait
    if setting.trigger is AutoRechargeTrigger.SCHEDULE:
        setting.next_run_at = now + wait
    await setting.save()
    if setting.notify:
        await outbox.queue(
            payment.account_id,
            NotificationKind.RECHARGE_FAILED,
            dedupe_key=f"recharge-failed:{payment.id}",
            subject="Auto-recharge failed",
            body=(
                f"We could not auto-recharge {payment.credits:,} credits: {reason} "
                f"We will try again after {(now + wait):%Y-%m-%d %H:%M} UTC."
            ),
            recipients=list(setting.notify_emails or []) or None,
        )
    return False


async def _first_settlement(payment_id: uuid.UUID) -> bool:
    """Mark the payment settled; False if it already was (a webhook and a job, say)."""
    changed = await Payment.filter(id=payment_id, settled_at=None).update(settled_at=sql.now())
    return bool(changed)


async def _next_crossing(payment: Payment, *, served: bool) -> None:
    """A settled threshold attempt moves its crossing on (``recharge_seq``: a new trigger
    key and job id); a served crossing (the charge succeeded) is closed, a declined one
    stays open for the retry after the backoff. Only the crossing the payment was made for:
    a payment settled late (by the sweep, after a newer crossing opened) touches nothing."""
    seq = _threshold_seq(payment)
    if seq is None:
        return  # a scheduled run: crossings are not its business
    closed = "recharge_crossed = FALSE, " if served else ""
    await sql.execute(
        f"UPDATE credit_account SET {closed}recharge_seq = recharge_seq + 1 "
        "WHERE id = ? AND recharge_seq = ?",
        payment.account_id,
        seq,
    )


def _threshold_seq(payment: Payment) -> int | None:
    """The crossing number in a threshold payment's trigger key (``threshold:acct:N``)."""
    key = payment.trigger_key or ""
    if not key.startswith("threshold:"):
        return None
    try:
        return int(key.rsplit(":", 1)[1])
    except ValueError:
        return None


async def close_crossing(account_id: str) -> None:
    """The open threshold crossing is dealt with: no recharge until a new one."""
    await sql.execute(
        "UPDATE credit_account SET recharge_crossed = ?, recharge_seq = recharge_seq + 1 "
        "WHERE id = ?",
        False,
        account_id,
    )


async def open_crossing(account_id: str) -> None:
    """Saving or enabling the setting while the balance is under its threshold counts as a
    crossing; reported to ``changes`` with its number (the recharge's job id)."""
    rows = await sql.fetch(
        "UPDATE credit_account SET recharge_crossed = ?, recharge_seq = recharge_seq + 1 "
        "WHERE id = ? RETURNING recharge_seq",
        True,
        account_id,
    )
    changes.threshold_crossed(account_id, int(rows[0]["recharge_seq"]))


async def _pause(setting: AutoRechargeSetting, reason: str) -> None:
    """Pause the setting and tell the admins (the notice goes out after commit)."""
    setting.paused_reason = reason[:500]
    setting.next_attempt_at = None
    await setting.save()
    await sync_threshold(setting)
    await close_crossing(setting.account_id)  # saving the setting again re-arms it
    await outbox.queue(
        setting.account_id,
        NotificationKind.AUTO_RECHARGE_PAUSED,
        dedupe_key=f"paused:{setting.account_id}:{sql.now().isoformat()}",
        subject="Auto-recharge is paused",
        body=f"Auto-recharge of purchase credits is paused. {reason} Update your card or "
        "turn auto-recharge back on in the billing settings to resume.",
    )


def _advance(due: datetime, interval_days: int, now: datetime) -> datetime:
    """The first run after ``now`` on the schedule: missed runs are skipped, not charged."""
    step = timedelta(days=interval_days)
    missed = max(0, int((now - due) / step))
    nxt = due + step * (missed + 1)
    while nxt <= now:
        nxt += step
    return nxt


# ---------------------------------------------------------------- what the crons look for


async def due_schedules(limit: int = 1000) -> list[tuple[str, datetime]]:
    """Settings whose scheduled run has come (an indexed range, not a scan)."""
    rows = await sql.fetch(
        "SELECT account_id, next_run_at FROM auto_recharge_setting "
        "WHERE enabled = ? AND trigger = ? AND next_run_at <= ? AND paused_reason IS NULL "
        "ORDER BY next_run_at LIMIT ?",
        True,
        AutoRechargeTrigger.SCHEDULE.value,
        sql.now(),
        limit,
    )
    settings = await AutoRechargeSetting.filter(account_id__in=[r["account_id"] for r in rows])
    return [(s.account_id, s.next_run_at) for s in settings if s.next_run_at is not None]


async def below_threshold(limit: int = 1000) -> list[tuple[str, int]]:
    """Accounts with an open threshold crossing, no recharge in flight and no backoff
    running: what a lost enqueue left behind. (An account merely under its threshold has
    had its crossing served: it is not asked again.)"""
    rows = await sql.fetch(
        "SELECT a.id, a.recharge_seq FROM credit_account a "
        "JOIN auto_recharge_setting s ON s.account_id = a.id "
        "WHERE a.recharge_threshold IS NOT NULL AND a.recharge_crossed = TRUE "
        "AND (s.next_attempt_at IS NULL OR s.next_attempt_at <= ?) "
        "AND NOT EXISTS (SELECT 1 FROM payment p WHERE p.account_id = a.id AND p.kind = ? "
        "AND p.status IN (?, ?)) LIMIT ?",
        sql.now(),
        PaymentKind.AUTO_RECHARGE.value,
        PaymentStatus.PENDING.value,
        PaymentStatus.REQUIRES_ACTION.value,
        limit,
    )
    return [(str(r["id"]), int(r["recharge_seq"])) for r in rows]


async def stuck_payments(limit: int = 100) -> list[uuid.UUID]:
    """Payments still PENDING a while after they were written (a crash or an outage)."""
    cutoff = sql.now() - STUCK_AFTER
    rows = await Payment.filter(status=PaymentStatus.PENDING, updated_at__lt=cutoff).limit(limit)
    return [p.id for p in rows]


#: How long a payment the gateway may still move (3-D Secure waiting, a failure the customer
#: may retry) is re-read by the sweep, and how often.
RECHECK_FOR = timedelta(days=3)
RECHECK_EVERY = timedelta(minutes=5)


async def payments_to_recheck(limit: int = 100) -> list[uuid.UUID]:
    """``REQUIRES_ACTION`` and ``FAILED`` payments the gateway may still move to succeeded
    (Stripe's ``requires_action`` and ``requires_payment_method`` are not final), updated in
    the last ``RECHECK_FOR`` and not re-read in the last ``RECHECK_EVERY``: a success whose
    webhook was lost is still booked (invariant 9). Uses the (status, updated_at) index."""
    now = sql.now()
    rows = await sql.fetch(
        "SELECT id FROM payment WHERE status IN (?, ?) AND updated_at >= ? AND updated_at <= ? "
        "AND gateway_payment_id IS NOT NULL "
        "AND (gateway_checked_at IS NULL OR gateway_checked_at < ?) "
        "ORDER BY updated_at LIMIT ?",
        PaymentStatus.REQUIRES_ACTION.value,
        PaymentStatus.FAILED.value,
        now - RECHECK_FOR,
        now,
        now - RECHECK_EVERY,
        limit,
    )
    return [uuid.UUID(str(r["id"])) for r in rows]


async def _book(payment: Payment) -> None:
    """Settlement's booker for AUTO_RECHARGE payments (``booking.register_booker``)."""
    await settle(payment.id)


booking.register_booker(PaymentKind.AUTO_RECHARGE, _book)
