"""The domain's rules, tested on its functions directly (on both databases, through the
fixtures of ``tests/conftest.py``)."""

from __future__ import annotations

import uuid

import pytest

from billing.accounts import ensure_account, record_member
from billing.models import Account
from billing.pricing import PriceBook, load_price_book
from tests.conftest import ROOT


@pytest.fixture
def domain(gateway_name: str, request: pytest.FixtureRequest) -> None:
    """The database, migrated and open (the app's). The domain's rules do not touch the
    gateway: one gateway is enough."""
    if gateway_name != "sandbox":
        pytest.skip("the ledger's rules do not touch the gateway: one gateway is enough")
    request.getfixturevalue("app")


@pytest.fixture(scope="session")
def book() -> PriceBook:
    return load_price_book(ROOT / "billing" / "pricebook.toml")


async def new_account(
    *, threshold: int | None = None, low_level: int | None = None, admin: bool = False
) -> str:
    """A fresh account (balance 0) with a recharge threshold and a low-balance level."""
    account_id = f"acct-{uuid.uuid4().hex[:12]}"
    await ensure_account(account_id)
    await Account.filter(id=account_id).update(
        recharge_threshold=threshold, low_balance_level=low_level
    )
    if admin:
        await record_member(account_id, "admin-1", "admin@example.com", "Ada Admin", is_admin=True)
    return account_id
