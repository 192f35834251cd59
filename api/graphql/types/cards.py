"""Cards on file and their billing address (the domain's one ``Address``, mapped)."""

from __future__ import annotations

import uuid
from datetime import datetime

import strawberry

from api import ids
from billing.models import Card as CardModel
from billing.payments.cards import address_of
from billing.payments.gateways import Address


@strawberry.type
class BillingAddress:
    line1: str | None
    line2: str | None
    city: str | None
    state: str | None
    postal_code: str | None
    country: str | None

    @classmethod
    def of(cls, a: Address) -> BillingAddress:
        return cls(
            line1=a.line1,
            line2=a.line2,
            city=a.city,
            state=a.state,
            postal_code=a.postal_code,
            country=a.country,
        )


@strawberry.input
class BillingAddressInput:
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None

    def to_address(self) -> Address:
        return Address(
            line1=self.line1,
            line2=self.line2,
            city=self.city,
            state=self.state,
            postal_code=self.postal_code,
            country=self.country,
        )


@strawberry.type
class Card:
    model: strawberry.Private[CardModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("Card", self.model.id))

    @strawberry.field
    def brand(self) -> str:
        return self.model.brand

    @strawberry.field
    def last4(self) -> str:
        return self.model.last4

    @strawberry.field
    def exp_month(self) -> int:
        return int(self.model.exp_month)

    @strawberry.field
    def exp_year(self) -> int:
        return int(self.model.exp_year)

    @strawberry.field
    def cardholder_name(self) -> str | None:
        return self.model.cardholder_name

    @strawberry.field
    def billing_address(self) -> BillingAddress | None:
        address = address_of(self.model)
        return BillingAddress.of(address) if address is not None else None

    @strawberry.field
    def is_primary(self) -> bool:
        return self.model.is_primary

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at

    @strawberry.field(description="Set when the card was removed (shown on old payments).")
    def removed_at(self) -> datetime | None:
        return self.model.removed_at


def card_or_none(model: CardModel | None) -> Card | None:
    return Card(model=model) if model is not None else None


def card_id(raw: strawberry.ID | None) -> uuid.UUID | None:
    """A ``Card`` global id's uuid (None when absent or not a card id: not found)."""
    return ids.decode("Card", str(raw)) if raw else None
