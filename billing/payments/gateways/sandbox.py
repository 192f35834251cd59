"""A sandbox gateway that behaves like Stripe's test mode for Stripe's test PaymentMethod ids.

It keeps no state that matters: the behaviour of a card is carried in the PaymentMethod id it
hands out (``pm_sbx_<kind>_<random>``), so a restart changes nothing. Charges are remembered by
idempotency key for the life of the process, as Stripe remembers them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from billing.payments.gateways import (
    CardChanges,
    CardDetails,
    CardRejected,
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    check_minimum,
)


@dataclass(frozen=True, slots=True)
class _TestCard:
    brand: str
    last4: str
    attach_decline: str | None = None  # decline code when the card is added
    charge_decline: str | None = None  # decline code on every charge
    needs_3ds: bool = False


# Stripe's documented test PaymentMethod ids and how Stripe's test mode treats them.
TEST_CARDS: dict[str, _TestCard] = {
    "visa": _TestCard("visa", "4242"),
    "visa_debit": _TestCard("visa", "5556"),
    "mastercard": _TestCard("mastercard", "4444"),
    "amex": _TestCard("amex", "8431"),
    "discover": _TestCard("discover", "1117"),
    "chargeDeclined": _TestCard("visa", "0002", attach_decline="generic_decline"),
    "chargeDeclinedInsufficientFunds": _TestCard(
        "visa", "9995", attach_decline="insufficient_funds"
    ),
    "chargeCustomerFail": _TestCard("visa", "0341", charge_decline="generic_decline"),
    "authenticationRequired": _TestCard("visa", "3155", needs_3ds=True),
}

DECLINE_MESSAGES = {
    "generic_decline": "Your card was declined.",
    "insufficient_funds": "Your card has insufficient funds.",
    "authentication_required": "Your card requires authentication for this payment.",
}

TEST_EXP_MONTH = 12
TEST_EXP_YEAR = 2034


def _kind_of(payment_method_id: str) -> str | None:
    if payment_method_id.startswith("pm_card_"):
        kind = payment_method_id.removeprefix("pm_card_")
    elif payment_method_id.startswith("pm_sbx_"):
        kind = payment_method_id.removeprefix("pm_sbx_").rsplit("_", 1)[0]
    else:
        return None
    return kind if kind in TEST_CARDS else None


@dataclass(slots=True)
class _Intent:
    """A sandbox PaymentIntent, following Stripe's states: ``requires_action`` (3-D
    Secure) -> ``succeeded``, or -> ``requires_payment_method`` when authentication fails,
    from which the customer may retry the same intent."""

    id: str
    request: ChargeRequest
    card: _TestCard | None
    status: str
    client_secret: str
    failure_code: str | None = None
    decline_code: str | None = None
    failure_message: str | None = None

    def result(self) -> ChargeResult:
        seen = {
            "amount_cents": self.request.amount_cents,
            "currency": self.request.currency.lower(),
            "customer_id": self.request.customer_id or None,
        }
        if self.status == "succeeded":
            return ChargeResult(ChargeStatus.SUCCEEDED, self.id, **seen)  # type: ignore[arg-type]
        if self.status == "requires_action":
            return ChargeResult(
                ChargeStatus.REQUIRES_ACTION,
                self.id,
                client_secret=self.client_secret,
                **seen,  # type: ignore[arg-type]
            )
        return ChargeResult(
            ChargeStatus.FAILED,
            self.id,
            failure_code=self.failure_code,
            decline_code=self.decline_code,
            failure_message=self.failure_message,
            **seen,  # type: ignore[arg-type]
        )


class SandboxGateway:
    """In-process stand-in for Stripe's test mode, for development and tests."""

    name = "sandbox"

    def __init__(self) -> None:
        self._by_key: dict[str, _Intent] = {}
        self._by_id: dict[str, _Intent] = {}
        self.charge_count = 0

    async def ensure_customer(self, account_id: str, existing_customer_id: str | None) -> str:
        return existing_customer_id or f"cus_sbx_{secrets.token_hex(8)}"

    async def attach_card(self, customer_id: str, payment_method_id: str) -> CardDetails:
        kind = _kind_of(payment_method_id)
        if kind is None:
            raise CardRejected(
                f"No such PaymentMethod: '{payment_method_id}'. The sandbox gateway knows "
                f"Stripe's test ids: {', '.join('pm_card_' + k for k in TEST_CARDS)}.",
                code="resource_missing",
                unknown=True,
            )
        card = TEST_CARDS[kind]
        if card.attach_decline:
            raise CardRejected(
                DECLINE_MESSAGES[card.attach_decline], decline_code=card.attach_decline
            )
        pm_id = (
            payment_method_id
            if payment_method_id.startswith("pm_sbx_")
            else f"pm_sbx_{kind}_{secrets.token_hex(6)}"
        )
        return CardDetails(pm_id, card.brand, card.last4, TEST_EXP_MONTH, TEST_EXP_YEAR)

    async def update_card(self, payment_method_id: str, changes: CardChanges) -> None:
        if _kind_of(payment_method_id) is None:
            raise CardRejected(f"No such PaymentMethod: '{payment_method_id}'", unknown=True)

    async def start_card_setup(self, customer_id: str) -> str:
        """A SetupIntent-shaped secret; the sandbox's page picks a test card instead."""
        intent = f"seti_sbx_{secrets.token_hex(10)}"
        return f"{intent}_secret_{secrets.token_hex(8)}"

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None:
        return None

    async def detach_card(self, payment_method_id: str) -> None:
        return None

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        check_minimum(request)
        previous = self._by_key.get(request.idempotency_key)
        if previous is not None:
            return previous.result()
        self.charge_count += 1
        kind = _kind_of(request.payment_method_id)
        card = TEST_CARDS[kind] if kind else None
        intent_id = f"pi_sbx_{secrets.token_hex(10)}"
        intent = _Intent(
            intent_id,
            request,
            card,
            status="requires_payment_method",
            client_secret=f"{intent_id}_secret_{secrets.token_hex(8)}",
        )
        self._confirm(intent)
        self._by_key[request.idempotency_key] = intent
        self._by_id[intent_id] = intent
        return intent.result()

    def _confirm(self, intent: _Intent) -> None:
        card, request = intent.card, intent.request
        intent.failure_code = intent.decline_code = intent.failure_message = None
        if card is None:
            intent.status = "requires_payment_method"
            intent.failure_code = "resource_missing"
            intent.failure_message = "No such PaymentMethod."
        elif card.charge_decline:
            intent.status = "requires_payment_method"
            intent.failure_code = "card_declined"
            intent.decline_code = card.charge_decline
            intent.failure_message = DECLINE_MESSAGES[card.charge_decline]
        elif card.needs_3ds and request.off_session:
            intent.status = "requires_payment_method"
            intent.failure_code = "authentication_required"
            intent.decline_code = "authentication_required"
            intent.failure_message = DECLINE_MESSAGES["authentication_required"]
        elif card.needs_3ds:
            intent.status = "requires_action"
        else:
            intent.status = "succeeded"

    async def retrieve_charge(self, gateway_payment_id: str) -> ChargeResult:
        intent = self._by_id.get(gateway_payment_id)
        if intent is None:
            return ChargeResult(
                ChargeStatus.FAILED,
                gateway_payment_id,
                failure_code="resource_missing",
                failure_message="No such PaymentIntent.",
            )
        return intent.result()

    def complete_authentication(self, gateway_payment_id: str, *, success: bool = True) -> bool:
        """Play the customer answering the 3-D Secure challenge (Stripe.js in production).

        A failed challenge leaves the intent in ``requires_payment_method``, as at Stripe:
        not final, the customer may ``retry`` it. Returns False if no challenge was open."""
        intent = self._by_id.get(gateway_payment_id)
        if intent is None or intent.status != "requires_action":
            return False
        if success:
            intent.status = "succeeded"
        else:
            intent.status = "requires_payment_method"
            intent.failure_code = "payment_intent_authentication_failure"
            intent.failure_message = "The provided PaymentMethod has failed authentication."
        return True

    def retry(self, gateway_payment_id: str) -> bool:
        """Play the customer confirming a failed intent again (same PaymentIntent)."""
        intent = self._by_id.get(gateway_payment_id)
        if intent is None or intent.status != "requires_payment_method":
            return False
        self._confirm(intent)
        return True

    def authenticate(self, client_secret: str, *, approve: bool) -> bool:
        """The sandbox's 3-D Secure challenge, answered in the billing page: approve or fail
        the payment whose client secret this is. False if no such payment awaits it."""
        intent_id = client_secret.split("_secret_", 1)[0]
        intent = self._by_id.get(intent_id)
        if intent is None or intent.client_secret != client_secret:
            return False
        return self.complete_authentication(intent_id, success=approve)
        return True
