"""GraphQL hardening: depth, alias and token limits, introspection, masked errors, batches,
and where GraphiQL is served."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from graphql import get_introspection_query, parse, specified_rules, validate
from starlette.applications import Starlette

import tests.support.ops as ops
from api.auth import issue_token
from api.bounded import validation_cache_info
from api.cost import document_costs
from api.graphiql import PAGE_PATH
from api.graphql.schema import MAX_ALIASES, MAX_FIELDS, MAX_QUERY_DEPTH, MAX_TOKENS, schema
from billing.enums import Role
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import Caller, MakeCaller
from tests.support.gateways import GatewayHarness
from workers.jobs import all_functions

# The billing page's first load, everything at once (a generous stand-in for the web app).
BILLING_PAGE = f"""query BillingPage($first: Int, $after: String, $filter: TransactionFilter) {{
  viewer {{ userId accountId roles email name }}
  creditPricing {{
    centsPerCredit currency minPurchaseCredits maxPurchaseCredits version
    processes {{ processType billing creditsPerUnit freeMonthlyQuota centsPerUnit }}
  }}
  creditAccount {{
    id balance flaggedReason flaggedAt
    cards {{ {ops.CARD_FIELDS} }}
    autoRecharge {{
      enabled trigger intervalDays thresholdCredits rechargeCredits usePrimaryCard
      card {{ {ops.CARD_FIELDS} }}
      notify notifyEmails monthlyLimitCredits nextRunAt lastRunAt consecutiveFailures pausedReason
    }}
    freeQuotas {{ processType allowance used periodStart periodEnd }}
    transactions(first: $first, after: $after, filter: $filter) {{
      edges {{ cursor node {{ {ops.TX_FIELDS} payment {{ card {{ {ops.CARD_FIELDS} }} }} }} }}
      pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
    }}
  }}
}}"""


def _page_examples() -> dict[str, str]:
    html = PAGE_PATH.read_text()
    block = re.search(
        r'<script type="application/json" id="examples-data">(.*?)</script>', html, re.S
    )
    assert block is not None
    examples: dict[str, str] = json.loads(block.group(1))
    return examples


def _operations() -> dict[str, str]:
    found = {
        name: value
        for name, value in vars(ops).items()
        if name.isupper() and isinstance(value, str) and value.lstrip().startswith(("{", "q", "m"))
    }
    found["BILLING_PAGE"] = BILLING_PAGE
    found["INTROSPECTION"] = get_introspection_query(
        descriptions=True,
        specified_by_url=True,
        directive_is_repeatable=True,
        schema_description=True,
        input_value_deprecation=True,
    )
    for name, query in _page_examples().items():
        found[f"graphiql:{name}"] = query
    return found


@pytest.mark.parametrize("query", _operations().values(), ids=_operations().keys())
def test_real_operations_fit_well_under_the_limits(query: str) -> None:
    """Every operation the tests (our stand-in for the billing page and the services) and
    GraphiQL send passes the limits with room to spare: half the tokens and aliases, two
    levels of depth (the deepest real path, a history entry's card's address, is 8), and
    a quarter of the fields."""
    document = parse(query, max_tokens=MAX_TOKENS // 2)
    assert validate(schema._schema, document, specified_rules) == []
    for cost in document_costs(document).values():
        assert cost.depth <= MAX_QUERY_DEPTH - 2
        assert cost.aliases <= MAX_ALIASES // 2
        assert cost.fields <= MAX_FIELDS // 4


async def _errors(who: Caller, query: str) -> list[str]:
    response = await who.raw(query)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.get("data") is None, body
    return [e["message"] for e in body["errors"]]


async def test_depth_limit(admin: Caller) -> None:
    # The schema has no cycles today, so only made-up fields nest this deep: the limit
    # is checked on the document before field validation, and says so.
    deep = "{ creditAccount " + "{ a " * (MAX_QUERY_DEPTH + 1) + "}" * (MAX_QUERY_DEPTH + 2)
    messages = await _errors(admin, deep)
    assert f"'anonymous' exceeds maximum operation depth of {MAX_QUERY_DEPTH}" in messages
    # Far deeper is stopped by the parser itself, still as a GraphQL error, not a 500.
    abyss = "{ viewer " + "{ userId " * 400 + "}" * 401
    assert any("nested too deeply" in m for m in await _errors(admin, abyss))


async def test_alias_limit(admin: Caller) -> None:
    fits = "{" + " ".join(f"b{i}: creditAccount {{ balance }}" for i in range(MAX_ALIASES)) + "}"
    assert (await admin.gql(fits))["b0"] == {"balance": 0}
    abusive = "{" + " ".join(f"b{i}: viewer {{ userId }}" for i in range(MAX_ALIASES + 1)) + "}"
    assert await _errors(admin, abusive) == [
        f"{MAX_ALIASES + 1} aliases found. Allowed: {MAX_ALIASES}"
    ]


async def test_token_limit(admin: Caller) -> None:
    abusive = "{ viewer { " + "userId " * MAX_TOKENS + "} }"
    (message,) = await _errors(admin, abusive)
    assert f"Document contains more than {MAX_TOKENS} tokens. Parsing aborted." in message


async def test_validation_is_cached(admin: Caller) -> None:
    await admin.gql(ops.BALANCE)
    hits = validation_cache_info().hits
    await admin.gql(ops.BALANCE)
    assert validation_cache_info().hits == hits + 1


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


INTROSPECT = "{ __schema { queryType { name } } }"


async def _introspect(application: Starlette, settings: Settings) -> dict[str, Any]:
    token = issue_token(settings, account_id="acct-introspect", user_id="u", roles=[Role.ADMIN])
    async with client(application) as c:
        response = await c.post(
            "/graphql", json={"query": INTROSPECT}, headers={"Authorization": f"Bearer {token}"}
        )
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


async def test_introspection_on_in_development(admin: Caller) -> None:
    assert (await admin.gql(INTROSPECT))["__schema"]["queryType"]["name"] == "Query"


async def test_introspection_off_in_production(make_app: MakeApp, settings: Settings) -> None:
    application = make_app(credits_env="production")
    body = await _introspect(application, settings)
    assert body["data"] is None
    assert "introspection has been disabled" in body["errors"][0]["message"]
    # __typename is not introspection of the schema: still fine.
    token = issue_token(settings, account_id="acct-introspect", user_id="u", roles=[Role.ADMIN])
    async with client(application) as c:
        response = await c.post(
            "/graphql",
            json={"query": "{ __typename viewer { userId } }"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.json()["data"] == {"__typename": "Query", "viewer": {"userId": "u"}}


async def test_introspection_can_be_turned_on_in_production(
    make_app: MakeApp, settings: Settings
) -> None:
    application = make_app(credits_env="production", graphql_introspection=True)
    body = await _introspect(application, settings)
    assert body == {"data": {"__schema": {"queryType": {"name": "Query"}}}}


async def test_unexpected_exceptions_are_masked(
    admin: Caller, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(account_id: str) -> Any:
        raise RuntimeError("connection to db-primary.internal:5432 refused (password=hunter2)")

    monkeypatch.setattr("api.graphql.account.get_account", broken)
    with caplog.at_level(logging.ERROR):
        response = await admin.raw(ops.BALANCE)
    assert response.status_code == 200
    body = response.json()
    assert body["data"] is None
    (error,) = body["errors"]
    assert error["message"] == "Internal error."
    assert error["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
    assert "hunter2" not in response.text
    assert error["path"] == ["creditAccount"]
    # ...while the server's log keeps the real cause.
    assert "hunter2" in caplog.text


def _unexpected(code: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("credits_graphql_unexpected_errors_total", {"code": code})
    return value or 0.0


async def test_unexpected_failures_answer_as_failures_over_graphql_response_json(
    admin: Caller, http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GraphQL over HTTP: a client that accepts application/graphql-response+json gets real
    status codes: 500 (503 when the database is unavailable) and no data for an operation
    that failed for an unexpected reason, 400 for a document that can't run; each
    unexpected failure is counted. With application/json it stays 200."""
    from billing.errors import DatabaseUnavailable

    async def broken(account_id: str) -> Any:
        raise RuntimeError("a bug")

    async def busy(account_id: str) -> Any:
        raise DatabaseUnavailable("no database connection became free within 10 s")

    headers = {
        "Authorization": f"Bearer {admin.token}",
        "Accept": "application/graphql-response+json, application/json;q=0.9",
    }

    async def post(query: str) -> Any:
        return await http.post("/graphql", json={"query": query}, headers=headers)

    monkeypatch.setattr("api.graphql.account.get_account", broken)
    before = _unexpected("INTERNAL_SERVER_ERROR")
    response = await post(ops.BALANCE)
    assert response.status_code == 500, response.text
    assert response.headers["content-type"].startswith("application/graphql-response+json")
    body = response.json()
    assert "data" not in body
    assert body["errors"][0]["extensions"] == {"code": "INTERNAL_SERVER_ERROR"}
    assert _unexpected("INTERNAL_SERVER_ERROR") == before + 1
    plain = await admin.raw(ops.BALANCE)  # application/json: 200, data null, coded
    assert plain.status_code == 200 and plain.json()["data"] is None
    assert plain.json()["errors"][0]["extensions"]["code"] == "INTERNAL_SERVER_ERROR"

    monkeypatch.setattr("api.graphql.account.get_account", busy)
    response = await post(ops.BALANCE)
    assert response.status_code == 503, response.text
    (error,) = response.json()["errors"]
    assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE"}
    assert "10 s" not in error["message"]

    response = await post("{ nosuchfield }")
    assert response.status_code == 400 and "data" not in response.json()
    response = await post("{ viewer { userId } }")  # a success is a 200 with data
    assert response.status_code == 200 and response.json()["data"]["viewer"]["userId"]


