"""Choose the payment gateway from settings."""

from __future__ import annotations

from billing.payments.gateways import PaymentGateway
from billing.payments.gateways.sandbox import SandboxGateway
from billing.payments.gateways.stripe_gateway import StripeGateway
from runtime.settings import Settings


def make_gateway(settings: Settings) -> PaymentGateway:
    if settings.payment_gateway == "stripe":
        assert settings.stripe_api_key is not None
        return StripeGateway(
            settings.stripe_api_key.get_secret_value(), api_base=settings.stripe_api_base
        )
    return SandboxGateway()
