"""The transaction rule (api/graphql/run.py): a flow that calls the payment gateway owns its
transactions and never holds one across a gateway call. A sandbox gateway that notes, at
each call, whether the calling task is inside a database transaction shows it for every
card and purchase mutation, staff's included."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette

from api.asgi import create_app
from api.auth import issue_token
from billing import sql
from billing.enums import Role
from billing.payments.gateways import CardChanges, CardDetails, ChargeRequest, ChargeResult
from billing.payments.gateways.sandbox import SandboxGateway
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from workers.jobs import all_functions


class WatchedSandbox(SandboxGateway):
    """The sandbox, noting for each call whether a transaction is open around it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def _note(self, name: str) -> None:
        self.calls.append((name, sql.in_transaction()))

    async def ensure_customer(self, account_id: str, existing_customer_id: str | None) -> str:
        self._note("ensure_customer")
        return await super().ensure_customer(account_id, existing_customer_id)

    async def attach_card(self, customer_id: str, payment_method_id: str) -> CardDetails:
        self._note("attach_card")
        return await super().attach_card(customer_id, payment_method_id)

    async def update_card(self, payment_method_id: str, changes: CardChanges) -> None:
        self._note("update_card")
        await super().update_card(payment_method_id, changes)

    async def start_card_setup(self, customer_id: str) -> str:
        self._note("start_card_setup")
        return await super().start_card_setup(customer_id)

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None:
        self._note("set_default_card")
        await super().set_default_card(customer_id, payment_method_id)

    async def detach_card(self, payment_method_id: str) -> None:
        self._note("detach_card")
        await super().detach_card(payment_method_id)

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        self._note("charge")
        return await super().charge(request)


@pytest.fixture
def watched(gateway_name: str) -> WatchedSandbox:
    if gateway_name != "sandbox":
        pytest.skip("the rule is the flows', whatever the gateway: checked once, on the sandbox")
    return WatchedSandbox()


@pytest_asyncio.fixture
async def client(
    app: Starlette, settings: Settings, watched: WatchedSandbox
) -> AsyncIterator[httpx.AsyncClient]:
    """An app on the session's database with the watched gateway. Its lifespan is not run:
    ``app``'s holds the database open (a second one would close it when it ends)."""
    application = create_app(settings, gateway=watched, queue=InProcessQueue(all_functions()))
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def gql(
    client: httpx.AsyncClient, token: str, query: str, variables: dict[str, Any]
) -> dict[str, Any]:
    response = await client.post(
        "/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
    )
    body = response.json()
    assert response.status_code == 200 and "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


ADD = """mutation($pm: String!) { addCard(input: {paymentMethodId: $pm})
  { card { id } errors { code } } }"""
SETUP = "mutation { startCardSetup { clientSecret errors { code } } }"
UPDATE = """mutation($id: ID!) { updateCard(input: {cardId: $id, cardholderName: "Ada",
  billingAddress: {city: "Lyon", country: "FR"}}) { card { cardholderName } errors { code } } }"""
PRIMARY = """mutation($id: ID!) { setPrimaryCard(input: {cardId: $id})
  { card { isPrimary } errors { code } } }"""
REMOVE = "mutation($id: ID!) { removeCard(input: {cardId: $id}) { removedCardId errors { code } } }"
PURCHASE = """mutation($key: String!) {
  purchaseCredits(input: {credits: 1000, idempotencyKey: $key}) {
    payment { status } errors { code } } }"""


async def test_no_transaction_is_open_during_a_gateway_call(
    client: httpx.AsyncClient, settings: Settings, watched: WatchedSandbox
) -> None:
    account = f"acct-{uuid.uuid4().hex[:12]}"
    admin = issue_token(settings, account_id=account, user_id="admin-1", roles=[Role.ADMIN])
    staff = issue_token(settings, account_id="vendor", user_id="s-1", roles=[Role.BILLING_STAFF])

    first = (await gql(client, admin, ADD, {"pm": "pm_card_visa"}))["addCard"]
    second = (await gql(client, admin, ADD, {"pm": "pm_card_mastercard"}))["addCard"]
    assert first["errors"] == [] and second["errors"] == []
    assert (await gql(client, admin, SETUP, {}))["startCardSetup"]["errors"] == []
    for token in (admin, staff):
        updated = (await gql(client, token, UPDATE, {"id": second["card"]["id"]}))["updateCard"]
        assert updated == {"card": {"cardholderName": "Ada"}, "errors": []}
        primary = await gql(client, token, PRIMARY, {"id": second["card"]["id"]})
        assert primary["setPrimaryCard"] == {"card": {"isPrimary": True}, "errors": []}
    bought = (await gql(client, admin, PURCHASE, {"key": uuid.uuid4().hex}))["purchaseCredits"]
    assert bought == {"payment": {"status": "SUCCEEDED"}, "errors": []}
    removed = (await gql(client, admin, REMOVE, {"id": first["card"]["id"]}))["removeCard"]
    assert removed["errors"] == []

    called = {name for name, _ in watched.calls}
    assert called >= {
        "attach_card",
        "start_card_setup",
        "update_card",
        "set_default_card",
        "charge",
        "detach_card",
    }, watched.calls
    assert [name for name, in_tx in watched.calls if in_tx] == [], watched.calls
