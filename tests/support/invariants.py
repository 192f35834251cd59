"""Checks of DESIGN.md section 2, read straight from the database."""

from __future__ import annotations

from billing.models import Account, LedgerEntry


async def assert_ledger_consistent(account_id: str) -> int:
    """Stored balance == sum of entries, every balance_after chains, nothing below zero.

    Returns the balance.
    """
    account = await Account.get(id=account_id)
    entries = await LedgerEntry.filter(account_id=account_id).order_by("created_at", "id")
    running = 0
    for entry in entries:
        running += entry.credits
        assert entry.credits != 0
        assert entry.balance_after == running, (entry.id, entry.balance_after, running)
        assert running >= 0
    assert account.balance == running, (account.balance, running)
    return running
