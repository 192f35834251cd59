"""Spending in bulk: ``consume_batch`` applies up to 1,000 usage items at once.

Each item has the meaning of one ``usage.consume`` call (its own validation, idempotency
key, free quota first, INSUFFICIENT_CREDITS when the balance can't cover it, in the
order given) but the whole batch costs a handful of statements, not a few per item:
the keys are claimed in one INSERT, the accounts locked in one SELECT (in id order, so
concurrent batches can't deadlock), every balance moved by one UPDATE, every entry written
by one INSERT (the last three are the ledger's: ``ledger.batchwrite``). Each item is
validated once (``spending.request``). Caller owns the transaction.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from billing import idempotency, sql
from billing.enums import ErrorCode, ProcessType
from billing.errors import BillingError, UserError
from billing.ledger import batchwrite
from billing.pricing import PriceBook
from billing.spending.quota import month_bounds
from billing.spending.request import OPERATION, SpendItem, SpendRequest, validate
from billing.spending.usage import ConsumeResult, replay_when_settled

__all__ = ["MAX_BATCH", "Outcome", "SpendItem", "consume_batch"]

MAX_BATCH = 1000


@dataclass(slots=True)
class _Work:
    index: int
    request: SpendRequest
    fingerprint: str
    entry_id: uuid.UUID = field(default_factory=uuid.uuid4)
    free: int = 0
    debit: int = 0
    balance_after: int = 0

    @property
    def item(self) -> SpendItem:
        return self.request.item

    @property
    def slot(self) -> tuple[str, str]:
        return (self.item.account_id, self.item.idempotency_key)


Outcome = ConsumeResult | BillingError


def _values(rows: int, cols: int) -> str:
    one = "(" + ", ".join("?" * cols) + ")"
    return ", ".join([one] * rows)


async def consume_batch(book: PriceBook, items: list[SpendItem]) -> list[Outcome]:
    """One outcome per item, in order: a ``ConsumeResult`` or the item's ``BillingError``.
    Entries and threshold crossings are reported to ``changes``."""
    if not 1 <= len(items) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH} items")
    out: list[Outcome | None] = [None] * len(items)
    work = _validated(book, items, out)
    # The first item with a key claims it; a later twin in the batch replays it.
    firsts: dict[tuple[str, str], _Work] = {}
    twins = [w for w in work if firsts.setdefault(w.slot, w) is not w]
    claimants = list(firsts.values())
    if claimants:
        fresh = await _claim_all(claimants, out)
        refused = await _apply(fresh, out)
        if refused:
            await _forget(refused)
    for w in twins:  # resolved against the first item with the same key
        first = firsts[w.slot]
        out[w.index] = _reused() if first.fingerprint != w.fingerprint else out[first.index]
    assert all(o is not None for o in out)
    return [o for o in out if o is not None]


def _validated(book: PriceBook, items: list[SpendItem], out: list[Outcome | None]) -> list[_Work]:
    """The valid items to work on; an invalid one's outcome is its error."""
    work: list[_Work] = []
    for index, item in enumerate(items):
        try:
            request = validate(book, item)
        except BillingError as exc:
            out[index] = exc
            continue
        work.append(_Work(index, request, idempotency.fingerprint(OPERATION, request.params)))
    return work


async def _claim_all(claimants: list[_Work], out: list[Outcome | None]) -> list[_Work]:
    """Claim every key; the items whose key this batch now holds. Keys another request
    holds are replayed once it has settled; a withdrawn one (that request was refused) is
    free again and claimed in the next round."""
    now = sql.now()
    await _ensure_accounts(sorted({w.item.account_id for w in claimants}), now)
    fresh: list[_Work] = []
    waiting = claimants
    for _ in range(_CLAIM_ROUNDS):
        claimed = await _claim(waiting, now)
        fresh += [w for w in waiting if w.slot in claimed]
        waiting = await _replays([w for w in waiting if w.slot not in claimed], out)
        if not waiting:
            return fresh
    raise RuntimeError(f"{len(waiting)} idempotency keys did not settle")


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
        args += [w.item.account_id, w.item.idempotency_key, OPERATION, w.fingerprint, result, now]
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
                w.item.account_id, w.item.idempotency_key, w.request.params
            )
        except BillingError as exc:  # the key was used for something else
            out[w.index] = exc
            continue
        if replayed is None:
            withdrawn.append(w)
        else:
            out[w.index] = replayed
    return withdrawn


async def _apply(fresh: list[_Work], out: list[Outcome | None]) -> list[_Work]:
    """Decide every fresh item in order under the account locks, then write them all;
    the refused items."""
    if not fresh:
        return []
    locked = await batchwrite.lock_accounts([w.item.account_id for w in fresh])
    timezone = {a: account.timezone for a, account in locked.items()}
    quota, periods = await _quota_left(fresh, timezone)
    balance = {a: account.balance for a, account in locked.items()}
    refused: list[_Work] = []
    accepted: list[_Work] = []
    for w in fresh:
        if _decide(w, balance, quota):
            accepted.append(w)
        else:
            refused.append(w)
            out[w.index] = _short(w.debit)
    written = await batchwrite.write_debits(
        locked,
        [
            batchwrite.Debit(w.request.movement(free=w.free, entry_id=w.entry_id), w.balance_after)
            for w in accepted
            if w.debit
        ],
    )
    await _book_free_units(accepted, periods)
    entry_of = {e.id: e for e in written}
    for w in accepted:
        out[w.index] = ConsumeResult(entry_of.get(w.entry_id), w.balance_after, w.free)
    return refused


def _decide(w: _Work, balance: dict[str, int], quota: dict[QuotaKey, int]) -> bool:
    """Free units first, then the debit, if the balance covers it (then taken from it)."""
    acct = w.item.account_id
    key = (acct, w.item.process_type)
    w.free = min(w.item.quantity, quota.get(key, 0)) if w.request.free_allowance is not None else 0
    w.debit = (w.item.quantity - w.free) * w.request.credits_per_unit
    if w.debit > balance[acct]:
        return False
    if w.free:
        quota[key] -= w.free
    balance[acct] -= w.debit
    w.balance_after = balance[acct]
    return True


def _short(debit: int) -> BillingError:
    return BillingError(
        UserError(ErrorCode.INSUFFICIENT_CREDITS, f"The balance does not cover {debit} credits.")
    )


QuotaKey = tuple[str, ProcessType]


async def _quota_left(
    fresh: list[_Work], timezone: dict[str, str]
) -> tuple[dict[QuotaKey, int], dict[QuotaKey, Any]]:
    """Free units left this month per (account, process), locked; and each period start."""
    left: dict[QuotaKey, int] = {}
    periods: dict[QuotaKey, Any] = {}
    wanted = {
        (w.item.account_id, w.item.process_type): w.request.free_allowance
        for w in fresh
        if w.request.free_allowance is not None
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


async def _book_free_units(accepted: list[_Work], periods: dict[QuotaKey, Any]) -> None:
    """The free units taken: each item's key remembers them, each quota counts them."""
    used: dict[QuotaKey, int] = defaultdict(int)
    for w in accepted:
        if not w.free:
            continue
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


async def _forget(refused: list[_Work]) -> None:
    """Refused items are not remembered under their keys (as for a single spend)."""
    for w in refused:
        await sql.execute(
            "DELETE FROM idempotency_record WHERE account_id = ? AND key = ?",
            w.item.account_id,
            w.item.idempotency_key,
        )
