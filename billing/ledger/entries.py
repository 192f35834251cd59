"""What every writer of the ledger shares: a movement, the entry it appends and the
threshold crossing rule.

Three writers append to ``ledger_entry`` and move the balance, each in its own SQL shape:
``posting`` (one movement in the caller's transaction), ``fastspend`` (a prepaid spend as
one statement) and ``batchwrite`` (a batch's debits, one UPDATE and one INSERT). They all
build an entry's values with ``build`` and write them with ``row`` in ``COLUMNS`` order,
and all judge a crossing with ``crossed`` (in Python) and ``crossing_set`` (its SQL twin).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from billing.enums import ProcessType, TransactionType
from billing.models import LedgerEntry

MAX_DESCRIPTION = 500  # the column's width; descriptions built from input are cut to it

#: The entry's columns, in the order ``row`` gives their values.
COLUMNS = (
    "id",
    "account_id",
    "created_at",
    "type",
    "process_type",
    "credits",
    "balance_after",
    "quantity",
    "user_id",
    "description",
    "reference",
    "payment_id",
    "reverses_entry_id",
)
INSERT = f"INSERT INTO ledger_entry ({', '.join(COLUMNS)})"


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


def build(
    movement: Movement, entry_id: uuid.UUID, *, balance_after: int, created_at: datetime
) -> LedgerEntry:
    """The entry ``movement`` appends (every writer builds its entries here)."""
    return LedgerEntry(
        id=entry_id,
        account_id=movement.account_id,
        created_at=created_at,
        type=movement.type,
        process_type=movement.process_type,
        credits=movement.credits,
        balance_after=balance_after,
        quantity=movement.quantity,
        user_id=movement.user_id,
        description=movement.description[:MAX_DESCRIPTION],
        reference=movement.reference,
        payment_id=movement.payment_id,
        reverses_entry_id=movement.reverses_entry_id,
    )


def row(entry: LedgerEntry, *, pg: bool) -> list[object]:
    """The entry's values in ``COLUMNS`` order, as the database takes them (uuids as text
    on SQLite)."""
    return [
        _uuid(entry.id, pg),
        entry.account_id,
        entry.created_at,
        TransactionType(entry.type).value,
        ProcessType(entry.process_type).value,
        entry.credits,
        entry.balance_after,
        entry.quantity,
        entry.user_id,
        entry.description,
        entry.reference,
        _uuid(entry.payment_id, pg),
        _uuid(entry.reverses_entry_id, pg),
    ]


def placeholders(rows: int, cols: int) -> str:
    one = "(" + ", ".join("?" * cols) + ")"
    return ", ".join([one] * rows)


def _uuid(value: object, pg: bool) -> object:
    if value is None:
        return None
    return value if pg else str(value)


# ---------------------------------------------------------------- threshold crossings


def crossed(before: int, after: int, threshold: int | None) -> bool:
    """A threshold crossing: the balance went from at or above ``threshold`` to below it.

    The one rule every path uses (DESIGN.md section 3, "Threshold crossings"): a balance
    that stays under the threshold, however often it is spent from, crosses nothing; saving
    or enabling the setting while below counts as a crossing (``autorecharge``)."""
    return threshold is not None and before >= threshold > after


def crossing_set(after: str) -> str:
    """The SET clause of a debit's ``UPDATE`` that records a crossing (``crossed``'s SQL
    twin): marks it open and numbers it (``recharge_seq``: the job id and trigger key of its
    recharge), so a payment settled late for an older crossing can't close a newer one.
    ``after`` is the balance after the debit, as an SQL expression of the old one (its
    placeholders appear twice). ``balance`` on the right-hand side is the value before the
    update, in PostgreSQL and SQLite alike."""
    crossing = (
        "recharge_threshold IS NOT NULL AND balance >= recharge_threshold "
        f"AND {after} < recharge_threshold"
    )
    return (
        f"recharge_crossed = CASE WHEN {crossing} THEN TRUE ELSE recharge_crossed END, "
        f"recharge_seq = CASE WHEN {crossing} THEN recharge_seq + 1 ELSE recharge_seq END"
    )


def crossing_seq(before: int, after: int, threshold: int | None, seq_after: int) -> int | None:
    """The number of the crossing a debit from ``before`` to ``after`` opened (the
    ``recharge_seq`` its ``crossing_set`` left), or None if it opened none."""
    limit = None if threshold is None else int(threshold)
    return int(seq_after) if crossed(before, after, limit) else None
