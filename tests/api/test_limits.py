"""Every request has a bounded cost: a GraphQL document's cost is computed once and
refused over budget, every operation has a wall-clock budget, production errors suggest
nothing, and client mistakes are logged as such (INFO, no traceback)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from api.auth import issue_token
from api.bounded import validation_cache_info
from api.cost import MAX_FIELDS
from billing.enums import Role
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import Caller
from tests.support.gateways import GatewayHarness
from workers.jobs import all_functions

MakeApp = Callable[..., Starlette]


@pytest.fixture
def make_app(app: Starlette, settings: Settings, harness: GatewayHarness) -> MakeApp:
    """An app with other settings, on the session's database (``app`` holds it open)."""
    from api.asgi import create_app

    def make(**update: Any) -> Starlette:
        changed = settings.model_copy(update=update)
        return create_app(changed, gateway=harness.gateway, queue=InProcessQueue(all_functions()))

    return make


@asynccontextmanager
async def client(application: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


def fragment_bomb(levels: int) -> str:
    """A document of a few hundred bytes selecting 2^levels fields once expanded."""
    fragments = " ".join(
        f"fragment F{i} on Viewer {{ ...F{i - 1} ...F{i - 1} }}" for i in range(1, levels + 1)
    )
    return f"{{ viewer {{ ...F{levels} }} }} fragment F0 on Viewer {{ userId }} {fragments}"


async def test_a_fragment_bomb_is_refused_at_once(caller: Callable[..., Caller]) -> None:
    """Any token, even one with no roles: 40 doubling fragments (2^40 fields once expanded)
    were walked spread by spread by the depth and alias limits, which held the process for
    ever (20 of them took 3 s); the cost is now computed once per fragment."""
    nobody = caller("acct-bomb")  # no roles at all
    query = fragment_bomb(40)
    assert len(query) < 2_000
    hits = validation_cache_info().hits
    for _attempt in range(2):
        body = (await nobody.raw(query)).json()
        assert body["data"] is None, body
        (error,) = body["errors"]
        assert error["extensions"]["code"] == "QUERY_TOO_COSTLY"
        assert f"{2**40 + 1:,} fields" in error["message"]
        assert f"Allowed: {MAX_FIELDS:,}" in error["message"]
    assert validation_cache_info().hits >= hits + 1  # the verdict is kept with the document
    # A small fragment tree is served as before.
    fine = (await nobody.raw(fragment_bomb(5))).json()
    assert fine == {"data": {"viewer": {"userId": nobody.user_id}}}


async def test_a_fragment_bomb_over_the_websocket_path_is_refused_too(
    app: Starlette, settings: Settings
) -> None:
    """The same validation runs for the websocket's operations (Strawberry's ``stream``)."""
    from api.context import Context
    from api.endpoint import ANONYMOUS

    services = app.state.services
    schema = app.routes[0].endpoint.graphql.schema  # type: ignore[attr-defined]
    context = Context(
        principal=ANONYMOUS,
        settings=settings,
        gateway=services.gateway,
        book=services.book,
        queue=services.queue,
        live=services.live,
    )
    results = await schema.stream(fragment_bomb(40), context_value=context)
    first = await anext(results)
    await results.aclose()
    assert first.errors[0].extensions["code"] == "QUERY_TOO_COSTLY"


async def test_an_operation_over_its_time_budget_is_stopped(
    make_app: MakeApp, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow operation is cancelled at the budget with a TIMEOUT error, and the process
    serves others meanwhile."""
    import api.graphql.account

    release = asyncio.Event()

    async def stuck(account_id: str) -> Any:
        await release.wait()  # never set: only the budget ends it
        raise AssertionError("unreachable")

    monkeypatch.setattr(api.graphql.account, "get_account", stuck)
    application = make_app(operation_timeout_seconds=0.5)
    token = issue_token(settings, account_id="acct-slow", user_id="u", roles=[Role.ADMIN])
    async with client(application) as c:
        slow = asyncio.create_task(
            c.post(
                "/graphql",
                json={"query": "{ creditAccount { balance } }"},
                headers={"Authorization": f"Bearer {token}"},
            )
        )
        assert (await c.get("/healthz")).status_code == 200  # not held by the slow one
        response = await slow
    body = response.json()
    assert body["data"] is None
    assert body["errors"][0]["extensions"]["code"] == "TIMEOUT"


SUGGESTING = [
    ("{ creditAccount { balanc } }", "Did you mean"),  # a field
    ('{ creditAccount(acountId: "x") { balance } }', "Did you mean"),  # an argument
    ("query($f: TransactionFiltr) { viewer { userId } }", "Did you mean"),  # a type
    (  # an enum value in a literal
        "{ creditAccount { transactions(first: 1, filter: {types: [USAG]}) "
        "{ edges { cursor } } } }",
        "Did you mean",
    ),
]


@pytest.mark.parametrize("query,hint", SUGGESTING)
async def test_no_suggestions_in_production(
    make_app: MakeApp, settings: Settings, admin: Caller, query: str, hint: str
) -> None:
    # Development keeps the hints (they help at the keyboard) ...
    assert any(hint in e["message"] for e in (await admin.raw(query)).json()["errors"])
    # ... production names nothing the client did not send.
    application = make_app(credits_env="production")
    token = issue_token(settings, account_id="acct-prod", user_id="u", roles=[Role.ADMIN])
    async with client(application) as c:
        response = await c.post(
            "/graphql", json={"query": query}, headers={"Authorization": f"Bearer {token}"}
        )
    errors = response.json()["errors"]
    assert errors
    assert not any(hint in e["message"] for e in errors), errors


async def test_no_suggestions_for_variables_in_production(
    make_app: MakeApp, settings: Settings
) -> None:
    query = (
        "query($f: TransactionFilter) { creditAccount { transactions(first: 1, filter: $f) "
        "{ edges { cursor } } } }"
    )
    application = make_app(credits_env="production")
    token = issue_token(settings, account_id="acct-prod", user_id="u", roles=[Role.ADMIN])
    async with client(application) as c:
        response = await c.post(
            "/graphql",
            json={"query": query, "variables": {"f": {"types": ["USAG"], "serch": "x"}}},
            headers={"Authorization": f"Bearer {token}"},
        )
    errors = response.json()["errors"]
    assert errors
    assert not any("Did you mean" in e["message"] for e in errors), errors


async def test_client_mistakes_are_info_without_a_traceback(
    caller: Callable[..., Caller], admin: Caller, caplog: pytest.LogCaptureFixture
) -> None:
    nobody = caller("acct-typos", Role.USER)
    with caplog.at_level(logging.INFO):
        await nobody.raw("{ creditAccount { balance } }")  # FORBIDDEN
        await nobody.raw("{ viewer { userId ")  # a syntax error
        await nobody.raw("{ viewer { nope } }")  # a validation error
        await admin.raw("{ creditAccount { transactions(first: 0) { edges { cursor } } } }")
    graphql_records = [r for r in caplog.records if r.name.startswith(("api", "strawberry"))]
    assert graphql_records
    assert not [r for r in graphql_records if r.levelno >= logging.WARNING or r.exc_info]
    assert {"FORBIDDEN", "BAD_USER_INPUT"} <= {
        code
        for r in graphql_records
        for code in ("FORBIDDEN", "BAD_USER_INPUT")
        if code in r.getMessage()
    }


async def test_several_operations_need_an_operation_name(admin: Caller) -> None:
    """The GraphQL spec: a document with several operations and no operationName is an
    error, not the first operation run."""
    query = (
        "query A { viewer { userId } } "
        'mutation B { addCard(input: {paymentMethodId: "pm_card_visa"}) { errors { code } } }'
    )
    body = (await admin.raw(query)).json()
    assert body["data"] is None, body
    assert body["errors"][0]["extensions"]["code"] == "BAD_REQUEST"
    named = await admin.http.post(
        "/graphql",
        json={"query": query, "operationName": "A"},
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert named.json() == {"data": {"viewer": {"userId": admin.user_id}}}
    cards = await admin.gql("{ creditAccount { cards { id } } }")
    assert cards["creditAccount"]["cards"] == []


async def test_metrics_are_not_public_in_production(make_app: MakeApp) -> None:
    """/metrics served cross-tenant totals to anyone in production."""
    async with client(make_app(credits_env="production")) as c:
        assert (await c.get("/metrics")).status_code == 404
    guarded = make_app(
        credits_env="production", metrics_token=SecretStr("scraper-secret-0123456789")
    )
    async with client(guarded) as c:
        assert (await c.get("/metrics")).status_code == 401
        wrong = {"Authorization": "Bearer guess"}
        assert (await c.get("/metrics", headers=wrong)).status_code == 401
        right = {"Authorization": "Bearer scraper-secret-0123456789"}
        response = await c.get("/metrics", headers=right)
        assert response.status_code == 200
        assert "credits_graphql_request_duration_seconds" in response.text


async def test_the_time_budget_holds_over_the_websocket_path_too(
    make_app: MakeApp, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries and mutations over the socket run through Strawberry's ``stream``: the
    same budget applies there."""
    import api.graphql.account
    from api.auth import Principal
    from api.context import Context

    async def stuck(account_id: str) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(api.graphql.account, "get_account", stuck)
    application = make_app(operation_timeout_seconds=0.5)
    services = application.state.services
    schema = application.routes[0].endpoint.graphql.schema  # type: ignore[attr-defined]
    context = Context(
        principal=Principal(user_id="u", account_id="acct-slow-ws", roles=frozenset({Role.ADMIN})),
        settings=services.settings,
        gateway=services.gateway,
        book=services.book,
        queue=services.queue,
        live=services.live,
    )
    results = await schema.stream("{ creditAccount { balance } }", context_value=context)
    first = await anext(results)
    await results.aclose()
    assert first.errors[0].extensions["code"] == "TIMEOUT"
