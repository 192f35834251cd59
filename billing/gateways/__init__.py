"""The payment gateway interface. ``sandbox`` for development, ``stripe`` in production.

Everything above this package talks to a ``PaymentGateway`` and never to a vendor SDK.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


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
    SUCCEEDED = "succeeded"
    REQUIRES_ACTION = "requires_action"
    FAILED = "failed"
    PROCESSING = "processing"


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
    status: ChargeStatus
    gateway_payment_id: str | None
    client_secret: str | None = None
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None


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


class GatewayUnavailable(Exception):
    """The gateway could not be reached or answered with a server error; safe to retry."""


class PaymentGateway(Protocol):
    name: str

    async def ensure_customer(self, account_id: str, existing_customer_id: str | None) -> str: ...

    async def attach_card(self, customer_id: str, payment_method_id: str) -> CardDetails: ...

    async def update_card(
        self,
        payment_method_id: str,
        *,
        exp_month: int | None,
        exp_year: int | None,
        cardholder_name: str | None,
        address: Address | None,
    ) -> None: ...

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None: ...

    async def detach_card(self, payment_method_id: str) -> None: ...

    async def charge(self, request: ChargeRequest) -> ChargeResult: ...

    async def retrieve_charge(self, gateway_payment_id: str) -> ChargeResult: ...

    async def start_card_setup(self, customer_id: str) -> str:
        """A SetupIntent's client secret, for saving a card in the browser (Stripe.js
        ``confirmCardSetup``) for later off-session charges."""
        ...
