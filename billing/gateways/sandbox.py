"""A sandbox gateway that behaves like Stripe's test mode for Stripe's test PaymentMethod ids.

It keeps no state that matters: the behaviour of a card is carried in the PaymentMethod id it
hands out (``pm_sbx_<kind>_<random>``), so a restart changes nothing. Charges are remembered by
idempotency key for the life of the process, as Stripe remembers them.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from billing.gateways import (
    Address,
    CardDetails,
    CardRejected,
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
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


class SandboxGateway:
    """In-process stand-in for Stripe's test mode, for development and tests."""

    name = "sandbox"

    def __init__(self) -> None:
        self._charges: dict[str, ChargeResult] = {}
        self._by_id: dict[str, ChargeResult] = {}
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

    async def update_card(
        self,
        payment_method_id: str,
        *,
        exp_month: int | None,
        exp_year: int | None,
        cardholder_name: str | None,
        address: Address | None,
    ) -> None:
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
        previous = self._charges.get(request.idempotency_key)
        if previous is not None:
            return previous
        self.charge_count += 1
        kind = _kind_of(request.payment_method_id)
        card = TEST_CARDS[kind] if kind else None
        intent_id = f"pi_sbx_{secrets.token_hex(10)}"
        if card is None:
            result = ChargeResult(
                ChargeStatus.FAILED,
                intent_id,
                failure_code="resource_missing",
                failure_message="No such PaymentMethod.",
            )
        elif card.charge_decline:
            result = ChargeResult(
                ChargeStatus.FAILED,
                intent_id,
                failure_code="card_declined",
                decline_code=card.charge_decline,
                failure_message=DECLINE_MESSAGES[card.charge_decline],
            )
        elif card.needs_3ds and request.off_session:
            result = ChargeResult(
                ChargeStatus.FAILED,
                intent_id,
                failure_code="authentication_required",
                decline_code="authentication_required",
                failure_message=DECLINE_MESSAGES["authentication_required"],
            )
        elif card.needs_3ds:
            result = ChargeResult(
                ChargeStatus.REQUIRES_ACTION,
                intent_id,
                client_secret=f"{intent_id}_secret_{secrets.token_hex(8)}",
            )
        else:
            result = ChargeResult(ChargeStatus.SUCCEEDED, intent_id)
        self._charges[request.idempotency_key] = result
        self._by_id[intent_id] = result
        return result

    async def retrieve_charge(self, gateway_payment_id: str) -> ChargeResult:
        result = self._by_id.get(gateway_payment_id)
        if result is None:
            return ChargeResult(
                ChargeStatus.FAILED,
                gateway_payment_id,
                failure_code="resource_missing",
                failure_message="No such PaymentIntent.",
            )
        return result

    def complete_authentication(self, gateway_payment_id: str) -> None:
        """Play the customer finishing 3-D Secure in the browser (Stripe.js in production)."""
        result = self._by_id[gateway_payment_id]
        if result.status is ChargeStatus.REQUIRES_ACTION:
            done = ChargeResult(ChargeStatus.SUCCEEDED, gateway_payment_id)
            self._by_id[gateway_payment_id] = done
            for key, value in list(self._charges.items()):
                if value.gateway_payment_id == gateway_payment_id:
                    self._charges[key] = done

    def authenticate(self, client_secret: str, *, approve: bool) -> bool:
        """The sandbox's 3-D Secure challenge, answered in the billing page: approve or fail
        the payment whose client secret this is. False if no such payment awaits it."""
        intent_id = client_secret.split("_secret_", 1)[0]
        result = self._by_id.get(intent_id)
        if result is None or result.client_secret != client_secret:
            return False
        if result.status is not ChargeStatus.REQUIRES_ACTION:
            return False
        if approve:
            self.complete_authentication(intent_id)
            return True
        failed = ChargeResult(
            ChargeStatus.FAILED,
            intent_id,
            failure_code="authentication_failed",
            decline_code="authentication_failed",
            failure_message="The cardholder did not complete 3-D Secure authentication.",
        )
        self._by_id[intent_id] = failed
        for key, value in list(self._charges.items()):
            if value.gateway_payment_id == intent_id:
                self._charges[key] = failed
        return True
