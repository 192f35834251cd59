"""`make run`'s server, started as a real process on loopback: the help article's flows.

This is the embedded default exactly as a person gets it (SQLite file, sandbox gateway,
migrations applied at start), driven over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from api.auth import issue_token
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import TEST_SECRET
from tests.support.embedded import serve_embedded


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    db = tmp_path_factory.mktemp("embedded") / "credits.sqlite3"
    yield from serve_embedded(db)
    assert Path(db).exists()


def _token(*roles: Role, account: str = "acme", user: str = "admin-1") -> str:
    settings = Settings(credits_jwt_secret=TEST_SECRET, _env_file=None)
    return issue_token(
        settings, account_id=account, user_id=user, roles=roles, email=f"{user}@example.com"
    )


def _gql(
    base: str, token: str, query: str, variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    response = httpx.post(
        f"{base}/graphql",
        json={"query": query, "variables": variables or {}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    return cast("dict[str, Any]", body["data"])


def test_health_and_readiness(server: str) -> None:
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/readyz").json()["database"] == "up"


def test_graphiql_page_is_served_without_a_token(server: str) -> None:
    response = httpx.get(f"{server}/graphql", headers={"Accept": "text/html"})
    assert response.status_code == 200
    assert "graphiql" in response.text.lower()


def test_no_token_is_401_over_real_http(server: str) -> None:
    response = httpx.post(f"{server}/graphql", json={"query": "{ viewer { userId } }"})
    assert response.status_code == 401


def test_help_article_flows_end_to_end(server: str) -> None:
    admin = _token(Role.ADMIN)
    svc = _token(Role.SERVICE, user="svc-postcards")
    # Add a credit card.
    card = _gql(
        server,
        admin,
        'mutation { addCard(input: {paymentMethodId: "pm_card_visa"}) '
        "{ card { id last4 isPrimary } errors { code } } }",
    )["addCard"]
    assert card["errors"] == [] and card["card"]["isPrimary"] is True
    # Edit it.
    edited = _gql(
        server,
        admin,
        "mutation($id: ID!) { updateCard(input: {cardId: $id, "
        'cardholderName: "Ada Admin", billingAddress: {city: "Dallas", country: "US"}}) '
        "{ card { cardholderName billingAddress { city country } } errors { code } } }",
        {"id": card["card"]["id"]},
    )["updateCard"]
    assert edited == {
        "card": {
            "cardholderName": "Ada Admin",
            "billingAddress": {"city": "Dallas", "country": "US"},
        },
        "errors": [],
    }
    # Buy credits.
    bought = _gql(
        server,
        admin,
        "mutation { purchaseCredits(input: {credits: 500, "
        'idempotencyKey: "buy-1"}) { payment { status } balance errors { code } } }',
    )
    assert bought["purchaseCredits"] == {
        "payment": {"status": "SUCCEEDED"},
        "balance": 500,
        "errors": [],
    }
    # A platform service spends.
    spent = _gql(
        server,
        svc,
        'mutation { consumeCredits(input: {accountId: "acme", '
        'userId: "admin-1", processType: POSTCARD, quantity: 2, reference: "campaign-42", '
        'idempotencyKey: "pc-1"}) { balance errors { code } } }',
    )["consumeCredits"]
    assert spent["errors"] == [] and spent["balance"] < 500
    # Review and filter the history.
    history = _gql(
        server,
        admin,
        "{ creditAccount { balance transactions(first: 10, "
        'filter: {types: [USAGE], search: "CAMPAIGN"}) { edges { node { type '
        "credits reference user { userId email } } } } } }",
    )["creditAccount"]
    assert history["balance"] == spent["balance"]
    edges = history["transactions"]["edges"]
    assert [e["node"]["type"] for e in edges] == ["USAGE"]
    assert edges[0]["node"]["reference"] == "campaign-42"
    assert edges[0]["node"]["user"] == {"userId": "admin-1", "email": "admin-1@example.com"}