async def test_coded_errors_and_user_errors_stay_visible(
    caller: MakeCaller, account_id: str, admin: Caller, staff: Caller
) -> None:
    user = caller(account_id, Role.USER)
    forbidden = await user.gql_error(ops.BALANCE)
    assert forbidden["extensions"]["code"] == "FORBIDDEN"
    assert forbidden["message"] == "creditAccount needs the ADMIN role or the BILLING_STAFF role."
    bad_input = await staff.gql_error(ops.BALANCE)
    assert bad_input["extensions"]["code"] == "BAD_USER_INPUT"
    assert bad_input["message"] == "Billing staff must name an accountId."
    # A UserError is data, never masked.
    payload = await ops.buy(admin, 0)
    assert ops.codes(payload) and payload["errors"][0]["field"] == ["credits"]
    # GraphQL's own validation errors are shown as they are.
    invalid = await admin.gql_error("{ creditAccount { balanse } }")
    assert "Cannot query field 'balanse'" in invalid["message"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'[{"query": "{ viewer { userId } }"}]', "Batching is not enabled"),
        (b"[]", "Batching is not enabled"),
        (b'"{ viewer { userId } }"', "The request body must be a JSON object"),
        (b"42", "The request body must be a JSON object"),
        (b"null", "The request body must be a JSON object"),
        (b"{not json", "Unable to parse request body as JSON"),
    ],
    ids=["batch", "empty-batch", "string", "number", "null", "garbage"],
)
async def test_batches_and_odd_bodies_are_400_not_500(
    admin: Caller, body: bytes, message: str
) -> None:
    response = await admin.http.post(
        "/graphql",
        content=body,
        headers={"Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.text == message


async def test_graphiql_page_in_development(http: httpx.AsyncClient) -> None:
    response = await http.get("/graphql", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert "Purchase Credits · GraphiQL" in response.text
    assert "unpkg.com" not in response.text  # nothing loads from elsewhere
    csp = response.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self';" in csp
    assert "frame-ancestors 'none'" in csp
    # The real GraphiQL, vendored and served from this origin.
    for src in re.findall(r'<script src="([^"]+)"', response.text):
        assert src.startswith("/static/")
        script = await http.get(src)
        assert script.status_code == 200 and len(script.content) > 0


async def test_graphiql_page_in_production_only_when_enabled(make_app: MakeApp) -> None:
    async with client(make_app(credits_env="production")) as c:
        response = await c.get("/graphql", headers={"Accept": "text/html"})
        assert response.status_code == 404
    async with client(make_app(credits_env="production", graphiql_enabled=True)) as c:
        response = await c.get("/graphql", headers={"Accept": "text/html"})
        assert response.status_code == 200
        assert "Purchase Credits · GraphiQL" in response.text


async def test_a_failure_before_graphql_runs_answers_as_a_coded_failure(
    caller: MakeCaller, account_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first request of a caller records it (the account, the member) before GraphQL
    runs; the database failing there used to escape as a bare 500 page. Now it is the same
    coded, counted failure as inside GraphQL; the next request, once it is back, works."""
    from billing.errors import DatabaseUnavailable

    async def unavailable(*args: Any, **kwargs: Any) -> None:
        raise DatabaseUnavailable("no database connection became free within 10 s")

    admin = caller(account_id, Role.ADMIN, email="a@example.com")
    monkeypatch.setattr("api.endpoint.record_member", unavailable)
    before = _unexpected("SERVICE_UNAVAILABLE")
    response = await admin.raw(ops.BALANCE)
    assert response.status_code == 503, response.text
    (error,) = response.json()["errors"]
    assert error["extensions"] == {"code": "SERVICE_UNAVAILABLE"} and "10 s" not in response.text
    assert _unexpected("SERVICE_UNAVAILABLE") == before + 1
    monkeypatch.undo()
    assert (await admin.gql(ops.BALANCE))["creditAccount"]["balance"] == 0
