"""Breaks found in review of the redesign, each shown by a test.

``cards.update`` calls the gateway with no transaction open (the transaction rule), then
saves the card it read before that call. A ``setPrimaryCard`` or ``removeCard`` that
commits while the gateway call runs must not be undone by that save: an account never
ends with two primaries, nor with a removed card back in use.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

import pytest

from billing.errors import BillingError
from billing.ledger import posting
from billing.models import Card, Payment
from billing.payments import cards, purchases
from billing.payments.gateways import CardChanges, PaymentGateway
from billing.pricing import load_price_book
from tests.billing.conftest import new_account
from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("domain")


class DuringUpdate:
    """The gateway, with ``during`` run inside its ``update_card`` call (another request
    committing while the gateway answers)."""

    def __init__(self, inner: PaymentGateway, during: Callable[[], Awaitable[object]]) -> None:
        self.inner = inner
        self.during = during

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def update_card(self, payment_method_id: str, changes: CardChanges) -> None:
        await self.during()
        await self.inner.update_card(payment_method_id, changes)


async def two_cards(gateway: PaymentGateway) -> tuple[str, Card, Card]:
    account_id = await new_account()
    first = await cards.add_card(
        gateway, account_id=account_id, payment_method_id="pm_card_visa", make_primary=True
    )
    second = await cards.add_card(
        gateway, account_id=account_id, payment_method_id="pm_card_mastercard", make_primary=False
    )
    assert first.is_primary and not second.is_primary
    return account_id, first, second


async def test_update_during_set_primary_leaves_one_primary(gateway: PaymentGateway) -> None:
    account_id, first, second = await two_cards(gateway)

    async def make_second_primary() -> object:
        return await cards.set_primary(gateway, card_id=second.id, scope_account_id=account_id)

    await cards.update(
        cast(PaymentGateway, DuringUpdate(gateway, make_second_primary)),
        card_id=first.id,
        scope_account_id=account_id,
        exp_month=None,
        exp_year=None,
        cardholder_name="Ada Admin",
        address=None,
    )

    primaries = await Card.filter(account_id=account_id, removed_at=None, is_primary=True)
    assert [c.id for c in primaries] == [second.id]
    updated = await Card.get(id=first.id)
    assert updated.cardholder_name == "Ada Admin"


async def test_update_during_remove_keeps_the_card_removed(gateway: PaymentGateway) -> None:
    account_id, first, second = await two_cards(gateway)

    async def remove_first() -> object:
        return await cards.remove_card(
            gateway, card_id=first.id, scope_account_id=account_id, is_staff=False
        )

    with pytest.raises(BillingError) as refused:
        await cards.update(
            cast(PaymentGateway, DuringUpdate(gateway, remove_first)),
            card_id=first.id,
            scope_account_id=account_id,
            exp_month=None,
            exp_year=None,
            cardholder_name="Ada Admin",
            address=None,
        )
    assert [e.code.value for e in refused.value.errors] == ["NOT_FOUND"]

    removed = await Card.get(id=first.id)
    assert removed.removed_at is not None and not removed.is_primary
    active = await Card.filter(account_id=account_id, removed_at=None)
    assert [(c.id, c.is_primary) for c in active] == [(second.id, True)]


async def test_remove_after_set_primary_leaves_one_primary(
    gateway: PaymentGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``remove`` reads the card, then takes the account lock: a set-primary committed in
    between (shown here inside the same transaction, as PostgreSQL's read committed lets
    another's commit be seen after the lock) must count, not the card as first read."""
    account_id, oldest, middle = await two_cards(gateway)
    newest = await cards.add_card(
        gateway, account_id=account_id, payment_method_id="pm_card_amex", make_primary=False
    )
    real_lock = posting.lock_account
    interleaved: list[bool] = []

    async def lock_after_set_primary(locked_account_id: str) -> None:
        if not interleaved:
            interleaved.append(True)
            await cards.set_primary(gateway, card_id=middle.id, scope_account_id=account_id)
        await real_lock(locked_account_id)

    monkeypatch.setattr(posting, "lock_account", lock_after_set_primary)
    await cards.remove_card(gateway, card_id=oldest.id, scope_account_id=account_id, is_staff=False)

    assert interleaved
    primaries = await Card.filter(account_id=account_id, removed_at=None, is_primary=True)
    assert [c.id for c in primaries] == [middle.id]
    assert newest.id not in [c.id for c in primaries]


async def test_purchase_never_charges_a_card_removed_before_the_lock(
    gateway: PaymentGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``purchase_credits`` chose its card, then took the account lock: a removal committed
    in between (shown inside the same transaction, as above) must stop the purchase, not
    charge the removed card."""
    account_id, removed, kept = await two_cards(gateway)
    real_lock = posting.lock_account
    interleaved: list[bool] = []

    async def lock_after_removal(locked_account_id: str) -> None:
        if not interleaved:
            interleaved.append(True)
            await cards.remove_card(
                gateway, card_id=removed.id, scope_account_id=account_id, is_staff=False
            )
        await real_lock(locked_account_id)

    monkeypatch.setattr(posting, "lock_account", lock_after_removal)
    book = load_price_book(ROOT / "billing" / "pricebook.toml")
    with pytest.raises(BillingError) as refused:
        await purchases.purchase_credits(
            gateway,
            book,
            account_id=account_id,
            user_id="admin-1",
            credits=book.min_purchase_credits,
            card_id=removed.id,
            card_id_given=True,
            idempotency_key=f"buy-{uuid.uuid4()}",
        )

    assert interleaved
    assert [e.code.value for e in refused.value.errors] == ["NOT_FOUND"]
    assert not await Payment.exists(card_id=removed.id)
    assert kept.id in [c.id for c in await Card.filter(account_id=account_id, removed_at=None)]
