"""Spending in bulk: ``consume_batch`` applies up to 1,000 usage items at once.

Each item has the meaning of one ``usage.consume`` call (its own validation, idempotency
key, free quota first, INSUFFICIENT_CREDITS when the balance can't cover it, in the
order given) but the whole batch costs a handful of statements, not a few per item:
the keys are claimed in one INSERT, the accounts locked in one SELECT (in id order, so
concurrent batches can't deadlock), every balance moved by one UPDATE, every entry written
by one INSERT. Caller owns the transaction.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from billing import changes, idempotency, sql
from billing.enums import BillingMode, ErrorCode, ProcessType, TransactionType
from billing.errors import BillingError, UserError, Validator
from billing.ledger import posting
from billing.models import LedgerEntry
from billing.notifications import lowbalance
from billing.pricing import PriceBook
from billing.spending.quota import month_bounds
from billing.spending.usage import (
    ConsumeResult,
    _check_usage_input,
    _prepaid_price,
    describe_usage,
    replay_when_settled,
)

MAX_BATCH = 1000
_OPERATION = "consumeCredits"


@dataclass(frozen=True, slots=True)
class SpendItem:
    account_id: str
    user_id: str
    process_type: ProcessType
    quantity: int
    reference: str | None
    idempotency_key: str


@dataclass(slots=True)
class _Work:
    index: int
    item: SpendItem
    params: dict[str, Any]
    fingerprint: str
    entry_id: uuid.UUID = field(default_factory=uuid.uuid4)
    credits_per_unit: int = 0
    allowance: int | None = None  # free monthly quota, for FREE_QUOTA_THEN_PREPAID
    free: int = 0
    debit: int = 0
    balance_after: int = 0


Outcome = ConsumeResult | BillingError


@dataclass(frozen=True, slots=True)
class BatchResult:
    outcomes: list[Outcome]  # one per item, in order
    recharges: dict[str, int]  # accounts left below their threshold -> crossing number


def _params(item: SpendItem) -> dict[str, Any]:
    return {
        "userId": item.user_id,
        "processType": item.process_type.value,
        "quantity": item.quantity,
        "reference": item.reference,
    }


def _values(rows: int, cols: int) -> str:
    one = "(" + ", ".join("?" * cols) + ")"
    return ", ".join([one] * rows)


async def consume_batch(book: PriceBook, items: list[SpendItem]) -> BatchResult:
    """One outcome per item, in order: a ``ConsumeResult`` or the item's ``BillingError``."""
    if not 1 <= len(items) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} items")
    out: list[Outcome | None] = [None] * len(items)
    recharges: dict[str, int] = {}
    work: list[_Work] = []
    for index, item in enumerate(items):
        try:
            v = Validator()
            _check_usage_input(v, item.quantity, item.reference, item.account_id, item.user_id)
            v.check()
            price = _prepaid_price(book, item.process_type)
            idempotency.check_key(item.idempotency_key)
        except BillingError as exc:
            out[index] = exc
            continue
        params = _params(item)
        w = _Work(index, item, params, idempotency.fingerprint(_OPERATION, params))
        w.credits_per_unit = price.credits_per_unit or 0
        if price.billing is BillingMode.FREE_QUOTA_THEN_PREPAID:
            w.allowance = price.free_monthly_quota or 0
        work.append(w)

    # The first item with a key claims it; a later twin in the batch replays it.
    firsts: dict[tuple[str, str], _Work] = {}
    twins: list[_Work] = []
    for w in work:
        slot = (w.item.account_id, w.item.idempotency_key)
        if slot in firsts:
            twins.append(w)
        else:
            firsts[slot] = w
    claimants = list(firsts.values())
    if claimants:
        accounts = sorted({w.item.account_id for w in claimants})
        now = sql.now()
        await _ensure_accounts(accounts, now)
        fresh: list[_Work] = []
        waiting = claimants
        for _ in range(_CLAIM_ROUNDS):
            claimed = await _claim(waiting, now)
            fresh += [w for w in waiting if (w.item.account_id, w.item.idempotency_key) in claimed]
            # Keys another request holds: replay it once it has settled; a withdrawn one
            # (that request was refused) is free again and claimed in the next round.
            waiting = await _replays(
                [w for w in waiting if (w.item.account_id, w.item.idempotency_key) not in claimed],
                out,
            )
            if not waiting:
                break
        else:
            raise RuntimeError(f"{len(waiting)} idempotency keys did not settle")
        refused = await _apply(fresh, out, recharges)
        if refused:
            await _forget(refused)
    for w in twins:  # resolved against the first item with the same key
        first = firsts[(w.item.account_id, w.item.idempotency_key)]
        if first.fingerprint != w.fingerprint:
            out[w.index] = _reused()
        else:
            out[w.index] = out[first.index]
    assert all(o is not None for o in out)
    return BatchResult([o for o in out if o is not None], recharges)


