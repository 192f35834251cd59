"""Both gateways under test: the sandbox, and the real Stripe client against localstripe.

``translate`` plays the browser's Stripe Elements: a test card named like Stripe's test
PaymentMethod ids (``pm_card_mastercard``) becomes, for Stripe, a PaymentMethod created at
localstripe from that test card's number, which is what Elements hands the web app.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import httpx

from billing.payments.gateways import ChargeRequest, ChargeResult
from billing.payments.gateways.sandbox import SandboxGateway
from billing.payments.gateways.stripe_gateway import StripeGateway

# Stripe's test card numbers behind its test PaymentMethod ids.
TEST_CARD_NUMBERS = {
    "visa": "4242424242424242",
    "visa_debit": "4000056655665556",
    "mastercard": "5555555555554444",
    # localstripe takes 16-digit numbers only: a stand-in with Amex's test last4.
    "amex": "3714496353908431",
    "discover": "6011111111111117",
    "chargeDeclined": "4000000000000002",
    "chargeDeclinedInsufficientFunds": "4000000000009995",
    "chargeCustomerFail": "4000000000000341",
    "authenticationRequired": "4000002500003155",
}
_PM_NAME = re.compile(r"\bpm_card_(" + "|".join(TEST_CARD_NUMBERS) + r")\b")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_LAUNCH = """
import sys
from aiohttp import web
from localstripe.resources import store
from localstripe.server import app
store.dump_to_disk = lambda: None  # from scratch, and nothing written to /tmp
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def run_localstripe(workdir: Path) -> Iterator[str]:
    """Start localstripe on 127.0.0.1 (never all interfaces), yield its URL, stop it."""
    port = free_port()
    log = (workdir / "localstripe.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, str(port)],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/v1/customers", auth=("sk_test_suite", ""), timeout=1)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("localstripe did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class CountingStripeGateway(StripeGateway):
    """The real Stripe gateway, counting the charges it sends (localstripe ignores
    Idempotency-Key, so each call is one PaymentIntent there)."""

    charge_count = 0

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        self.charge_count += 1
        return await super().charge(request)


class GatewayHarness(Protocol):
    name: str
    gateway: Any

    async def translate(self, value: Any) -> Any: ...

    async def complete_3ds(self, gateway_payment_id: str, client_secret: str) -> None: ...

    async def fail_3ds(self, gateway_payment_id: str, client_secret: str) -> None: ...

    async def retry(self, gateway_payment_id: str, payment_method_id: str) -> None: ...


class SandboxHarness:
    name = "sandbox"

    def __init__(self, gateway: SandboxGateway) -> None:
        self.gateway = gateway

    async def translate(self, value: Any) -> Any:
        return value

    async def complete_3ds(self, gateway_payment_id: str, client_secret: str) -> None:
        assert self.gateway.complete_authentication(gateway_payment_id)

    async def fail_3ds(self, gateway_payment_id: str, client_secret: str) -> None:
        assert self.gateway.complete_authentication(gateway_payment_id, success=False)

    async def retry(self, gateway_payment_id: str, payment_method_id: str) -> None:
        """The customer confirms the same PaymentIntent again (after a failed challenge)."""
        assert self.gateway.retry(gateway_payment_id)


class StripeHarness:
    name = "stripe"

    def __init__(self, gateway: CountingStripeGateway, url: str) -> None:
        self.gateway = gateway
        self.url = url
        self.http = httpx.AsyncClient(base_url=url, auth=("sk_test_suite", ""))

    async def payment_method(self, kind: str) -> str:
        response = await self.http.post(
            "/v1/payment_methods",
            data={
                "type": "card",
                "card[number]": TEST_CARD_NUMBERS[kind],
                "card[exp_month]": "12",
                "card[exp_year]": "2034",
                "card[cvc]": "123",
            },
        )
        response.raise_for_status()
        return str(response.json()["id"])

    async def translate(self, value: Any) -> Any:
        if isinstance(value, str):
            if "pm_card_" not in value:
                return value
            out, pos = [], 0
            for match in _PM_NAME.finditer(value):
                out += [value[pos : match.start()], await self.payment_method(match.group(1))]
                pos = match.end()
            return "".join(out) + value[pos:]
        if isinstance(value, dict):
            return {k: await self.translate(v) for k, v in value.items()}
        if isinstance(value, list):
            return [await self.translate(v) for v in value]
        return value

    async def complete_3ds(self, gateway_payment_id: str, client_secret: str) -> None:
        response = await self.http.post(
            f"/v1/payment_intents/{gateway_payment_id}/_authenticate",
            data={"client_secret": client_secret, "success": "true"},
        )
        response.raise_for_status()

    async def fail_3ds(self, gateway_payment_id: str, client_secret: str) -> None:
        response = await self.http.post(
            f"/v1/payment_intents/{gateway_payment_id}/_authenticate",
            data={"client_secret": client_secret, "success": "false"},
        )
        response.raise_for_status()

    async def retry(self, gateway_payment_id: str, payment_method_id: str) -> None:
        """The customer confirms the same PaymentIntent again with the card (Stripe.js)."""
        updated = await self.http.post(
            f"/v1/payment_intents/{gateway_payment_id}",
            data={"payment_method": payment_method_id},
        )
        updated.raise_for_status()
        confirmed = await self.http.post(f"/v1/payment_intents/{gateway_payment_id}/confirm")
        confirmed.raise_for_status()


def signed(payload: dict[str, Any], secret: str, timestamp: int | None = None) -> tuple[str, str]:
    """A webhook body and its Stripe-Signature header, as Stripe signs them."""
    import hashlib
    import hmac

    body = json.dumps(payload)
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.{body}".encode(), hashlib.sha256).hexdigest()
    return body, f"t={ts},v1={mac}"
