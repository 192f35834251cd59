"""The production gateway: Stripe through the official ``stripe`` package (async calls).

One Stripe Customer per account; cards are PaymentMethods attached to it; charges are
PaymentIntents confirmed at once, keyed by our own payment row. Network errors and
Stripe's 5xx answers are retried with backoff by the client itself
(``max_network_retries``); what still fails is ``GatewayUnavailable``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, cast

import stripe

from billing.payments.gateways import (
    Address,
    CardChanges,
    CardDetails,
    CardRejected,
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    GatewayUnavailable,
    check_minimum,
)

log = logging.getLogger(__name__)

_TRANSIENT = (stripe.APIConnectionError, stripe.APIError, stripe.RateLimitError)


class GatewayMisconfigured(RuntimeError):
    """Stripe refused our API key: a start-up error, not one per request."""


def _address(raw: Any) -> Address:
    if not raw:
        return Address()
    return Address(
        line1=raw.get("line1"),
        line2=raw.get("line2"),
        city=raw.get("city"),
        state=raw.get("state"),
        postal_code=raw.get("postal_code"),
        country=raw.get("country"),
    )


def _card_details(pm: dict[str, Any]) -> CardDetails:
    card = pm["card"]
    billing = pm.get("billing_details") or {}
    return CardDetails(
        payment_method_id=pm["id"],
        brand=str(card["brand"]),
        last4=str(card["last4"]),
        exp_month=int(card["exp_month"]),
        exp_year=int(card["exp_year"]),
        cardholder_name=billing.get("name"),
        address=_address(billing.get("address")),
    )


def charge_result(intent: dict[str, Any]) -> ChargeResult:
    """Our view of a PaymentIntent (as a plain dict: an API answer or a webhook's object)."""
    status = intent["status"]
    seen: dict[str, Any] = {
        "amount_cents": _int_or_none(intent.get("amount")),
        "currency": str(intent["currency"]).lower() if intent.get("currency") else None,
        "customer_id": _id_of(intent.get("customer")),
    }
    if status == "succeeded":
        return ChargeResult(ChargeStatus.SUCCEEDED, intent["id"], **seen)
    if status in ("requires_action", "requires_source_action", "requires_confirmation"):
        return ChargeResult(
            ChargeStatus.REQUIRES_ACTION,
            intent["id"],
            client_secret=intent.get("client_secret"),
            **seen,
        )
    if status == "processing":
        return ChargeResult(ChargeStatus.PROCESSING, intent["id"], **seen)
    error = intent.get("last_payment_error") or {}
    return ChargeResult(
        ChargeStatus.FAILED,
        intent["id"],
        failure_code=error.get("code") or ("canceled" if status == "canceled" else "card_declined"),
        decline_code=error.get("decline_code"),
        failure_message=error.get("message") or "The card was declined.",
        **seen,
    )


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _id_of(value: Any) -> str | None:
    """A Stripe reference: an id string, or an expanded object with an ``id``."""
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


class StripeGateway:
    name = "stripe"

    def __init__(
        self, api_key: str, *, api_base: str | None = None, max_network_retries: int = 3
    ) -> None:
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            max_network_retries=max_network_retries,
        )

    async def verify(self) -> None:
        """Fail fast at start-up when the key is wrong."""
        try:
            await self.client.v1.customers.list_async(params={"limit": 1})
        except stripe.AuthenticationError as exc:
            raise GatewayMisconfigured(
                "Stripe refused STRIPE_API_KEY (authentication failed): check the key"
            ) from exc
        except _TRANSIENT as exc:
            log.warning("Stripe is unreachable at start-up (%s); continuing", exc)

    async def ensure_customer(self, account_id: str, existing_customer_id: str | None) -> str:
        if existing_customer_id:
            return existing_customer_id
        try:
            customer = await self.client.v1.customers.create_async(
                params={
                    "description": f"credits account {account_id}",
                    "metadata": {"account_id": account_id},
                },
                options={"idempotency_key": f"credits-customer-{account_id}"},
            )
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc
        return str(customer.id)

    async def start_card_setup(self, customer_id: str) -> str:
        try:
            params: stripe.params.SetupIntentCreateParams = {
                "customer": customer_id,
                "usage": "off_session",
            }
            intent = await self.client.v1.setup_intents.create_async(params=params)
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc
        assert intent.client_secret is not None
        return intent.client_secret

    async def attach_card(self, customer_id: str, payment_method_id: str) -> CardDetails:
        try:
            pm = await self.client.v1.payment_methods.attach_async(
                payment_method_id, params={"customer": customer_id}
            )
        except stripe.CardError as exc:
            error = exc.error
            raise CardRejected(
                exc.user_message or "Your card was declined.",
                code=str(exc.code or "card_declined"),
                decline_code=getattr(error, "decline_code", None) if error else None,
            ) from exc
        except stripe.InvalidRequestError as exc:
            raise CardRejected(
                f"Stripe does not know this PaymentMethod ({payment_method_id}).",
                code=str(exc.code or "resource_missing"),
                unknown=True,
            ) from exc
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc
        data = pm.to_dict()
        if data.get("type", "card") != "card" or not data.get("card"):
            raise CardRejected("Only cards can be added.", code="unsupported", unknown=True)
        return _card_details(data)

    async def update_card(self, payment_method_id: str, changes: CardChanges) -> None:
        params: dict[str, Any] = {}
        exp = (("exp_month", changes.exp_month), ("exp_year", changes.exp_year))
        card = {k: v for k, v in exp if v}
        if card:
            params["card"] = card
        billing: dict[str, Any] = {}
        if changes.cardholder_name is not None:
            billing["name"] = changes.cardholder_name
        if (address := changes.address) is not None:
            billing["address"] = {
                "line1": address.line1 or "",
                "line2": address.line2 or "",
                "city": address.city or "",
                "state": address.state or "",
                "postal_code": address.postal_code or "",
                "country": address.country or "",
            }
        if billing:
            params["billing_details"] = billing
        if not params:
            return
        try:
            await self.client.v1.payment_methods.update_async(
                payment_method_id, params=cast(Any, params)
            )
        except stripe.CardError as exc:
            raise CardRejected(exc.user_message or "The card update was refused.") from exc
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None:
        try:
            await self.client.v1.customers.update_async(
                customer_id,
                params={"invoice_settings": {"default_payment_method": payment_method_id}},
            )
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc

    async def detach_card(self, payment_method_id: str) -> None:
        try:
            await self.client.v1.payment_methods.detach_async(payment_method_id)
        except stripe.InvalidRequestError:
            log.info("payment method %s was already detached", payment_method_id)
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        check_minimum(request)
        params: dict[str, Any] = {
            "amount": request.amount_cents,
            "currency": request.currency,
            "customer": request.customer_id,
            "payment_method": request.payment_method_id,
            "confirm": True,
            "metadata": {**request.metadata, "description": request.description},
        }
        if request.off_session:
            params["off_session"] = True
        try:
            intent = await self.client.v1.payment_intents.create_async(
                params=cast(Any, params), options={"idempotency_key": request.idempotency_key}
            )
        except stripe.CardError as exc:
            error = exc.error
            intent_obj = getattr(error, "payment_intent", None) if error else None
            code = str(exc.code or "card_declined")
            return ChargeResult(
                ChargeStatus.FAILED,
                str(getattr(intent_obj, "id", None) or "") or None,
                failure_code=code,
                decline_code=(getattr(error, "decline_code", None) if error else None)
                or ("authentication_required" if code == "authentication_required" else None),
                failure_message=exc.user_message or "Your card was declined.",
            )
        except stripe.InvalidRequestError as exc:
            # e.g. the PaymentMethod no longer exists at Stripe: this charge can't succeed.
            return ChargeResult(
                ChargeStatus.FAILED,
                None,
                failure_code=str(exc.code or "invalid_request"),
                failure_message=exc.user_message or "The card can no longer be charged.",
            )
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc
        result = charge_result(intent.to_dict())
        if request.off_session and result.status is ChargeStatus.REQUIRES_ACTION:
            # Nobody is there to authenticate: an off-session charge that asks for it has
            # failed (Stripe usually says so itself, with authentication_required).
            with contextlib.suppress(stripe.StripeError):
                await self.client.v1.payment_intents.cancel_async(str(intent.id))
            return ChargeResult(
                ChargeStatus.FAILED,
                result.gateway_payment_id,
                failure_code="authentication_required",
                decline_code="authentication_required",
                failure_message="The card needs the cardholder to authenticate this payment.",
            )
        return result

    async def retrieve_charge(self, gateway_payment_id: str) -> ChargeResult:
        try:
            intent = await self.client.v1.payment_intents.retrieve_async(gateway_payment_id)
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc
        return charge_result(intent.to_dict())

    async def retrieve_intent(self, gateway_payment_id: str) -> dict[str, Any] | None:
        """The PaymentIntent as Stripe has it, its ``latest_charge`` expanded (``None`` if
        Stripe doesn't know the id), for reconciliation: status, amount, currency,
        customer, refunded amount."""
        try:
            intent = await self.client.v1.payment_intents.retrieve_async(
                gateway_payment_id, params={"expand": ["latest_charge"]}
            )
        except stripe.InvalidRequestError as exc:
            if exc.http_status == 404:
                return None
            raise
        except _TRANSIENT as exc:
            raise GatewayUnavailable(str(exc)) from exc
        data: dict[str, Any] = intent.to_dict()
        return data
