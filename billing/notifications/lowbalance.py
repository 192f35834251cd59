"""The low-balance alert: the admins get one ``BALANCE_LOW`` e-mail each time the balance
falls below the level they set.

The account is *low* while its balance is under the level. A notice is written to the
outbox (in the transaction of the change) when the account turns low: a debit that takes
the balance from at-or-above the level to below it (``ledger`` sees this in the row its
debit ``UPDATE`` returns, so spending costs no extra query), or a new level set above a
balance that was not low under the old one. Further spends below the level send nothing;
once the balance is back at or above the level, the next fall sends a notice again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from billing import sql
from billing.accounts import ensure_account
from billing.enums import NotificationKind
from billing.errors import Validator
from billing.notifications import outbox
from billing.pricing import PriceBook


@dataclass(frozen=True, slots=True)
class LowBalanceAlert:
    level_credits: int | None  # None: the alert is off
    balance: int

    @property
    def enabled(self) -> bool:
        return self.level_credits is not None

    @property
    def is_low(self) -> bool:
        return self.level_credits is not None and self.balance < self.level_credits


def turned_low(before: int, after: int, level: int | None) -> bool:
    """Whether a move from ``before`` to ``after`` crosses ``level`` downwards."""
    return level is not None and after < level <= before


async def notify(account_id: str, balance: int, level: int, dedupe_key: str) -> int | None:
    """Write the BALANCE_LOW notice to the outbox (caller's transaction); the caller's
    ``changes`` collector learns its id, to send it after commit."""
    notice = await outbox.queue(
        account_id,
        NotificationKind.BALANCE_LOW,
        dedupe_key=dedupe_key,
        subject=f"Your purchase credits balance is low: {balance:,} credits",
        body=(
            f"The purchase credits balance of your account is {balance:,} credits, below "
            f"the alert level of {level:,} credits you set. Buy credits or turn on "
            "auto-recharge in the billing settings so that your campaigns keep running. "
            "You will not be told again until the balance has been back at or above "
            f"{level:,} credits."
        ),
    )
    return notice


async def get_alert(account_id: str) -> LowBalanceAlert:
    rows = await sql.fetch(
        "SELECT balance, low_balance_level FROM credit_account WHERE id = ?", account_id
    )
    if not rows:
        return LowBalanceAlert(None, 0)
    level = rows[0]["low_balance_level"]
    return LowBalanceAlert(int(level) if level is not None else None, int(rows[0]["balance"]))


async def update_alert(
    book: PriceBook, account_id: str, *, enabled: bool, level_credits: int | None
) -> LowBalanceAlert:
    """Replace the alert (caller's transaction). A level that makes a balance low which was
    not low under the previous setting sends the notice at once."""
    hi = book.max_purchase_credits
    v = Validator()
    if level_credits is not None and not 0 < level_credits <= hi:
        v.add(f"levelCredits must be 1 to {hi:,}", "levelCredits")
    if enabled and level_credits is None:
        v.add("levelCredits is required to turn the alert on", "levelCredits")
    v.check()
    await ensure_account(account_id)
    lock = " FOR NO KEY UPDATE" if sql.is_postgres(sql.connection()) else ""
    rows = await sql.fetch(
        f"SELECT balance, low_balance_level FROM credit_account WHERE id = ?{lock}", account_id
    )
    balance = int(rows[0]["balance"])
    old = rows[0]["low_balance_level"]
    level = level_credits if enabled else None
    await sql.execute(
        "UPDATE credit_account SET low_balance_level = ? WHERE id = ?", level, account_id
    )
    was_low = old is not None and balance < int(old)
    alert = LowBalanceAlert(level, balance)
    if alert.is_low and not was_low:
        assert level is not None
        await notify(account_id, balance, level, f"balance-low:{account_id}:set:{uuid.uuid4()}")
    return alert
