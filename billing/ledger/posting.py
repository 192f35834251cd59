"""The credit ledger: append-only entries, each with the balance after it.

Every movement is one conditional ``UPDATE`` of the account's balance (which takes the
row lock on PostgreSQL; SQLite serialises writers) followed by the entry's ``INSERT``,
in the caller's transaction. A debit is ``... WHERE balance + credits >= 0``: it can
never overdraw, however many run at once. Its ``RETURNING`` also says whether the debit
left the balance under the auto-recharge threshold or took it under the low-balance alert
level, so a spend costs no extra query. Each entry, and each threshold crossing, is
reported to the caller's ``changes`` collector (acted on after commit). The entry's values
and the crossing rule are ``entries``' (shared with ``fastspend`` and ``batchwrite``).
"""

from __future__ import annotations

import uuid
from typing import Any

from billing import changes, sql
from billing.enums import ErrorCode
from billing.errors import BillingError, fail
from billing.ledger import entries
from billing.ledger.entries import Movement as Movement
from billing.ledger.entries import crossing_set as crossing_set
from billing.models import LedgerEntry
from billing.notifications import lowbalance

MAX_CREDITS_PER_ENTRY = 100_000_000
#: The largest figure the API serves (GraphQL ``Int``): no balance goes past it (invariant
#: 10); the database holds the same bound (migration 0008).
MAX_BALANCE = 2**31 - 1

CROSSING_SET = crossing_set("balance + ?")
#: Bound into CROSSING_SET for a debit that must open no crossing: ``balance + 0`` is never
#: below a threshold the balance is at or above.
_NEVER_CROSSES = 0


def balance_limit_error(balance: int, credits: int) -> BillingError:
    return fail(
        ErrorCode.BALANCE_LIMIT,
        f"Adding {credits:,} credits to a balance of {balance:,} would pass the largest "
        f"balance the service holds ({MAX_BALANCE:,}).",
        "credits",
    )


async def post(movement: Movement) -> LedgerEntry:
    """Apply ``movement`` to the balance and append its entry. Caller owns the transaction.

    Raises ``INSUFFICIENT_CREDITS`` (and changes nothing) when a debit would go below zero.
    A debit that crosses the auto-recharge threshold (read in the same statement, so
    spending costs no extra query) reports the crossing to ``changes``; one that takes the
    balance under the low-balance level writes its notice.
    """
    if movement.credits == 0 or abs(movement.credits) > MAX_CREDITS_PER_ENTRY:
        raise ValueError(f"ledger movement of {movement.credits} credits")
    moved = await (_debit(movement) if movement.credits < 0 else _credit(movement))
    created_at = sql.now()  # taken under the row lock: per account, time order == lock order
    entry = entries.build(
        movement,
        movement.entry_id or uuid.uuid4(),
        balance_after=int(moved["balance"]),
        created_at=created_at,
    )
    pg = sql.is_postgres(sql.connection())
    await sql.execute(
        f"{entries.INSERT} VALUES {entries.placeholders(1, len(entries.COLUMNS))}",
        *entries.row(entry, pg=pg),
    )
    changes.entry_posted(entry)
    if movement.credits < 0:
        await _after_debit(movement, entry, moved)
    return entry


async def _debit(movement: Movement) -> dict[str, Any]:
    """The debit's conditional UPDATE: the balance after it, and what the crossing rules
    need (threshold, crossing number, low-balance level)."""
    opening = movement.credits if movement.opens_crossing else _NEVER_CROSSES
    rows = await sql.fetch(
        f"UPDATE credit_account SET balance = balance + ?, {CROSSING_SET} "
        "WHERE id = ? AND balance + ? >= 0 "
        "RETURNING balance, recharge_threshold, recharge_seq, low_balance_level",
        movement.credits,
        opening,
        opening,
        movement.account_id,
        movement.credits,
    )
    if not rows:
        raise fail(
            ErrorCode.INSUFFICIENT_CREDITS,
            f"The balance does not cover {-movement.credits} credits.",
        )
    return dict(rows[0])


async def _credit(movement: Movement) -> dict[str, Any]:
    rows = await sql.fetch(
        "UPDATE credit_account SET balance = balance + ? WHERE id = ? AND balance <= ? "
        "RETURNING balance",
        movement.credits,
        movement.account_id,
        MAX_BALANCE - movement.credits,
    )
    if rows:
        return dict(rows[0])
    current = await sql.fetch(
        "SELECT balance FROM credit_account WHERE id = ?", movement.account_id
    )
    if not current:
        raise LookupError(f"account {movement.account_id} does not exist")
    raise balance_limit_error(int(current[0]["balance"]), movement.credits)


async def _after_debit(movement: Movement, entry: LedgerEntry, moved: dict[str, Any]) -> None:
    """A debit's crossings: the auto-recharge threshold (reported) and the low-balance
    level (its notice written, in this transaction)."""
    after = entry.balance_after
    before = after - movement.credits
    if movement.opens_crossing:
        seq = entries.crossing_seq(
            before, after, moved["recharge_threshold"], moved["recharge_seq"]
        )
        if seq is not None:
            changes.threshold_crossed(movement.account_id, seq)
    raw_level = moved["low_balance_level"]
    level = None if raw_level is None else int(raw_level)
    if level is not None and lowbalance.turned_low(before, after, level):
        await lowbalance.notify(
            movement.account_id, after, level, f"balance-low:{movement.account_id}:{entry.id}"
        )


async def balance_of(account_id: str) -> int:
    rows = await sql.fetch("SELECT balance FROM credit_account WHERE id = ?", account_id)
    return int(rows[0]["balance"]) if rows else 0


async def lock_account(account_id: str) -> None:
    """Serialise writers of one account (PostgreSQL row lock; SQLite serialises anyway)."""
    conn = sql.connection()
    if sql.is_postgres(conn):
        await sql.fetch("SELECT id FROM credit_account WHERE id = ? FOR NO KEY UPDATE", account_id)