async def _ensure_accounts(accounts: list[str], now: Any) -> None:
    rows = ", ".join(["(?, 0, 'UTC', 0, ?)"] * len(accounts))
    await sql.execute(
        "INSERT INTO credit_account (id, balance, timezone, recharge_seq, created_at) "
        f"VALUES {rows} ON CONFLICT (id) DO NOTHING",
        *[v for a in accounts for v in (a, now)],
    )


async def _claim(claimants: list[_Work], now: Any) -> set[tuple[str, str]]:
    """Claim the keys in one INSERT, in (account, key) order: two batches holding some of
    the same keys, in whatever order their items came, take them in one order and so
    cannot deadlock on PostgreSQL's unique index."""
    args: list[Any] = []
    for w in sorted(claimants, key=lambda w: (w.item.account_id, w.item.idempotency_key)):
        result = json.dumps({"entry_id": str(w.entry_id), "free_units": 0})
        args += [w.item.account_id, w.item.idempotency_key, _OPERATION, w.fingerprint, result, now]
    rows = await sql.fetch(
        "INSERT INTO idempotency_record "
        "(account_id, key, operation, fingerprint, result, created_at) "
        f"VALUES {_values(len(claimants), 6)} "
        "ON CONFLICT (account_id, key) DO NOTHING RETURNING account_id, key",
        *args,
    )
    return {(str(r["account_id"]), str(r["key"])) for r in rows}


def _reused() -> BillingError:
    return BillingError(
        UserError(
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            "This idempotency key was already used for a different request.",
            ("idempotencyKey",),
        )
    )


_CLAIM_ROUNDS = 10


async def _replays(seen: list[_Work], out: list[Outcome | None]) -> list[_Work]:
    """Replay the items whose key another request claimed; return those whose claimant
    withdrew (to be claimed again)."""
    withdrawn: list[_Work] = []
    for w in seen:
        try:
            replayed = await replay_when_settled(
                w.item.account_id, w.item.idempotency_key, w.params
            )
        except BillingError as exc:  # the key was used for something else
            out[w.index] = exc
            continue
        if replayed is None:
            withdrawn.append(w)
        else:
            out[w.index] = replayed
    return withdrawn


async def _apply(
    fresh: list[_Work], out: list[Outcome | None], recharges: dict[str, int]
) -> list[_Work]:
    """Decide every fresh item in order under the account locks, then write them all."""
    if not fresh:
        return []
    accounts = sorted({w.item.account_id for w in fresh})
    conn = sql.connection()
    lock = " ORDER BY id FOR NO KEY UPDATE" if sql.is_postgres(conn) else ""
    marks = ", ".join("?" * len(accounts))
    rows = await sql.fetch(
        "SELECT id, balance, timezone, recharge_threshold, recharge_seq, low_balance_level "
        "FROM credit_account "
        f"WHERE id IN ({marks}){lock}",
        *accounts,
    )
    balance = {str(r["id"]): int(r["balance"]) for r in rows}
    timezone = {str(r["id"]): str(r["timezone"]) for r in rows}
    quota, periods = await _quota_left(fresh, timezone)
    refused: list[_Work] = []
    accepted: list[_Work] = []
    for w in fresh:
        acct = w.item.account_id
        key = (acct, w.item.process_type)
        w.free = min(w.item.quantity, quota.get(key, 0)) if w.allowance is not None else 0
        w.debit = (w.item.quantity - w.free) * w.credits_per_unit
        if w.debit > balance[acct]:
            refused.append(w)
            out[w.index] = BillingError(
                UserError(
                    ErrorCode.INSUFFICIENT_CREDITS,
                    f"The balance does not cover {w.debit} credits.",
                )
            )
            continue
        if w.free:
            quota[key] -= w.free
        balance[acct] -= w.debit
        w.balance_after = balance[acct]
        accepted.append(w)
    await _write(accepted, out, periods)
    for r in rows:
        threshold = r["recharge_threshold"]
        acct = str(r["id"])
        if posting.crossed(
            int(r["balance"]), balance[acct], None if threshold is None else int(threshold)
        ):
            recharges[acct] = int(r["recharge_seq"]) + 1  # the crossing numbered it
        level = None if r["low_balance_level"] is None else int(r["low_balance_level"])
        if level is not None and lowbalance.turned_low(int(r["balance"]), balance[acct], level):
            # The batch only spends: the balance crossed the level once, at this entry.
            crossing = next(
                w for w in accepted if w.item.account_id == acct and w.balance_after < level
            )
            await lowbalance.notify(
                acct, balance[acct], level, f"balance-low:{acct}:{crossing.entry_id}"
            )
    return refused


QuotaKey = tuple[str, ProcessType]


