"""The payment gateway interface. ``sandbox`` for development, ``stripe`` in production.

Everything above this package talks to a ``PaymentGateway`` and never to a vendor SDK.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


def gateway_key(payment_id: uuid.UUID | str) -> str:
    """The gateway's idempotency key for a payment row: a retry can never charge twice."""
    return f"credits-payment-{payment_id}"


@dataclass(frozen=True, slots=True)
class Address:
    line1: str | None = None
    line2: str | None = None
    city: str | None = None
    state: str | None = None
    postal_code: str | None = None
    country: str | None = None


@dataclass(frozen=True, slots=True)
class CardDetails:
    """What the gateway tells us about an attached card: never the number."""

    payment_method_id: str
    brand: str
    last4: str
    exp_month: int
    exp_year: int
    cardholder_name: str | None = None
    address: Address = field(default_factory=Address)


class ChargeStatus(StrEnum):
    """Our view of a gateway payment (Stripe's PaymentIntent).

    Only ``SUCCEEDED`` is final here. ``FAILED`` covers Stripe's ``requires_payment_method``
    (the customer may still retry the same PaymentIntent and succeed) as well as
    ``canceled`` (which never succeeds); ``REQUIRES_ACTION`` and ``PROCESSING`` are waits.
    So a payment we booked as FAILED that the gateway later reports as succeeded is booked
    as succeeded, once (``billing.settlement.booking``)."""

    SUCCEEDED = "succeeded"
    REQUIRES_ACTION = "requires_action"
    FAILED = "failed"
    PROCESSING = "processing"


#: Stripe's minimum charge amounts, in the currency's smallest unit
#: (https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts). A charge under
#: the minimum is refused by Stripe (``amount_too_small``), so it is never sent.
MINIMUM_CHARGE_CENTS: dict[str, int] = {
    "usd": 50,
    "aed": 200,
    "aud": 50,
    "bgn": 100,
    "brl": 50,
    "cad": 50,
    "chf": 50,
    "czk": 1500,
    "dkk": 250,
    "eur": 50,
    "gbp": 30,
    "hkd": 400,
    "huf": 17500,
    "inr": 50,
    "jpy": 50,
    "mxn": 1000,
    "myr": 200,
    "nok": 300,
    "nzd": 50,
    "pln": 200,
    "ron": 200,
    "sek": 300,
    "sgd": 50,
}
DEFAULT_MINIMUM_CHARGE_CENTS = 50


def minimum_charge_cents(currency: str) -> int:
    """The smallest amount (cents, or the currency's smallest unit) a gateway will charge."""
    return MINIMUM_CHARGE_CENTS.get(currency.lower(), DEFAULT_MINIMUM_CHARGE_CENTS)


@dataclass(frozen=True, slots=True)
class ChargeRequest:
    customer_id: str
    payment_method_id: str
    amount_cents: int
    currency: str
    idempotency_key: str
    off_session: bool
    description: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ChargeResult:
    """A gateway payment as the gateway has it now (an API answer or a webhook's object).

    ``amount_cents``, ``currency`` and ``customer_id`` are what the gateway says it charged
    (``None``: not told); settlement checks them against what we asked for."""

    status: ChargeStatus
    gateway_payment_id: str | None
    client_secret: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None
    amount_cents: int | None = None
    currency: str | None = None
    customer_id: str | None = None


class CardRejected(Exception):
    """The gateway refused a card when it was added or updated (an expected failure)."""

    def __init__(
        self,
        message: str,
        *,
        code: str = "card_declined",
        decline_code: str | None = None,
        unknown: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.decline_code = decline_code
        self.unknown = unknown


class AmountBelowMinimum(ValueError):
    """A charge under the gateway's minimum for its currency: never sent (a bug upstream)."""


def check_minimum(request: ChargeRequest) -> None:
    """Raise ``AmountBelowMinimum`` for a charge the gateway would refuse as too small."""
    minimum = minimum_charge_cents(request.currency)
    if request.amount_cents < minimum:
        raise AmountBelowMinimum(
            f"{request.amount_cents} is under the minimum charge of {minimum} "
            f"{request.currency.upper()} cents"
        )


class GatewayUnavailable(Exception):
    """The gateway could not be reached or answered with a server error; safe to retry."""


@dataclass(frozen=True, slots=True)
class CardChanges:
    """What ``update_card`` changes on a saved card; None leaves a field as it is."""

    exp_month: int | None = None
    exp_year: int | None = None
    cardholder_name: str | None = None
    address: Address | None = None


class PaymentGateway(Protocol):
    name: str

    async def ensure_customer(self, account_id: str, existing_customer_id: str | None) -> str: ...

    async def attach_card(self, customer_id: str, payment_method_id: str) -> CardDetails: ...

    async def update_card(self, payment_method_id: str, changes: CardChanges) -> None: ...

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None: ...

    async def detach_card(self, payment_method_id: str) -> None: ...

    async def charge(self, request: ChargeRequest) -> ChargeResult: ...

    async def retrieve_charge(self, gateway_payment_id: str) -> ChargeResult: ...

    async def start_card_setup(self, customer_id: str) -> str:
        """A SetupIntent's client secret, for saving a card in the browser (Stripe.js
        ``confirmCardSetup``) for later off-session charges."""
        ...
