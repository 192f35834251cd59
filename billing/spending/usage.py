"""Spending credits: usage by platform services, reversals, staff grants and adjustments.

Each public function runs inside the caller's transaction and either completes or raises
``BillingError`` (nothing written). Keyed calls replay their first result.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

from tortoise.transactions import in_transaction

from billing import idempotency, sql
from billing.accounts import ensure_account, validate_account_id
from billing.enums import BillingMode, ErrorCode, ProcessType, TransactionType
from billing.errors import Validator, fail
from billing.ledger import fastspend as fast
from billing.ledger import posting
from billing.ledger.posting import Movement
from billing.models import Account, Card, LedgerEntry, MeteredUsage
from billing.payments.gateways import minimum_charge_cents
from billing.pricing import PriceBook
from billing.spending.quota import month_bounds, take_free_units
from billing.spending.request import (
    OPERATION,
    SpendItem,
    SpendRequest,
    check_usage_input,
    validate,
)

MAX_REASON = 500
MAX_STAFF_CREDITS = 10_000_000


@dataclass(frozen=True, slots=True)
class ConsumeResult:
    entry: LedgerEntry | None
    balance: int
    free_units_applied: int


async def consume(
    book: PriceBook,
    *,
    account_id: str,
    user_id: str,
    process_type: ProcessType,
    quantity: int,
    reference: str | None,
    idempotency_key: str,
) -> ConsumeResult:
    """Spend credits for ``quantity`` units of a prepaid process, free quota first.

    Owns its transaction: on PostgreSQL a plain prepaid spend is one statement (claim the
    key, debit, append the entry), so the account's row lock is held only while that
    statement runs, never across a round trip; anything else (free quota, a refusal, a
    low-balance crossing, SQLite) runs as ``consume_in_transaction``.
    """
    item = SpendItem(account_id, user_id, process_type, quantity, reference, idempotency_key)
    request = validate(book, item)
    if request.price.billing is BillingMode.PREPAID and _fast_path_applies():
        done = await _spend_in_one_statement(request)
        if done is not None:
            return done
    async with in_transaction():
        return await spend_in_transaction(request)


_REPLAY_WAITS = 50
_REPLAY_SLEEP = 0.02  # 50 waits outlast idempotency.UNSETTLED_AFTER


async def _spend_in_one_statement(request: SpendRequest) -> ConsumeResult | None:
    """The fast path (``fastspend``); None: the transactional path decides (and explains)."""
    await ensure_account(request.account_id)
    for _ in range(_REPLAY_WAITS):
        done = await fast.spend(
            request.movement(free=0, entry_id=uuid.uuid4()),
            idempotency_key=request.key,
            params=request.params,
        )
        if isinstance(done, LedgerEntry):
            return ConsumeResult(done, done.balance_after, 0)
        if done is None:
            return None
        replayed = await replay_when_settled(request.account_id, request.key, request.params)
        if replayed is not None:
            return replayed
        # the first request with this key was withdrawn: try again as a fresh one
    return None


async def replay_when_settled(
    account_id: str, key: str, params: dict[str, object]
) -> ConsumeResult | None:
    """The first request's result; it may still be settling (a fast-path claim whose
    spend fell back to a transaction), so wait for it a moment. ``None`` if it was
    withdrawn (refused: the key is free again). Every writer that finds a key claimed
    (a single spend, a batch) goes through here, so they treat an earlier claimant alike.

    Raises ``IDEMPOTENCY_KEY_REUSED`` if the key was used with other parameters."""
    for _ in range(_REPLAY_WAITS):
        record = await idempotency.lookup(account_id, key, OPERATION, params)
        if record is None:
            return None
        entry_id = record.result.get("entry_id")
        if entry_id is None or await LedgerEntry.exists(id=entry_id, account_id=account_id):
            return await _replay_consume(account_id, record.result)
        if await idempotency.withdraw_unsettled(account_id, key, str(entry_id)):
            return None  # its withdrawal was lost: withdrawn now, the key is free
        await asyncio.sleep(_REPLAY_SLEEP)
    raise RuntimeError(f"idempotency key {key!r} of {account_id} did not settle")


def _fast_path_applies() -> bool:
    return sql.is_postgres(sql.connection()) and not sql.in_transaction()


async def consume_in_transaction(
    book: PriceBook,
    *,
    account_id: str,
    user_id: str,
    process_type: ProcessType,
    quantity: int,
    reference: str | None,
    idempotency_key: str,
) -> ConsumeResult:
    """``consume`` in the caller's transaction."""
    item = SpendItem(account_id, user_id, process_type, quantity, reference, idempotency_key)
    return await spend_in_transaction(validate(book, item))


