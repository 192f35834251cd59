"""Per-account idempotency keys for every write that moves credits or money.

A write *claims* its key first, in the caller's transaction, with the ids it is about to
create. ``INSERT ... ON CONFLICT DO NOTHING`` makes a concurrent twin wait for the first
to commit (PostgreSQL) and then see its record, so two requests with one key never both
do the work. A refused write rolls back and so forgets its key; a write that reached the
bank commits its claim together with the failed payment, so a retry replays it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
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
        # PostgreSQL, see billing.fastspend): the key is free again.
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
