"""A batch's debits, written at once (``spending.batch``): the ledger's third writer.

The batch locks its accounts (``lock_accounts``: one SELECT, in id order, so concurrent
batches can't deadlock), decides every item in order against the balances it read, and
hands the debits it accepted to ``write_debits``: one UPDATE moves every balance (with the
same crossing rule as a single debit, ``entries.crossing_set``), one INSERT appends every
entry (built by ``entries.build``). Entries, threshold crossings and low-balance notices
are reported as ``posting`` reports them. Caller owns the transaction.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from billing import changes, sql
from billing.ledger import entries
from billing.ledger.entries import Movement
from billing.models import LedgerEntry
from billing.notifications import lowbalance


@dataclass(frozen=True, slots=True)
class Locked:
    """An account as the batch read it under its lock."""

    account_id: str
    balance: int
    timezone: str
    recharge_threshold: int | None
    recharge_seq: int
    low_balance_level: int | None


@dataclass(frozen=True, slots=True)
class Debit:
    movement: Movement  # credits < 0; entry_id set
    balance_after: int  # as the batch decided it, in order


async def lock_accounts(account_ids: list[str]) -> dict[str, Locked]:
    """Lock the accounts (in id order) and read what deciding a batch needs."""
    accounts = sorted(set(account_ids))
    lock = " ORDER BY id FOR NO KEY UPDATE" if sql.is_postgres(sql.connection()) else ""
    marks = ", ".join("?" * len(accounts))
    rows = await sql.fetch(
        "SELECT id, balance, timezone, recharge_threshold, recharge_seq, low_balance_level "
        f"FROM credit_account WHERE id IN ({marks}){lock}",
        *accounts,
    )
    return {
        str(r["id"]): Locked(
            account_id=str(r["id"]),
            balance=int(r["balance"]),
            timezone=str(r["timezone"]),
            recharge_threshold=_opt_int(r["recharge_threshold"]),
            recharge_seq=int(r["recharge_seq"]),
            low_balance_level=_opt_int(r["low_balance_level"]),
        )
        for r in rows
    }


async def write_debits(locked: dict[str, Locked], debits: list[Debit]) -> list[LedgerEntry]:
    """Write ``debits`` (decided in order under the locks ``locked`` holds): move the
    balances, append the entries, report them and the crossings. The entries, in order."""
    if not debits:
        return []
    await _move_balances(debits)
    written = _entries(debits)
    pg = sql.is_postgres(sql.connection())
    await sql.execute(
        f"{entries.INSERT} VALUES {entries.placeholders(len(written), len(entries.COLUMNS))}",
        *[value for entry in written for value in entries.row(entry, pg=pg)],
    )
    for entry in written:
        changes.entry_posted(entry)
    await _crossings(locked, written)
    return written


async def _move_balances(debits: list[Debit]) -> None:
    """One UPDATE for every account's total debit (and its crossing)."""
    total: dict[str, int] = defaultdict(int)
    for d in debits:
        total[d.movement.account_id] -= d.movement.credits
    rows = ", ".join(["(?, CAST(? AS BIGINT))"] * len(total))
    amount = "(SELECT v.amount FROM v WHERE v.id = credit_account.id)"
    await sql.execute(
        f"WITH v(id, amount) AS (VALUES {rows}) "
        f"UPDATE credit_account SET balance = balance - {amount}, "
        + entries.crossing_set(f"balance - {amount}")
        + " WHERE id IN (SELECT v.id FROM v)",
        *[x for a, d in sorted(total.items()) for x in (a, d)],
    )


def _entries(debits: list[Debit]) -> list[LedgerEntry]:
    """The entries; those of one account get strictly increasing times, in the order
    given, so the history (newest first over (created_at, id)) keeps the batch's order."""
    now: datetime = sql.now()
    nth: dict[str, int] = defaultdict(int)
    built = []
    for d in debits:
        account_id = d.movement.account_id
        assert d.movement.entry_id is not None
        built.append(
            entries.build(
                d.movement,
                d.movement.entry_id,
                balance_after=d.balance_after,
                created_at=now + timedelta(microseconds=nth[account_id]),
            )
        )
        nth[account_id] += 1
    return built


async def _crossings(locked: dict[str, Locked], written: list[LedgerEntry]) -> None:
    """Each account crossed its threshold, and its low-balance level, at most once: the
    batch only spends."""
    last: dict[str, int] = {}
    for entry in written:
        last[entry.account_id] = entry.balance_after
    for account_id, after in last.items():
        account = locked[account_id]
        # The UPDATE numbered the crossing: recharge_seq + 1.
        seq = entries.crossing_seq(
            account.balance, after, account.recharge_threshold, account.recharge_seq + 1
        )
        if seq is not None:
            changes.threshold_crossed(account_id, seq)
        level = account.low_balance_level
        if level is not None and lowbalance.turned_low(account.balance, after, level):
            crossing = next(
                e for e in written if e.account_id == account_id and e.balance_after < level
            )
            await lowbalance.notify(
                account_id, after, level, f"balance-low:{account_id}:{crossing.id}"
            )


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))