async def spend_in_transaction(request: SpendRequest) -> ConsumeResult:
    """A validated spend in the caller's transaction: claim the key (or replay its first
    result), take free units first, debit the rest."""
    await ensure_account(request.account_id)
    entry_id = uuid.uuid4()
    replayed = await _claim(request, entry_id)
    if replayed is not None:
        return replayed
    free = await _free_units(request)
    if free == request.item.quantity:
        balance = await posting.balance_of(request.account_id)
        await idempotency.update_result(
            request.account_id,
            request.key,
            {"entry_id": None, "free_units": free, "balance": balance},
        )
        return ConsumeResult(None, balance, free)
    entry = await posting.post(request.movement(free=free, entry_id=entry_id))
    if free:
        await idempotency.update_result(
            request.account_id, request.key, {"entry_id": str(entry_id), "free_units": free}
        )
    return ConsumeResult(entry, entry.balance_after, free)


async def _claim(request: SpendRequest, entry_id: uuid.UUID) -> ConsumeResult | None:
    """Claim the key for ``entry_id``; the first request's result if it holds the key."""
    account_id, key = request.account_id, request.key
    for _ in range(_REPLAY_WAITS):
        replay = await idempotency.claim(
            account_id,
            key,
            OPERATION,
            request.params,
            {"entry_id": str(entry_id), "free_units": 0},
        )
        if replay is None:
            return None
        first_entry = replay.result.get("entry_id")
        if first_entry is None or await LedgerEntry.exists(id=first_entry, account_id=account_id):
            return await _replay_consume(account_id, replay.result)
        # A fast-path claim whose spend was refused, about to be withdrawn (its entry
        # would have come in the same statement): claim again once it is gone, or
        # withdraw it when its own withdrawal was lost.
        if not await idempotency.withdraw_unsettled(account_id, key, str(first_entry)):
            await asyncio.sleep(_REPLAY_SLEEP)
    raise RuntimeError(f"idempotency key {key!r} of {account_id} did not settle")


async def _free_units(request: SpendRequest) -> int:
    """Free units taken from this month's quota (none for a plain prepaid process)."""
    allowance = request.free_allowance
    if allowance is None:
        return 0
    account = await Account.get(id=request.account_id)
    return await take_free_units(
        request.account_id,
        account.timezone,
        request.item.process_type,
        request.item.quantity,
        allowance,
    )


async def _replay_consume(account_id: str, result: dict[str, object]) -> ConsumeResult:
    free = int(str(result.get("free_units", 0)))
    entry_id = result.get("entry_id")
    if entry_id is None:
        return ConsumeResult(None, int(str(result.get("balance", 0))), free)
    entry = await LedgerEntry.get(id=entry_id, account_id=account_id)
    return ConsumeResult(entry, entry.balance_after, free)


@dataclass(frozen=True, slots=True)
class EntryResult:
    entry: LedgerEntry
    balance: int


async def _claim_entry(
    account_id: str, idempotency_key: str, operation: str, fingerprint: dict[str, object]
) -> tuple[uuid.UUID, EntryResult | None]:
    """Claim ``idempotency_key`` for a staff or reversal entry: the id the new entry will
    have, and the earlier result when the key was already used for the same request
    (``idempotency.claim`` raises for another request under the same key)."""
    new_id = uuid.uuid4()
    replay = await idempotency.claim(
        account_id, idempotency_key, operation, fingerprint, {"entry_id": str(new_id)}
    )
    if replay is None:
        return new_id, None
    entry = await LedgerEntry.get(id=replay.result["entry_id"], account_id=account_id)
    return new_id, EntryResult(entry, entry.balance_after)


async def _post(movement: Movement) -> EntryResult:
    entry = await posting.post(movement)
    return EntryResult(entry, entry.balance_after)


async def reverse_usage(
    *,
    entry_id: uuid.UUID | None,
    reason: str,
    idempotency_key: str,
    user_id: str,
    scope_account_id: str | None,
) -> EntryResult:
    """Return a usage entry's credits. ``scope_account_id`` limits whose entries are visible."""
    v = Validator()
    if not reason.strip() or len(reason) > MAX_REASON:
        v.add(f"reason must be 1 to {MAX_REASON} characters", "reason")
    v.check()
    idempotency.check_key(idempotency_key)
    original = None
    if entry_id is not None:
        query = LedgerEntry.filter(id=entry_id)
        if scope_account_id is not None:
            query = query.filter(account_id=scope_account_id)
        original = await query.first()
    if original is None:
        raise fail(ErrorCode.NOT_FOUND, "No such transaction.", "transactionId")
    account_id = original.account_id
    new_id, replayed = await _claim_entry(
        account_id,
        idempotency_key,
        "reverseUsage",
        {"transactionId": str(original.id), "reason": reason},
    )
    if replayed is not None:
        return replayed
    if original.type is not TransactionType.USAGE:
        raise fail(ErrorCode.VALIDATION, "Only usage can be reversed.", "transactionId")
    await posting.lock_account(account_id)
    if await LedgerEntry.exists(reverses_entry_id=original.id):
        raise fail(ErrorCode.VALIDATION, "This usage was already reversed.", "transactionId")
    return await _post(
        Movement(
            account_id=account_id,
            credits=-original.credits,
            type=TransactionType.REVERSAL,
            process_type=original.process_type,
            description=f"Reversal of {original.description}: {reason.strip()}",
            user_id=user_id,
            reference=original.reference,
            quantity=original.quantity,
            reverses_entry_id=original.id,
            entry_id=new_id,
        )
    )


