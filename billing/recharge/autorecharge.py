"""Auto-recharge settings: stored and validated here; the recharges run in workers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from billing import emails as emails_lib
from billing import sql
from billing.accounts import ensure_account
from billing.enums import AutoRechargeTrigger, ErrorCode
from billing.errors import Validator, fail
from billing.models import Account, AutoRechargeSetting
from billing.payments import cards
from billing.payments.gateways import minimum_charge_cents
from billing.pricing import PriceBook
from billing.recharge import runs

MAX_INTERVAL_DAYS = 365
MAX_NOTIFY_EMAILS = 10


@dataclass(frozen=True, slots=True)
class AutoRechargeInput:
    enabled: bool
    trigger: AutoRechargeTrigger | None = None
    interval_days: int | None = None
    threshold_credits: int | None = None
    recharge_credits: int | None = None
    use_primary_card: bool = True
    card_id: uuid.UUID | None = None
    card_id_given: bool = False
    notify: bool = False
    notify_emails: list[str] | None = field(default=None)
    monthly_limit_credits: int | None = None


async def get_setting(account_id: str) -> AutoRechargeSetting:
    """The stored setting, or an unsaved disabled default."""
    setting = await AutoRechargeSetting.get_or_none(account_id=account_id)
    return setting or AutoRechargeSetting(account_id=account_id, enabled=False, notify_emails=[])


def _validate(v: Validator, data: AutoRechargeInput, book: PriceBook) -> None:
    _validate_amounts(v, data, book)
    _validate_notify(v, data)
    if not data.use_primary_card and not data.card_id_given:
        v.add("cardId is required when usePrimaryCard is false", "cardId")
    if data.enabled:
        _validate_enabled(v, data)


def _validate_amounts(v: Validator, data: AutoRechargeInput, book: PriceBook) -> None:
    lo, hi = book.min_purchase_credits, book.max_purchase_credits
    if data.recharge_credits is not None and not lo <= data.recharge_credits <= hi:
        v.add(
            f"rechargeCredits must be {lo:,} to {hi:,}",
            "rechargeCredits",
            code=ErrorCode.INVALID_AMOUNT,
        )
    elif data.recharge_credits is not None and book.amount_cents(
        data.recharge_credits
    ) < minimum_charge_cents(book.currency):
        v.add(
            f"{data.recharge_credits:,} credits cost {book.amount_cents(data.recharge_credits)} "
            f"cents; the card payment minimum is {minimum_charge_cents(book.currency)} cents",
            "rechargeCredits",
            code=ErrorCode.AMOUNT_TOO_SMALL,
        )
    if data.threshold_credits is not None and not 0 < data.threshold_credits <= hi:
        v.add(f"thresholdCredits must be 1 to {hi:,}", "thresholdCredits")
    if data.interval_days is not None and not 1 <= data.interval_days <= MAX_INTERVAL_DAYS:
        v.add(f"intervalDays must be 1 to {MAX_INTERVAL_DAYS}", "intervalDays")
    if data.monthly_limit_credits is not None:
        if data.monthly_limit_credits < 1:
            v.add("monthlyLimitCredits must be positive", "monthlyLimitCredits")
        elif data.recharge_credits and data.monthly_limit_credits < data.recharge_credits:
            v.add(
                "monthlyLimitCredits is below one recharge, so none could ever run",
                "monthlyLimitCredits",
            )


def _validate_notify(v: Validator, data: AutoRechargeInput) -> None:
    emails = data.notify_emails or []
    if len(emails) > MAX_NOTIFY_EMAILS:
        v.add(f"at most {MAX_NOTIFY_EMAILS} notifyEmails", "notifyEmails")
    for i, email in enumerate(emails):
        if emails_lib.normalized(email) is None:
            v.add(f"not an e-mail address: {email[:80]!r}", "notifyEmails", str(i))


def _validate_enabled(v: Validator, data: AutoRechargeInput) -> None:
    """What an enabled setting needs."""
    if data.trigger is None:
        v.add("trigger is required to enable auto-recharge", "trigger")
    if data.recharge_credits is None:
        v.add("rechargeCredits is required to enable auto-recharge", "rechargeCredits")
    if data.trigger is AutoRechargeTrigger.THRESHOLD and data.threshold_credits is None:
        v.add("thresholdCredits is required for a THRESHOLD trigger", "thresholdCredits")
    if data.trigger is AutoRechargeTrigger.SCHEDULE and data.interval_days is None:
        v.add("intervalDays is required for a SCHEDULE trigger", "intervalDays")


async def update_auto_recharge(
    book: PriceBook, account_id: str, data: AutoRechargeInput
) -> AutoRechargeSetting:
    """Replace the whole setting (caller's transaction). Saved (or enabled) while the
    balance is under its threshold, it opens a crossing (reported to ``changes``: the
    caller queues its recharge after commit)."""
    v = Validator()
    _validate(v, data, book)
    v.check()
    await ensure_account(account_id)
    card_id = None
    if data.card_id_given:
        card_id = (await cards.get_card(data.card_id, account_id)).id
    if data.enabled and data.use_primary_card and await cards.primary_card(account_id) is None:
        raise fail(ErrorCode.NO_CARD_ON_FILE, "Add a card before enabling auto-recharge.")
    previous = await AutoRechargeSetting.get_or_none(account_id=account_id)
    now = sql.now()
    next_run_at = None
    if data.enabled and data.trigger is AutoRechargeTrigger.SCHEDULE:
        assert data.interval_days is not None
        keep = (
            previous is not None
            and previous.enabled
            and previous.trigger is AutoRechargeTrigger.SCHEDULE
            and previous.interval_days == data.interval_days
            and previous.next_run_at is not None
        )
        next_run_at = (
            previous.next_run_at
            if keep and previous is not None
            else now + timedelta(days=data.interval_days)
        )
    values: dict[str, Any] = {
        "enabled": data.enabled,
        "trigger": data.trigger,
        "interval_days": data.interval_days,
        "threshold_credits": data.threshold_credits,
        "recharge_credits": data.recharge_credits,
        "use_primary_card": data.use_primary_card,
        "card_id": None if data.use_primary_card else card_id,
        "notify": data.notify,
        "notify_emails": list(data.notify_emails or []),
        "monthly_limit_credits": data.monthly_limit_credits,
        "next_run_at": next_run_at,
        "consecutive_failures": 0,
        "paused_reason": None,
    }
    values["next_attempt_at"] = None
    if previous is None:
        setting = await AutoRechargeSetting.create(account_id=account_id, **values)
    else:
        await AutoRechargeSetting.filter(account_id=account_id).update(**values)
        setting = await AutoRechargeSetting.get(account_id=account_id)
    await runs.sync_threshold(setting)
    account = await Account.get(id=account_id)
    level = setting.threshold_level()
    if level is not None and account.balance < level:
        # Saving (or enabling) the setting while the balance is under it is a crossing.
        await runs.open_crossing(account_id)
        return setting
    if account.recharge_crossed:
        await runs.close_crossing(account_id)
    return setting
