"""Choose the payment gateway from settings."""

from __future__ import annotations

from billing.gateways import PaymentGateway
from billing.gateways.sandbox import SandboxGateway
from billing.settings import Settings


def make_gateway(settings: Settings) -> PaymentGateway:
    if settings.payment_gateway == "sandbox":
        if settings.is_production:
            raise RuntimeError("PAYMENT_GATEWAY=sandbox is not allowed with CREDITS_ENV=production")
        return SandboxGateway()
    raise RuntimeError(
        "PAYMENT_GATEWAY=stripe is not available in this release yet; use PAYMENT_GATEWAY=sandbox"
    )
