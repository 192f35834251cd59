"""The credit ledger: append-only entries, each with the balance after it.

Every movement is one conditional ``UPDATE`` of the account's balance (which takes the
row lock on PostgreSQL; SQLite serialises writers) followed by the entry's ``INSERT``,
in the caller's transaction. A debit is ``... WHERE balance + credits >= 0``: it can
never overdraw, however many run at once. Its ``RETURNING`` also says whether the debit
left the balance under the auto-recharge threshold or took it under the low-balance alert
level, so a spend costs no extra query. Each entry is reported to the caller's
``changes`` collector (live balance updates after commit).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from billing import changes, sql
from billing.enums import ErrorCode, ProcessType, TransactionType
from billing.errors import BillingError, fail
from billing.models import LedgerEntry
from billing.notifications import lowbalance

MAX_CREDITS_PER_ENTRY = 100_000_000
#: The largest figure the API serves (GraphQL ``Int``): no balance goes past it (invariant
#: 10); the database holds the same bound (migration 0008).
MAX_BALANCE = 2**31 - 1


#: The debit statement's crossing rule (see ``crossed``): set ``recharge_crossed`` when this
#: debit takes the balance from at or above the threshold to below it. ``balance`` on the
#: right-hand side is the value before the update, in PostgreSQL and SQLite alike.
def crossing_set(after: str) -> str:
    """The SET clause of a debit's ``UPDATE`` that records a crossing (see ``crossed``):
    marks it open and numbers it (``recharge_seq``: the job id and trigger key of its
    recharge), so a payment settled late for an older crossing can't close a newer one.
    ``after`` is the balance after the debit, as an SQL expression of the old one (its
    placeholders appear twice)."""
    crossing = (
        "recharge_threshold IS NOT NULL AND balance >= recharge_threshold "
        f"AND {after} < recharge_threshold"
    )
    return (
        f"recharge_crossed = CASE WHEN {crossing} THEN TRUE ELSE recharge_crossed END, "
        f"recharge_seq = CASE WHEN {crossing} THEN recharge_seq + 1 ELSE recharge_seq END"
    )


CROSSING_SET = crossing_set("balance + ?")
#: Bound into CROSSING_SET for a debit that must open no crossing: ``balance + 0`` is never
#: below a threshold the balance is at or above.
_NEVER_CROSSES = 0


def crossed(before: int, after: int, threshold: int | None) -> bool:
    """A threshold crossing: the balance went from at or above ``threshold`` to below it.

    The one rule every path uses (DESIGN.md section 3, "Threshold crossings"): a balance
    that stays under the threshold, however often it is spent from, crosses nothing; saving
    or enabling the setting while below counts as a crossing (``autorecharge``)."""
    return threshold is not None and before >= threshold > after


def balance_limit_error(balance: int, credits: int) -> BillingError:
    return fail(
        ErrorCode.BALANCE_LIMIT,
        f"Adding {credits:,} credits to a balance of {balance:,} would pass the largest "
        f"balance the service holds ({MAX_BALANCE:,}).",
        "credits",
    )


MAX_DESCRIPTION = 500  # the column's width; descriptions built from input are cut to it


@dataclass(frozen=True, slots=True)
class Movement:
    account_id: str
    credits: int
    type: TransactionType
    process_type: ProcessType
    description: str
    user_id: str | None = None
    reference: str | None = None
    quantity: int | None = None
    payment_id: uuid.UUID | None = None
    reverses_entry_id: uuid.UUID | None = None
    entry_id: uuid.UUID | None = None
    #: False for a take-back (a refund or dispute of a card payment): it opens no threshold
    #: crossing, so the card that was just refunded or disputed is not charged again for it.
    opens_crossing: bool = True


@dataclass(frozen=True, slots=True)
class Posted:
    entry: LedgerEntry
    recharge_seq: int | None  # set when this debit crossed the recharge threshold


async def post(movement: Movement) -> LedgerEntry:
    """Apply ``movement`` to the balance and append its entry. Caller owns the transaction.

    Raises ``INSUFFICIENT_CREDITS`` (and changes nothing) when a debit would go below zero.
    """
    return (await post_returning(movement)).entry


async def post_returning(movement: Movement) -> Posted:
    """``post``, also telling whether the balance is now below the auto-recharge threshold
    (read in the same statement, so spending costs no extra query)."""
    if movement.credits == 0 or abs(movement.credits) > MAX_CREDITS_PER_ENTRY:
        raise ValueError(f"ledger movement of {movement.credits} credits")
    conn = sql.connection()
    if movement.credits < 0:
        rows = await sql.fetch(
            f"UPDATE credit_account SET balance = balance + ?, {CROSSING_SET} "
            "WHERE id = ? AND balance + ? >= 0 "
            "RETURNING balance, recharge_threshold, recharge_seq, low_balance_level",
            movement.credits,
            movement.credits if movement.opens_crossing else _NEVER_CROSSES,
            movement.credits if movement.opens_crossing else _NEVER_CROSSES,
            movement.account_id,
            movement.credits,
        )
        if not rows:
            raise fail(
                ErrorCode.INSUFFICIENT_CREDITS,
                f"The balance does not cover {-movement.credits} credits.",
            )
    else:
        rows = await sql.fetch(
            "UPDATE credit_account SET balance = balance + ? WHERE id = ? AND balance <= ? "
            "RETURNING balance, recharge_threshold, recharge_seq",
            movement.credits,
            movement.account_id,
            MAX_BALANCE - movement.credits,
        )
        if not rows:
            current = await sql.fetch(
                "SELECT balance FROM credit_account WHERE id = ?", movement.account_id
            )
            if not current:
                raise LookupError(f"account {movement.account_id} does not exist")
            raise balance_limit_error(int(current[0]["balance"]), movement.credits)
    balance_after = int(rows[0]["balance"])
    threshold = rows[0]["recharge_threshold"]
    below = (
        movement.credits < 0
        and movement.opens_crossing
        and crossed(
            balance_after - movement.credits,
            balance_after,
            None if threshold is None else int(threshold),
        )
    )
    description = movement.description[:MAX_DESCRIPTION]
    entry_id = movement.entry_id or uuid.uuid4()
    created_at = sql.now()  # taken under the row lock: per account, time order == lock order
    await sql.execute(
        "INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits, "
        "balance_after, quantity, user_id, description, reference, payment_id, reverses_entry_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        str(entry_id) if not sql.is_postgres(conn) else entry_id,
        movement.account_id,
        created_at,
        movement.type.value,
        movement.process_type.value,
        movement.credits,
        balance_after,
        movement.quantity,
        movement.user_id,
        description,
        movement.reference,
        _uuid_param(conn, movement.payment_id),
        _uuid_param(conn, movement.reverses_entry_id),
    )
    entry = LedgerEntry(
        id=entry_id,
        account_id=movement.account_id,
        created_at=created_at,
        type=movement.type,
        process_type=movement.process_type,
        credits=movement.credits,
        balance_after=balance_after,
        quantity=movement.quantity,
        user_id=movement.user_id,
        description=description,
        reference=movement.reference,
        payment_id=movement.payment_id,
        reverses_entry_id=movement.reverses_entry_id,
    )
    if movement.credits < 0:
        raw_level = rows[0]["low_balance_level"]
        level = None if raw_level is None else int(raw_level)
        if lowbalance.turned_low(balance_after - movement.credits, balance_after, level):
            assert level is not None
            await lowbalance.notify(
                movement.account_id,
                balance_after,
                level,
                f"balance-low:{movement.account_id}:{entry_id}",
            )
    changes.entry_posted(entry)
    return Posted(entry, int(rows[0]["recharge_seq"]) if below else None)


def _uuid_param(conn: object, value: uuid.UUID | None) -> object:
    if value is None:
        return None
    return value if sql.is_postgres(conn) else str(value)  # type: ignore[arg-type]


async def balance_of(account_id: str) -> int:
    rows = await sql.fetch("SELECT balance FROM credit_account WHERE id = ?", account_id)
    return int(rows[0]["balance"]) if rows else 0


async def lock_account(account_id: str) -> None:
    """Serialise writers of one account (PostgreSQL row lock; SQLite serialises anyway)."""
    conn = sql.connection()
    if sql.is_postgres(conn):
        await sql.fetch("SELECT id FROM credit_account WHERE id = ? FOR NO KEY UPDATE", account_id)