async def _quota_left(
    fresh: list[_Work], timezone: dict[str, str]
) -> tuple[dict[QuotaKey, int], dict[QuotaKey, Any]]:
    """Free units left this month per (account, process), locked; and each period start."""
    left: dict[QuotaKey, int] = {}
    periods: dict[QuotaKey, Any] = {}
    wanted = {
        (w.item.account_id, w.item.process_type): w.allowance
        for w in fresh
        if w.allowance is not None
    }
    conn = sql.connection()
    lock = " FOR UPDATE" if sql.is_postgres(conn) else ""
    for (acct, process), allowance in sorted(wanted.items()):
        start, _ = month_bounds(sql.now(), timezone[acct])
        await sql.execute(
            "INSERT INTO free_quota_usage (account_id, process_type, period_start, used) "
            "VALUES (?, ?, ?, 0) ON CONFLICT (account_id, process_type, period_start) DO NOTHING",
            acct,
            process.value,
            start,
        )
        rows = await sql.fetch(
            "SELECT used FROM free_quota_usage "
            f"WHERE account_id = ? AND process_type = ? AND period_start = ?{lock}",
            acct,
            process.value,
            start,
        )
        left[(acct, process)] = max(0, int(allowance or 0) - int(rows[0]["used"]))
        periods[(acct, process)] = start
    return left, periods


async def _write(
    accepted: list[_Work], out: list[Outcome | None], periods: dict[QuotaKey, Any]
) -> None:
    conn = sql.connection()
    pg = sql.is_postgres(conn)
    debits: dict[str, int] = defaultdict(int)
    for w in accepted:
        debits[w.item.account_id] += w.debit
    moved = {a: d for a, d in debits.items() if d}
    if moved:
        rows = ", ".join(["(?, CAST(? AS BIGINT))"] * len(moved))
        # The same crossing rule as posting.CROSSING_SET, for a whole batch's debit at once.
        await sql.execute(
            f"WITH v(id, amount) AS (VALUES {rows}) "
            "UPDATE credit_account SET balance = balance - "
            "(SELECT v.amount FROM v WHERE v.id = credit_account.id), "
            + posting.crossing_set(
                "balance - (SELECT v.amount FROM v WHERE v.id = credit_account.id)"
            )
            + " WHERE id IN (SELECT v.id FROM v)",
            *[x for a, d in sorted(moved.items()) for x in (a, d)],
        )
    now = sql.now()
    entries = [w for w in accepted if w.debit]
    # Entries of one account get strictly increasing times, in the order given, so the
    # history (newest first over (created_at, id)) keeps the batch's order.
    nth: dict[str, int] = defaultdict(int)
    at: dict[int, Any] = {}
    for w in entries:
        at[w.index] = now + timedelta(microseconds=nth[w.item.account_id])
        nth[w.item.account_id] += 1
    if entries:
        args: list[Any] = []
        for w in entries:
            i = w.item
            args += [
                w.entry_id if pg else str(w.entry_id),
                i.account_id,
                at[w.index],
                TransactionType.USAGE.value,
                i.process_type.value,
                -w.debit,
                w.balance_after,
                i.quantity,
                i.user_id,
                describe_usage(i.process_type, i.quantity, w.free),
                i.reference,
            ]
        await sql.execute(
            "INSERT INTO ledger_entry (id, account_id, created_at, type, process_type, "
            "credits, balance_after, quantity, user_id, description, reference) "
            f"VALUES {_values(len(entries), 11)}",
            *args,
        )
    used: dict[tuple[str, ProcessType], int] = defaultdict(int)
    for w in accepted:
        if w.free:
            used[(w.item.account_id, w.item.process_type)] += w.free
            result: dict[str, Any] = {
                "entry_id": str(w.entry_id) if w.debit else None,
                "free_units": w.free,
            }
            if not w.debit:
                result["balance"] = w.balance_after
            await idempotency.update_result(w.item.account_id, w.item.idempotency_key, result)
    for (acct, process), n in used.items():
        await sql.execute(
            "UPDATE free_quota_usage SET used = used + ? "
            "WHERE account_id = ? AND process_type = ? AND period_start = ?",
            n,
            acct,
            process.value,
            periods[(acct, process)],
        )
    for w in accepted:
        entry = None
        if w.debit:
            i = w.item
            entry = LedgerEntry(
                id=w.entry_id,
                account_id=i.account_id,
                created_at=at[w.index],
                type=TransactionType.USAGE,
                process_type=i.process_type,
                credits=-w.debit,
                balance_after=w.balance_after,
                quantity=i.quantity,
                user_id=i.user_id,
                description=describe_usage(i.process_type, i.quantity, w.free),
                reference=i.reference,
                payment_id=None,
                reverses_entry_id=None,
            )
            changes.entry_posted(entry)
        out[w.index] = ConsumeResult(entry, w.balance_after, w.free)


async def _forget(refused: list[_Work]) -> None:
    """Refused items are not remembered under their keys (as for a single spend)."""
    for w in refused:
        await sql.execute(
            "DELETE FROM idempotency_record WHERE account_id = ? AND key = ?",
            w.item.account_id,
            w.item.idempotency_key,
        )
