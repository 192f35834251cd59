"""A prepaid spend on PostgreSQL as one statement.

Claiming the idempotency key, debiting the balance (``WHERE balance >= n``) and appending
the ledger entry run as one statement in autocommit, so the account's row lock is held
only while PostgreSQL executes it, never across a round trip to this process: with many
concurrent spends on one account the lock, not Python, is the limit.

Whatever the statement can't settle falls back to the transactional path: a refusal
(the balance is short), a spend that would cross the low-balance level (its notice must be
written in the same transaction), an unknown account. The claim it made is withdrawn first,
so a refused key is not remembered.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime

from billing import clock, idempotency, sql
from billing.enums import ProcessType, TransactionType
from billing.ledger.posting import MAX_DESCRIPTION, crossed, crossing_set
from billing.models import LedgerEntry

_SPEND = """
WITH claim AS (
    INSERT INTO idempotency_record (account_id, key, operation, fingerprint, result, created_at)
    VALUES (?, ?, 'consumeCredits', ?, ?, now())
    ON CONFLICT (account_id, key) DO NOTHING RETURNING id
), debit AS (
    UPDATE credit_account SET balance = balance - ?, {crossing}
    WHERE id = ? AND balance >= ? AND EXISTS (SELECT 1 FROM claim)
      AND (low_balance_level IS NULL OR balance < low_balance_level
           OR balance - ? >= low_balance_level)
    RETURNING balance, recharge_threshold, recharge_seq
), entry AS (
    INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, credits,
                              balance_after, quantity, user_id, description, reference)
    SELECT ?, ?, clock_timestamp() + CAST(? AS interval), ?, ?, ?, debit.balance, ?, ?, ?, ?
    FROM debit
    RETURNING created_at
)
SELECT (SELECT count(*) FROM claim) AS claimed, d.balance, d.recharge_threshold,
       d.recharge_seq, (SELECT created_at FROM entry) AS created_at
FROM (SELECT 1) AS one LEFT JOIN debit AS d ON true
""".replace("{crossing}", crossing_set("balance - ?"))


@dataclass(frozen=True, slots=True)
class Spent:
    entry: LedgerEntry
    recharge_seq: int | None


class Taken:
    """The key was already claimed: replay (or wait for) the first request."""


TAKEN = Taken()


async def spend(
    *,
    account_id: str,
    user_id: str,
    process_type: ProcessType,
    quantity: int,
    reference: str | None,
    idempotency_key: str,
    params: dict[str, object],
    credits: int,
    description: str,
) -> Spent | Taken | None:
    """Spend in one statement; ``None`` means: use the transactional path instead."""
    entry_id = uuid.uuid4()
    fingerprint = idempotency.fingerprint("consumeCredits", params)
    description = description[:MAX_DESCRIPTION]
    rows = await sql.fetch(
        _SPEND,
        account_id,
        idempotency_key,
        fingerprint,
        json.dumps({"entry_id": str(entry_id), "free_units": 0}),
        credits,
        credits,
        credits,
        account_id,
        credits,
        credits,
        entry_id,
        account_id,
        clock.offset(),
        TransactionType.USAGE.value,
        process_type.value,
        -credits,
        quantity,
        user_id,
        description,
        reference,
    )
    row = rows[0]
    if not row["claimed"]:
        return TAKEN
    if row["balance"] is None:
        # Withdraw this claim, and only this one (its entry id): a twin may already have
        # withdrawn it and claimed the key anew. If this statement is lost, the claim
        # heals itself (``idempotency.withdraw_unsettled``).
        await sql.execute(
            "DELETE FROM idempotency_record WHERE account_id = ? AND key = ? "
            "AND result->>'entry_id' = ?",
            account_id,
            idempotency_key,
            str(entry_id),
        )
        return None
    balance = int(row["balance"])
    created_at: datetime = row["created_at"]
    threshold = row["recharge_threshold"]
    entry = LedgerEntry(
        id=entry_id,
        account_id=account_id,
        created_at=created_at,
        type=TransactionType.USAGE,
        process_type=process_type,
        credits=-credits,
        balance_after=balance,
        quantity=quantity,
        user_id=user_id,
        description=description,
        reference=reference,
        payment_id=None,
        reverses_entry_id=None,
    )
    crossing = crossed(balance + credits, balance, None if threshold is None else int(threshold))
    return Spent(entry, int(row["recharge_seq"]) if crossing else None)
