"""Card payments (purchases, recharges, invoices) and the monthly invoices."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import cast

import strawberry

from api import ids
from api.context import bad_input
from api.graphql.types import CtxInfo, InvoiceStatus, PageInfo, PaymentStatus, ProcessType
from api.graphql.types.cards import Card, card_or_none
from billing import enums, insights
from billing.errors import Validator
from billing.models import Invoice as InvoiceModel
from billing.models import Payment as PaymentModel


@strawberry.type
class Payment:
    model: strawberry.Private[PaymentModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("Payment", self.model.id))

    @strawberry.field
    def status(self) -> PaymentStatus:
        return self.model.status

    @strawberry.field
    def credits(self) -> int:
        return int(self.model.credits)

    @strawberry.field
    def amount_cents(self) -> int:
        return int(self.model.amount_cents)

    @strawberry.field
    def currency(self) -> str:
        return self.model.currency

    @strawberry.field
    def client_secret(self) -> str | None:
        if self.model.status is enums.PaymentStatus.REQUIRES_ACTION:
            return self.model.client_secret
        return None

    @strawberry.field
    def failure_message(self) -> str | None:
        return self.model.failure_message

    @strawberry.field
    async def card(self, info: CtxInfo) -> Card | None:
        if self.model.card_id is None:
            return None
        return card_or_none(await info.context.cards.load(cast(uuid.UUID, self.model.card_id)))

    @strawberry.field
    def created_at(self) -> datetime:
        return self.model.created_at


def payment_or_none(model: PaymentModel | None) -> Payment | None:
    return Payment(model=model) if model is not None else None


@strawberry.type
class PaymentEdge:
    cursor: str
    node: Payment


@strawberry.type
class PaymentConnection:
    edges: list[PaymentEdge]
    page_info: PageInfo


async def payments_page(
    account_id: str,
    statuses: list[enums.PaymentStatus] | None,
    first: int | None,
    after: str | None,
) -> PaymentConnection:
    count = 25 if first is None else first
    wanted = list(statuses or [])
    v = Validator()
    insights.validate_payments(v, count, wanted)
    if v.errors:
        raise bad_input("; ".join(e.message for e in v.errors))
    position = None
    if after is not None:
        position = ids.decode_cursor(after)
        if position is None:
            raise bad_input("after is not a cursor this API issued")
    result = await insights.payments_page(account_id, wanted, count, position)
    edges = [
        PaymentEdge(cursor=ids.encode_cursor(p.created_at, p.id), node=Payment(model=p))
        for p in result.payments
    ]
    return PaymentConnection(
        edges=edges,
        page_info=PageInfo(
            has_next_page=result.has_next,
            has_previous_page=after is not None,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=edges[-1].cursor if edges else None,
        ),
    )


@strawberry.type(description="One process type's metered usage on an invoice.")
class InvoiceLine:
    process_type: ProcessType
    quantity: int
    amount_cents: int


@strawberry.type(description="A month of metered usage, charged to the card on file.")
class Invoice:
    model: strawberry.Private[InvoiceModel]

    @strawberry.field
    def id(self) -> strawberry.ID:
        return strawberry.ID(ids.encode("Invoice", self.model.id))

    @strawberry.field(description="Start of the month (the account's time zone), inclusive.")
    def period_start(self) -> datetime:
        return self.model.period_start

    @strawberry.field(description="End of the month (the account's time zone), exclusive.")
    def period_end(self) -> datetime:
        return self.model.period_end

    @strawberry.field
    def status(self) -> InvoiceStatus:
        return self.model.status

    @strawberry.field(description="What is charged: this month's usage plus any amount carried in.")
    def amount_cents(self) -> int:
        return int(self.model.amount_cents)

    @strawberry.field(
        description="Cents of earlier months carried into this invoice, each under the "
        "payment gateway's minimum charge (those invoices are CARRIED_FORWARD)."
    )
    def carried_in_cents(self) -> int:
        return int(self.model.carried_in_cents)

    @strawberry.field
    def currency(self) -> str:
        return self.model.currency

    @strawberry.field(description="Charge attempts made so far.")
    def attempts(self) -> int:
        return self.model.attempts

    @strawberry.field
    def paid_at(self) -> datetime | None:
        return self.model.paid_at

    @strawberry.field(description="Why the last charge attempt failed.")
    def failure_message(self) -> str | None:
        return self.model.failure_message

    @strawberry.field
    def lines(self) -> list[InvoiceLine]:
        return [
            InvoiceLine(
                process_type=line.process_type,
                quantity=line.quantity,
                amount_cents=line.amount_cents,
            )
            for line in sorted(self.model.lines, key=lambda line: line.process_type.value)
        ]
