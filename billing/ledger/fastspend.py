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

from billing import changes, clock, idempotency, sql
from billing.ledger import entries
from billing.ledger.entries import Movement, crossing_set
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


class Taken:
    """The key was already claimed: replay (or wait for) the first request."""


TAKEN = Taken()


async def spend(
    movement: Movement, *, idempotency_key: str, params: dict[str, object]
) -> LedgerEntry | Taken | None:
    """Spend ``-movement.credits`` in one statement; ``None`` means: use the transactional
    path instead. The entry and a threshold crossing are reported to ``changes``."""
    entry_id = movement.entry_id or uuid.uuid4()
    credits = -movement.credits
    # The entry's values (its balance and time are the statement's, filled in after it).
    entry = entries.build(movement, entry_id, balance_after=0, created_at=sql.now())
    value = dict(zip(entries.COLUMNS, entries.row(entry, pg=True), strict=True))
    rows = await sql.fetch(
        _SPEND,
        movement.account_id,
        idempotency_key,
        idempotency.fingerprint("consumeCredits", params),
        json.dumps({"entry_id": str(entry_id), "free_units": 0}),
        credits,
        credits,
        credits,
        movement.account_id,
        credits,
        credits,
        value["id"],
        value["account_id"],
        clock.offset(),
        value["type"],
        value["process_type"],
        value["credits"],
        value["quantity"],
        value["user_id"],
        value["description"],
        value["reference"],
    )
    row = rows[0]
    if not row["claimed"]:
        return TAKEN
    if row["balance"] is None:
        await _withdraw(movement.account_id, idempotency_key, entry_id)
        return None
    entry.balance_after = int(row["balance"])
    entry.created_at = row["created_at"]
    changes.entry_posted(entry)
    seq = entries.crossing_seq(
        entry.balance_after + credits,
        entry.balance_after,
        row["recharge_threshold"],
        row["recharge_seq"],
    )
    if seq is not None:
        changes.threshold_crossed(movement.account_id, seq)
    return entry


async def _withdraw(account_id: str, key: str, entry_id: uuid.UUID) -> None:
    """Withdraw this claim, and only this one (its entry id): a twin may already have
    withdrawn it and claimed the key anew. If this statement is lost, the claim heals
    itself (``idempotency.withdraw_unsettled``)."""
    await sql.execute(
        "DELETE FROM idempotency_record WHERE account_id = ? AND key = ? "
        "AND result->>'entry_id' = ?",
        account_id,
        key,
        str(entry_id),
    )
