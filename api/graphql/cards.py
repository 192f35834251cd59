"""Card mutations: add (after the browser's SetupIntent), update, make primary, remove.
Every card flow calls the gateway, so each owns its transactions (``run.Tx.OWN``)."""

from __future__ import annotations

import strawberry

from api import ids
from api.graphql.run import Tx, run
from api.graphql.types import CtxInfo, UserError
from api.graphql.types.cards import BillingAddressInput, Card, card_id, card_or_none
from billing.models import Card as CardModel
from billing.payments import cards


@strawberry.input
class AddCardInput:
    payment_method_id: str
    make_primary: bool | None = False


@strawberry.input
class UpdateCardInput:
    card_id: strawberry.ID
    exp_month: int | None = None
    exp_year: int | None = None
    cardholder_name: str | None = None
    billing_address: BillingAddressInput | None = None


@strawberry.input
class CardIdInput:
    card_id: strawberry.ID


@strawberry.type
class CardPayload:
    card: Card | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)

    @classmethod
    def of(cls, result: CardModel | list[UserError]) -> CardPayload:
        if isinstance(result, list):
            return cls(errors=result)
        return cls(card=Card(model=result))


@strawberry.type
class CardSetupPayload:
    client_secret: str | None = strawberry.field(
        default=None, description="Pass to Stripe.js confirmCardSetup with the card Element."
    )
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.type
class RemoveCardPayload:
    removed_card_id: strawberry.ID | None = None
    primary_card: Card | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.mutation
async def add_card(info: CtxInfo, input: AddCardInput) -> CardPayload:
    result = await run(
        info,
        lambda who: cards.add_card(
            who.ctx.gateway,
            account_id=who.account_id,
            payment_method_id=input.payment_method_id,
            make_primary=bool(input.make_primary),
        ),
        tx=Tx.OWN,
    )
    return CardPayload.of(result)


@strawberry.mutation(
    description="Start saving a card in the browser (Stripe's SetupIntent): pass the "
    "clientSecret to Stripe.js confirmCardSetup with the card Element, then addCard with "
    "the PaymentMethod id it returns. The bank can ask for 3-D Secure while the "
    "cardholder is there, so later off-session charges (auto-recharge, invoices) succeed."
)
async def start_card_setup(info: CtxInfo) -> CardSetupPayload:
    result = await run(
        info, lambda who: cards.start_setup(who.ctx.gateway, who.account_id), tx=Tx.OWN
    )
    if isinstance(result, list):
        return CardSetupPayload(errors=result)
    return CardSetupPayload(client_secret=result)


@strawberry.mutation
async def update_card(info: CtxInfo, input: UpdateCardInput) -> CardPayload:
    address = input.billing_address
    result = await run(
        info,
        lambda who: cards.update(
            who.ctx.gateway,
            card_id=card_id(input.card_id),
            scope_account_id=who.scope_account_id,
            exp_month=input.exp_month,
            exp_year=input.exp_year,
            cardholder_name=input.cardholder_name,
            address=address.to_address() if address is not None else None,
        ),
        tx=Tx.OWN,
    )
    return CardPayload.of(result)


@strawberry.mutation
async def set_primary_card(info: CtxInfo, input: CardIdInput) -> CardPayload:
    result = await run(
        info,
        lambda who: cards.set_primary(
            who.ctx.gateway, card_id=card_id(input.card_id), scope_account_id=who.scope_account_id
        ),
        tx=Tx.OWN,
    )
    return CardPayload.of(result)


@strawberry.mutation
async def remove_card(info: CtxInfo, input: CardIdInput) -> RemoveCardPayload:
    result = await run(
        info,
        lambda who: cards.remove_card(
            who.ctx.gateway,
            card_id=card_id(input.card_id),
            scope_account_id=who.scope_account_id,
            is_staff=who.is_staff,
        ),
        tx=Tx.OWN,
    )
    if isinstance(result, list):
        return RemoveCardPayload(errors=result)
    return RemoveCardPayload(
        removed_card_id=strawberry.ID(ids.encode("Card", result.card.id)),
        primary_card=card_or_none(result.primary),
    )
