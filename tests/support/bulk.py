"""Many ledger entries, fast: written straight to the table (``executemany``) with a
consistent chain (each ``balance_after`` follows the previous one) and the account's
balance moved by their sum, so the ledger invariants and reconciliation still hold."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from tortoise import connections

from billing import sql
from billing.accounts import ensure_account
from billing.enums import ProcessType, TransactionType


@dataclass(frozen=True, slots=True)
class Spec:
    credits: int
    type: TransactionType = TransactionType.GRANT
    process_type: ProcessType = ProcessType.ADMINISTRATIVE
    description: str = "bulk entry"
    user_id: str | None = None
    reference: str | None = None
    quantity: int | None = None


@dataclass(frozen=True, slots=True)
class Written:
    id: uuid.UUID
    created_at: datetime
    balance_after: int


INSERT = (
    "INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits, "
    "balance_after, quantity, user_id, description, reference, payment_id, reverses_entry_id) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)"
)
BATCH = 10_000


async def insert_entries(
    account_id: str,
    count: int,
    spec: Callable[[int], Spec],
    *,
    first_at: datetime,
    step: timedelta = timedelta(milliseconds=1),
) -> list[Written]:
    """Append ``count`` entries (``spec(i)`` each) after whatever the account has, at
    ``first_at``, ``first_at + step``, ...; returns the first and the last written."""
    await ensure_account(account_id)
    conn = connections.get("default")
    postgres = sql.is_postgres(conn)
    query = sql._to_postgres(INSERT) if postgres else INSERT
    rows = await sql.fetch("SELECT balance FROM credit_account WHERE id = ?", account_id)
    balance = int(rows[0]["balance"])
    start = balance
    ends: list[Written] = []
    batch: list[list[object]] = []
    for i in range(count):
        s = spec(i)
        balance += s.credits
        assert balance >= 0, "a spec may not take the balance below zero"
        entry_id = uuid.uuid4()
        at = first_at + i * step
        if i == 0 or i == count - 1:
            ends.append(Written(entry_id, at, balance))
        batch.append(
            [
                entry_id if postgres else str(entry_id),
                account_id,
                at,
                s.type.value,
                s.process_type.value,
                s.credits,
                balance,
                s.quantity,
                s.user_id,
                s.description,
                s.reference,
            ]
        )
        if len(batch) == BATCH:
            await conn.execute_many(query, batch)
            batch = []
    if batch:
        await conn.execute_many(query, batch)
    await sql.execute(
        "UPDATE credit_account SET balance = balance + ? WHERE id = ?", balance - start, account_id
    )
    return ends
