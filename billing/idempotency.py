"""Per-account idempotency keys for every write that moves credits or money.

A write *claims* its key first, in the caller's transaction, with the ids it is about to
create. ``INSERT ... ON CONFLICT DO NOTHING`` makes a concurrent twin wait for the first
to commit (PostgreSQL) and then see its record, so two requests with one key never both
do the work. A refused write rolls back and so forgets its key; a write that reached the
bank commits its claim together with the failed payment, so a retry replays it.

One claim is committed apart from its outcome: PostgreSQL's one-statement spend
(``billing.ledger.fastspend``) commits its claim and its ledger entry in one statement, or, when
it is refused, the claim alone, withdrawn by a second statement a moment later. If that
second statement never runs (a restart, a dropped connection), the claim would point for
ever at an entry that never existed. Such a claim heals itself: the claim and its entry
commit together, so a claim seen without its entry is dead, and the next request with the
key (once the claim is ``UNSETTLED_AFTER`` old) withdraws it and goes ahead
(``withdraw_unsettled``); ``orphaned`` lists the ones nobody came back for
(``billing.reconcile``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from billing import sql
from billing.enums import ErrorCode
from billing.errors import fail
from billing.models import IdempotencyRecord

MAX_KEY_LENGTH = 255


def check_key(key: str) -> None:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise fail(
            ErrorCode.VALIDATION,
            f"idempotencyKey must be 1 to {MAX_KEY_LENGTH} characters",
            "idempotencyKey",
        )


def fingerprint(operation: str, params: dict[str, Any]) -> str:
    canonical = json.dumps({"op": operation, "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Replay:
    """The stored result of the first request made with this key."""

    result: dict[str, Any]


async def lookup(
    account_id: str, key: str, operation: str, params: dict[str, Any]
) -> Replay | None:
    """The first result for ``key`` if there is one (for a retry to replay even when the
    world has changed since, e.g. the card it used is gone); ``claim`` still decides races."""
    check_key(key)
    existing = await IdempotencyRecord.get_or_none(account_id=account_id, key=key)
    return None if existing is None else _replay(existing, operation, params)


def _replay(existing: IdempotencyRecord, operation: str, params: dict[str, Any]) -> Replay:
    if existing.operation != operation or existing.fingerprint != fingerprint(operation, params):
        raise fail(
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            "This idempotency key was already used for a different request.",
            "idempotencyKey",
        )
    stored = existing.result
    if isinstance(stored, str):  # pragma: no cover - depends on the driver
        stored = json.loads(stored)
    assert isinstance(stored, dict)
    return Replay(stored)


async def claim(
    account_id: str, key: str, operation: str, params: dict[str, Any], result: dict[str, Any]
) -> Replay | None:
    """Claim ``key`` for this request, or return the first request's result.

    Raises ``IDEMPOTENCY_KEY_REUSED`` when the key was used with other parameters.
    """
    check_key(key)
    digest = fingerprint(operation, params)
    sql.connection()
    for _ in range(_CLAIM_TRIES):
        rows = await sql.fetch(
            "INSERT INTO idempotency_record "
            "(account_id, key, operation, fingerprint, result, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account_id, key) DO NOTHING RETURNING id",
            account_id,
            key,
            operation,
            digest,
            json.dumps(result),
            sql.now(),
        )
        if rows:
            return None
        existing = await IdempotencyRecord.get_or_none(account_id=account_id, key=key)
        if existing is not None:
            return _replay(existing, operation, params)
        # Withdrawn between the two statements (a refused one-statement spend on
        # PostgreSQL, see billing.ledger.fastspend): the key is free again.
    raise RuntimeError(f"could not claim idempotency key {key!r} of {account_id}")


_CLAIM_TRIES = 10


async def update_result(account_id: str, key: str, result: dict[str, Any]) -> None:
    """Record what the claimed request finally did (same transaction as the claim)."""
    await sql.execute(
        "UPDATE idempotency_record SET result = ? WHERE account_id = ? AND key = ?",
        json.dumps(result),
        account_id,
        key,
    )


#: A spend's claim seen without its entry this long after it was made is dead (its
#: withdrawal was lost): the next request with the key withdraws it.
UNSETTLED_AFTER = timedelta(milliseconds=500)


async def withdraw_unsettled(account_id: str, key: str, entry_id: str) -> bool:
    """Withdraw the ``consumeCredits`` claim of ``key`` whose entry ``entry_id`` does not
    exist, if it is ``UNSETTLED_AFTER`` old; True if it was withdrawn (the key is free).

    Only that claim: a claim made since (another entry id) is never touched. Safe at any
    time, since a claim and its entry commit together: a committed claim without its entry
    will never get one."""
    if not sql.is_postgres(sql.connection()):
        return False  # only the one-statement spend (PostgreSQL) commits a claim alone
    return (
        await sql.execute(
            "DELETE FROM idempotency_record WHERE account_id = ? AND key = ? "
            "AND operation = 'consumeCredits' AND result->>'entry_id' = ? "
            "AND created_at < clock_timestamp() - CAST(? AS interval) "
            "AND NOT EXISTS (SELECT 1 FROM ledger_entry WHERE id = ?)",
            account_id,
            key,
            entry_id,
            UNSETTLED_AFTER,
            uuid.UUID(entry_id),
        )
        > 0
    )


async def orphaned(
    account_ids: list[str] | None = None, *, older_than: timedelta = timedelta(seconds=10)
) -> list[tuple[str, str]]:
    """``(account_id, key)`` of the spends' claims that point at an entry that does not
    exist and are older than ``older_than``: withdrawals that were lost and that no retry
    has healed yet (harmless to the ledger; the next request with the key withdraws it)."""
    if not sql.is_postgres(sql.connection()):
        return []
    scope = ""
    params: list[Any] = [older_than]
    if account_ids:
        scope = " AND r.account_id IN (" + ", ".join("?" * len(account_ids)) + ")"
        params += list(account_ids)
    rows = await sql.fetch(
        "SELECT r.account_id, r.key FROM idempotency_record r "
        "WHERE r.operation = 'consumeCredits' AND r.result->>'entry_id' IS NOT NULL "
        "AND r.created_at < clock_timestamp() - CAST(? AS interval)" + scope + " "
        "AND NOT EXISTS (SELECT 1 FROM ledger_entry e "
        "WHERE e.id = CAST(r.result->>'entry_id' AS uuid)) ORDER BY r.account_id, r.key",
        *params,
    )
    return [(str(r["account_id"]), str(r["key"])) for r in rows]
