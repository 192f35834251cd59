"""Part 2: the real Stripe client against localstripe, webhooks, 3-D Secure, crash healing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio

from api import ids
from billing.models import Card, GatewayEvent, LedgerEntry, Payment
from billing.payments import purchases
from billing.payments.gateways import ChargeRequest, ChargeResult, GatewayUnavailable
from billing.payments.gateways.stripe_gateway import GatewayMisconfigured, StripeGateway
from billing.pricing import load_price_book
from runtime.queue import InProcessQueue
from tests.conftest import WEBHOOK_SECRET, Caller
from tests.support.gateways import StripeHarness, signed
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import ACCOUNT, PURCHASE, add_card, balance, buy, codes, key

CONFIRM = """mutation($id: ID!) { confirmPurchase(input: {paymentId: $id}) {
  payment { id status clientSecret } transaction { id credits } balance errors { code field }
} }"""
FLAG = "{ creditAccount { balance flaggedReason flaggedAt } }"


@pytest.fixture(autouse=True)
def _stripe_only(gateway_name: str) -> None:
    if gateway_name != "stripe":
        pytest.skip("Stripe-only behaviour")


@pytest.fixture
def stripe_harness(harness: Any) -> StripeHarness:
    assert isinstance(harness, StripeHarness)
    return harness


async def post_event(
    http: httpx.AsyncClient,
    event: dict[str, Any],
    *,
    secret: str = WEBHOOK_SECRET,
    timestamp: int | None = None,
    header: str | None = None,
) -> httpx.Response:
    body, signature = signed(event, secret, timestamp)
    headers = {"Content-Type": "application/json"}
    if header != "omit":
        headers["Stripe-Signature"] = header or signature
    return await http.post("/webhooks/stripe", content=body, headers=headers)


def event(kind: str, obj: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    return {
        "id": event_id or f"evt_{uuid.uuid4().hex[:16]}",
        "object": "event",
        "type": kind,
        "created": int(time.time()),
        "data": {"object": obj},
    }


async def intent(h: StripeHarness, intent_id: str) -> dict[str, Any]:
    response = await h.http.get(f"/v1/payment_intents/{intent_id}")
    response.raise_for_status()
    return dict(response.json())


async def _intent_of(h: StripeHarness, payment_id: str) -> dict[str, Any]:
    """The PaymentIntent tagged with our payment row (localstripe lists oldest first and
    the session makes many: page through them all)."""
    params: dict[str, Any] = {"limit": 100}
    while True:
        listed = (await h.http.get("/v1/payment_intents", params=params)).json()
        for p in listed["data"]:
            if p["metadata"].get("payment_id") == payment_id:
                return dict(p)
        assert listed["has_more"], f"no PaymentIntent for payment {payment_id}"
        params["starting_after"] = listed["data"][-1]["id"]


async def payment_row(payment_gid: str) -> Payment:
    payment_id = ids.decode("Payment", payment_gid)
    assert payment_id is not None
    return await Payment.get(id=payment_id)


async def credit_entries(payment: Payment) -> int:
    return await LedgerEntry.filter(payment_id=payment.id, credits__gt=0).count()


# ---------------------------------------------------------------- the webhook door


async def test_signed_event_is_stored_once_and_replay_changes_nothing(
    http: httpx.AsyncClient, queue: InProcessQueue
) -> None:
    evt = event("customer.created", {"id": "cus_x"})
    first = await post_event(http, evt)
    assert first.status_code == 200 and first.json() == {"received": True, "duplicate": False}
    again = await post_event(http, evt)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    await queue.drain()
    rows = await GatewayEvent.filter(external_id=evt["id"])
    assert len(rows) == 1 and rows[0].processed_at is not None


@pytest.mark.parametrize("how", ["forged", "missing", "stale", "garbage-header"])
async def test_bad_signatures_are_400_and_store_nothing(http: httpx.AsyncClient, how: str) -> None:
    evt = event("payment_intent.succeeded", {"id": "pi_forged", "status": "succeeded"})
    if how == "forged":
        response = await post_event(http, evt, secret="whsec_someone_else")
    elif how == "missing":
        response = await post_event(http, evt, header="omit")
    elif how == "stale":
        response = await post_event(http, evt, timestamp=int(time.time()) - 3600)
    else:
        response = await post_event(http, evt, header="t=1,v1=deadbeef")
    assert response.status_code == 400
    assert await GatewayEvent.filter(external_id=evt["id"]).count() == 0


async def test_signed_body_that_is_not_an_event_is_400(http: httpx.AsyncClient) -> None:
    body, sig = signed({"no": "id"}, WEBHOOK_SECRET)
    response = await http.post("/webhooks/stripe", content=body, headers={"Stripe-Signature": sig})
    assert response.status_code == 400


# ---------------------------------------------------------------- 3-D Secure, exactly once


async def _three_ds_purchase(admin: Caller) -> dict[str, Any]:
    await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 200)
    assert bought["errors"] == []
    assert bought["payment"]["status"] == "REQUIRES_ACTION"
    assert bought["payment"]["clientSecret"]
    assert bought["transaction"] is None and bought["balance"] == 0
    return cast("dict[str, Any]", bought["payment"])


@pytest.mark.parametrize(
    "order",
    [
        ("confirm",),
        ("webhook",),
        ("confirm", "webhook"),
        ("webhook", "confirm"),
        ("webhook", "webhook", "confirm", "confirm"),
        ("confirm", "confirm", "webhook", "webhook"),
    ],
    ids=lambda o: "-".join(o),
)
async def test_three_ds_credits_land_exactly_once(
    admin: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    stripe_harness: StripeHarness,
    order: tuple[str, ...],
) -> None:
    payment = await _three_ds_purchase(admin)
    row = await payment_row(payment["id"])
    assert row.gateway_payment_id
    await stripe_harness.complete_3ds(row.gateway_payment_id, payment["clientSecret"])
    succeeded = event(
        "payment_intent.succeeded", await intent(stripe_harness, row.gateway_payment_id)
    )
    for step in order:
        if step == "confirm":
            data = await admin.gql(CONFIRM, {"id": payment["id"]})
            assert data["confirmPurchase"]["errors"] == []
            assert data["confirmPurchase"]["payment"]["status"] == "SUCCEEDED"
            assert data["confirmPurchase"]["balance"] == 200
        else:
            assert (await post_event(http, succeeded)).status_code == 200
            await queue.drain()
    assert await balance(admin) == 200
    assert await credit_entries(row) == 1
    assert await assert_ledger_consistent(admin.account_id) == 200


async def test_concurrent_confirms_and_webhooks_credit_once(
    admin: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    stripe_harness: StripeHarness,
) -> None:
    payment = await _three_ds_purchase(admin)
    row = await payment_row(payment["id"])
    assert row.gateway_payment_id
    await stripe_harness.complete_3ds(row.gateway_payment_id, payment["clientSecret"])
    pi = await intent(stripe_harness, row.gateway_payment_id)
    calls: list[Coroutine[Any, Any, object]] = [
        admin.gql(CONFIRM, {"id": payment["id"]}) for _ in range(5)
    ]
    calls += [post_event(http, event("payment_intent.succeeded", pi)) for _ in range(5)]
    await asyncio.gather(*calls)
    await queue.drain()
    assert await credit_entries(row) == 1
    assert await assert_ledger_consistent(admin.account_id) == 200


async def test_confirm_before_authentication_changes_nothing(
    admin: Caller, stripe_harness: StripeHarness
) -> None:
    payment = await _three_ds_purchase(admin)
    data = (await admin.gql(CONFIRM, {"id": payment["id"]}))["confirmPurchase"]
    assert data["payment"]["status"] == "REQUIRES_ACTION" and data["errors"] == []
    assert data["transaction"] is None and await balance(admin) == 0


async def test_confirm_of_another_accounts_payment_is_not_found(
    admin: Caller, caller: Any, stripe_harness: StripeHarness
) -> None:
    from billing.enums import Role

    payment = await _three_ds_purchase(admin)
    other = caller(f"other-{uuid.uuid4().hex[:8]}", Role.ADMIN)
    data = (await other.gql(CONFIRM, {"id": payment["id"]}))["confirmPurchase"]
    assert data["payment"] is None
    assert data["errors"] == [{"code": "NOT_FOUND", "field": ["paymentId"]}]


async def test_failed_authentication_event_fails_the_payment(
    admin: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    stripe_harness: StripeHarness,
) -> None:
    payment = await _three_ds_purchase(admin)
    row = await payment_row(payment["id"])
    failed = {
        **await intent(stripe_harness, str(row.gateway_payment_id)),
        "status": "requires_payment_method",
        "last_payment_error": {
            "code": "card_declined",
            "decline_code": "generic_decline",
            "message": "Authentication failed.",
        },
    }
    assert (
        await post_event(http, event("payment_intent.payment_failed", failed))
    ).status_code == 200
    await queue.drain()
    await row.refresh_from_db()
    assert row.status.value == "FAILED" and row.failure_message == "Authentication failed."
    assert await balance(admin) == 0


# ---------------------------------------------------------------- crash between charge and ledger


class ChargeThenCrash:
    """The real gateway, but the process 'dies' right after Stripe charged the card."""

    def __init__(self, inner: StripeGateway) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        await self.inner.charge(request)
        raise ConnectionResetError("process died after the charge")


async def test_crash_after_charge_is_healed_by_the_event(
    admin: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    stripe_harness: StripeHarness,
    settings: Any,
) -> None:
    await add_card(admin, "pm_card_visa")
    book = load_price_book(settings.price_book_path)
    with pytest.raises(ConnectionResetError):
        await purchases.purchase_credits(
            ChargeThenCrash(stripe_harness.gateway),
            book,
            account_id=admin.account_id,
            user_id=admin.user_id,
            credits=300,
            card_id=None,
            card_id_given=False,
            idempotency_key=key(),
        )
    row = await Payment.get(account_id=admin.account_id)
    assert row.status.value == "PENDING" and row.gateway_payment_id is None
    assert await balance(admin) == 0
    # Stripe holds the succeeded PaymentIntent, tagged with our payment row.
    pi = await _intent_of(stripe_harness, str(row.id))
    assert pi["status"] == "succeeded"
    for _ in range(2):  # the event, delivered twice
        assert (await post_event(http, event("payment_intent.succeeded", pi))).status_code == 200
        await queue.drain()
    await row.refresh_from_db()
    assert row.status.value == "SUCCEEDED" and row.gateway_payment_id == pi["id"]
    assert await credit_entries(row) == 1
    assert await assert_ledger_consistent(admin.account_id) == 300


# ---------------------------------------------------------------- refunds, disputes, card events


async def _paid(admin: Caller, credits: int) -> Payment:
    await add_card(admin, "pm_card_visa")
    bought = await buy(admin, credits)
    assert bought["payment"]["status"] == "SUCCEEDED"
    return await payment_row(bought["payment"]["id"])


def _charge(payment: Payment, refunded_cents: int) -> dict[str, Any]:
    return {
        "id": f"ch_{uuid.uuid4().hex[:12]}",
        "object": "charge",
        "payment_intent": payment.gateway_payment_id,
        "amount": payment.amount_cents,
        "amount_refunded": refunded_cents,
        "refunded": refunded_cents >= payment.amount_cents,
    }


async def test_partial_then_full_refund(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue
) -> None:
    payment = await _paid(admin, 1000)
    half = event("charge.refunded", _charge(payment, payment.amount_cents // 2))
    for _ in range(2):  # a duplicate delivery moves nothing
        await post_event(http, half)
        await queue.drain()
    assert await balance(admin) == 500
    # an older notice arriving late (smaller cumulative refund) moves nothing either
    await post_event(http, event("charge.refunded", _charge(payment, payment.amount_cents // 4)))
    await post_event(http, event("charge.refunded", _charge(payment, payment.amount_cents)))
    await queue.drain()
    assert await balance(admin) == 0
    await payment.refresh_from_db()
    assert payment.status.value == "REFUNDED" and payment.refunded_cents == payment.amount_cents
    refunds = await LedgerEntry.filter(payment_id=payment.id, type="REFUND").order_by("created_at")
    assert [r.credits for r in refunds] == [-500, -500]
    assert await assert_ledger_consistent(admin.account_id) == 0


async def test_refund_larger_than_the_balance_flags_the_account(
    admin: Caller, service: Caller, http: httpx.AsyncClient, queue: InProcessQueue
) -> None:
    payment = await _paid(admin, 1000)
    from tests.support.ops import CONSUME

    spent = await service.gql(
        CONSUME,
        {
            "input": {
                "accountId": service.account_id,
                "userId": "u1",
                "processType": "HANDWRITTEN_LETTER",
                "quantity": 20,
                "idempotencyKey": key(),
            }
        },
    )
    assert codes(spent["consumeCredits"]) == []
    left = await balance(admin)
    await post_event(http, event("charge.refunded", _charge(payment, payment.amount_cents)))
    await queue.drain()
    flagged = (await admin.gql(FLAG))["creditAccount"]
    assert flagged["balance"] == 0
    assert f"by {1000 - left} credits" in flagged["flaggedReason"]
    assert await assert_ledger_consistent(admin.account_id) == 0


async def test_dispute_takes_the_credits_back_once_and_flags(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue
) -> None:
    payment = await _paid(admin, 400)
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:10]}",
        "object": "dispute",
        "payment_intent": payment.gateway_payment_id,
        "amount": payment.amount_cents,
        "reason": "fraudulent",
    }
    await post_event(http, event("charge.dispute.created", dispute))
    await post_event(http, event("charge.dispute.created", dispute))  # another event id
    await queue.drain()
    data = (await admin.gql(FLAG))["creditAccount"]
    assert data["balance"] == 0
    assert dispute["id"] in data["flaggedReason"] and data["flaggedAt"]
    adjustments = await LedgerEntry.filter(account_id=admin.account_id, type="ADJUSTMENT")
    assert [a.credits for a in adjustments] == [-400]


async def test_payment_method_updated_changes_the_expiry(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue
) -> None:
    card = await add_card(admin, "pm_card_visa")
    row = await Card.get(id=ids.decode("Card", card["id"]))
    pm = {
        "id": row.gateway_payment_method_id,
        "object": "payment_method",
        "type": "card",
        "card": {"brand": "visa", "last4": "4242", "exp_month": 3, "exp_year": 2031},
        "billing_details": {"name": "Ada Admin", "address": {"city": "Austin"}},
    }
    await post_event(http, event("payment_method.automatically_updated", pm))
    await queue.drain()
    cards = (await admin.gql(ACCOUNT))["creditAccount"]["cards"]
    assert (cards[0]["expMonth"], cards[0]["expYear"]) == (3, 2031)
    assert cards[0]["cardholderName"] == "Ada Admin"
    assert cards[0]["billingAddress"]["city"] == "Austin"


async def test_payment_method_detached_removes_the_card(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue
) -> None:
    first = await add_card(admin, "pm_card_visa")
    second = await add_card(admin, "pm_card_visa")
    row = await Card.get(id=ids.decode("Card", first["id"]))
    await post_event(
        http,
        event(
            "payment_method.detached",
            {"id": row.gateway_payment_method_id, "object": "payment_method"},
        ),
    )
    await queue.drain()
    cards = (await admin.gql(ACCOUNT))["creditAccount"]["cards"]
    assert [c["id"] for c in cards] == [second["id"]] and cards[0]["isPrimary"] is True
    bought = await admin.gql(
        PURCHASE, {"input": {"credits": 100, "idempotencyKey": key(), "cardId": first["id"]}}
    )
    assert codes(bought["purchaseCredits"]) == ["NOT_FOUND"]


# ---------------------------------------------------------------- errors from Stripe itself


class FakeStripe:
    """A loopback HTTP server answering with canned (status, body) pairs, in order."""

    def __init__(self, answers: list[tuple[int, str]]) -> None:
        self.answers = answers
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-length:"):
                length = int(line.split(":", 1)[1])
        if length:
            await reader.readexactly(length)
        status, body = self.answers[min(self.requests, len(self.answers) - 1)]
        self.requests += 1
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n{body}".encode()
        )
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest_asyncio.fixture
async def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    yield


async def test_invalid_api_key_is_a_clear_start_up_error() -> None:
    body = '{"error": {"type": "invalid_request_error", "message": "Invalid API Key provided"}}'
    async with FakeStripe([(401, body)]) as url:
        gateway = StripeGateway("sk_live_wrong", api_base=url, max_network_retries=0)
        with pytest.raises(GatewayMisconfigured, match="STRIPE_API_KEY"):
            await gateway.verify()


async def test_server_errors_are_retried_then_succeed() -> None:
    customer = '{"id": "cus_retried", "object": "customer"}'
    fake = FakeStripe([(500, '{"error": {"message": "boom"}}'), (200, customer)])
    async with fake as url:
        gateway = StripeGateway("sk_test_x", api_base=url, max_network_retries=2)
        assert await gateway.ensure_customer("acct", None) == "cus_retried"
    assert fake.requests == 2


async def test_server_errors_that_persist_are_gateway_unavailable() -> None:
    fake = FakeStripe([(503, '{"error": {"message": "down"}}')])
    async with fake as url:
        gateway = StripeGateway("sk_test_x", api_base=url, max_network_retries=1)
        with pytest.raises(GatewayUnavailable):
            await gateway.ensure_customer("acct", None)
    assert fake.requests == 2