async def grant_or_adjust(
    *,
    account_id: str,
    credits: int,
    reason: str,
    idempotency_key: str,
    user_id: str,
    adjust: bool,
) -> EntryResult:
    """Billing staff: ``grant`` adds credits; ``adjust`` adds or removes (never below zero)."""
    v = Validator()
    validate_account_id(v, account_id, "accountId")
    low = -MAX_STAFF_CREDITS if adjust else 1
    if not low <= credits <= MAX_STAFF_CREDITS or credits == 0:
        what = "a non-zero amount" if adjust else "positive"
        v.add(
            f"credits must be {what} of at most {MAX_STAFF_CREDITS:,}",
            "credits",
            code=ErrorCode.INVALID_AMOUNT,
        )
    if not reason.strip() or len(reason) > MAX_REASON:
        v.add(f"reason must be 1 to {MAX_REASON} characters", "reason")
    v.check()
    idempotency.check_key(idempotency_key)
    await ensure_account(account_id)
    operation = "adjustCredits" if adjust else "grantCredits"
    new_id, replayed = await _claim_entry(
        account_id, idempotency_key, operation, {"credits": credits, "reason": reason}
    )
    if replayed is not None:
        return replayed
    kind = TransactionType.ADJUSTMENT if adjust else TransactionType.GRANT
    label = "Adjustment" if adjust else "Credits granted"
    return await _post(
        Movement(
            account_id=account_id,
            credits=credits,
            type=kind,
            process_type=ProcessType.ADMINISTRATIVE,
            description=f"{label}: {reason.strip()}",
            user_id=user_id,
            entry_id=new_id,
        )
    )


async def record_metered(
    book: PriceBook,
    *,
    account_id: str,
    user_id: str,
    process_type: ProcessType,
    quantity: int,
    reference: str | None,
    idempotency_key: str,
) -> MeteredUsage:
    """Record metered usage (invoiced monthly to the card on file)."""
    v = Validator()
    check_usage_input(v, quantity, reference, account_id, user_id)
    v.check()
    price = book.process(process_type)
    if price is None or price.billing is not BillingMode.METERED or price.cents_per_unit is None:
        raise fail(
            ErrorCode.VALIDATION,
            f"{process_type.value} is not metered (use consumeCredits)",
            "processType",
        )
    idempotency.check_key(idempotency_key)
    await ensure_account(account_id)
    usage_id = uuid.uuid4()
    replay = await idempotency.claim(
        account_id,
        idempotency_key,
        "recordMeteredUsage",
        {
            "userId": user_id,
            "processType": process_type.value,
            "quantity": quantity,
            "reference": reference,
        },
        {"usage_id": str(usage_id)},
    )
    if replay is not None:
        return await MeteredUsage.get(id=replay.result["usage_id"], account_id=account_id)
    if not await Card.exists(account_id=account_id, removed_at=None):
        raise fail(
            ErrorCode.NO_CARD_ON_FILE,
            "Metered services are invoiced monthly to a card: add a card first.",
        )
    amount_cents = quantity * price.cents_per_unit
    account = await Account.get(id=account_id)
    start, end = month_bounds(sql.now(), account.timezone)
    rows = await sql.fetch(
        "SELECT COALESCE(SUM(amount_cents), 0) AS total FROM metered_usage "
        "WHERE account_id = ? AND created_at >= ? AND created_at < ?",
        account_id,
        start,
        end,
    )
    # The month's invoice (its usage, plus at most one carried amount under the minimum
    # charge) must fit the API's Int (invariant 10).
    headroom = posting.MAX_BALANCE - minimum_charge_cents(book.currency)
    if int(rows[0]["total"]) + amount_cents > headroom:
        raise fail(
            ErrorCode.BALANCE_LIMIT,
            "This month's metered usage would pass the largest invoice the service holds.",
            "quantity",
        )
    return await MeteredUsage.create(
        id=usage_id,
        account_id=account_id,
        user_id=user_id,
        process_type=process_type,
        quantity=quantity,
        unit_cents=price.cents_per_unit,
        amount_cents=amount_cents,
        reference=reference,
        created_at=sql.now(),
    )
