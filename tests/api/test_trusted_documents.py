"""Trusted documents (api/trusted.py) over HTTP: a known hash runs the stored document,
an unknown one is PERSISTED_QUERY_NOT_FOUND and registers nothing, a hash must match the
text sent with it, the permission table still applies, arbitrary documents still run; the
page's operations.js is in sync with operations.graphql; a bad trusted document stops the
start-up."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.cost import MAX_ALIASES
from api.graphql.schema import build_schema
from api.trusted import PAGE_MODULE, SOURCES, TrustedDocumentError, page_module, read, sha256
from tests.conftest import Caller
from tests.support.ops import grant, key

TEXTS = {name: text for _, name, text in read()}
PAGE_JS = Path(PAGE_MODULE).with_name("billing.js")


async def by_hash(
    caller: Caller,
    name_or_hash: str,
    variables: dict[str, Any] | None = None,
    *,
    query: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    digest = sha256(TEXTS[name_or_hash]) if name_or_hash in TEXTS else name_or_hash
    body: dict[str, Any] = {
        "variables": variables or {},
        "extensions": {"persistedQuery": {"version": 1, "sha256Hash": digest}},
    }
    if query is not None:
        body["query"] = query
    return await caller.http.post(
        "/graphql",
        json=body,
        headers={"Authorization": f"Bearer {caller.token}", **(headers or {})},
    )


async def test_a_known_hash_runs_the_stored_document(admin: Caller) -> None:
    response = await by_hash(admin, "BillingAccount")
    assert response.status_code == 200
    sent = response.json()
    assert "errors" not in sent, sent
    assert sent["data"] == await admin.gql(TEXTS["BillingAccount"])
    assert sent["data"]["viewer"]["accountId"] == admin.account_id


async def test_a_platform_spend_by_hash(service: Caller, staff: Caller, account_id: str) -> None:
    await grant(staff, account_id, 1000)
    item = {"accountId": account_id, "userId": "u1", "processType": "POSTCARD", "quantity": 1}
    response = await by_hash(
        service, "ConsumeCredits", {"input": {**item, "idempotencyKey": key()}}
    )
    payload = response.json()["data"]["consumeCredits"]
    assert payload["errors"] == []
    assert payload["transaction"]["type"] == "USAGE"
    batch = [{**item, "idempotencyKey": key()} for _ in range(2)]
    response = await by_hash(service, "ConsumeCreditsBatch", {"inputs": batch})
    assert [p["errors"] for p in response.json()["data"]["consumeCreditsBatch"]] == [[], []]
    assert response.json()["data"]["consumeCreditsBatch"][-1]["balance"] < payload["balance"]


async def test_an_unknown_hash_is_not_found_and_nothing_is_registered(admin: Caller) -> None:
    text = "{ viewer { accountId } }"
    digest = sha256(text)
    for accept in ("application/json", "application/graphql-response+json"):
        response = await by_hash(admin, digest, headers={"Accept": accept})
        assert response.status_code == 200  # as Apollo Server: its clients read the code
        assert response.headers["cache-control"].startswith("private, no-cache")
        error = response.json()["errors"][0]
        assert error["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"
    # Apollo's registration shape: the text runs (as any text) but is not remembered.
    sent = await by_hash(admin, digest, query=text)
    assert sent.json() == {"data": {"viewer": {"accountId": admin.account_id}}}
    again = await by_hash(admin, digest)
    assert again.json()["errors"][0]["extensions"]["code"] == "PERSISTED_QUERY_NOT_FOUND"


async def test_a_hash_must_match_the_text_sent_with_it(admin: Caller) -> None:
    response = await by_hash(admin, "Viewer", query="{ creditAccount { balance } }")
    body = response.json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_REQUEST"
    assert "does not match" in body["errors"][0]["message"]
    assert body.get("data") is None
    # The trusted text itself with its hash runs.
    same = await by_hash(admin, "Viewer", query=TEXTS["Viewer"])
    assert same.json()["data"]["viewer"]["accountId"] == admin.account_id


async def test_a_malformed_persisted_query_is_refused(admin: Caller) -> None:
    response = await admin.http.post(
        "/graphql",
        json={"extensions": {"persistedQuery": {"version": 2, "sha256Hash": "ab"}}},
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert response.json()["errors"][0]["extensions"]["code"] == "BAD_REQUEST"


async def test_permissions_still_apply_to_trusted_documents(user: Caller, admin: Caller) -> None:
    for name, variables in (
        ("UpdateAutoRecharge", {"input": {"enabled": False}}),
        (
            "ConsumeCredits",
            {
                "input": {
                    "accountId": user.account_id,
                    "userId": "u1",
                    "processType": "POSTCARD",
                    "quantity": 1,
                    "idempotencyKey": key(),
                }
            },
        ),
    ):
        body = (await by_hash(user, name, variables)).json()
        assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN", (name, body)
        assert body.get("data") is None
    # A trusted document's variables are still checked (types and storable text).
    body = (await by_hash(admin, "RemoveCard", {"id": None})).json()
    assert body["errors"] and body.get("data") is None
    body = (await by_hash(admin, "RemoveCard", {"id": "card\x00"})).json()
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_arbitrary_documents_still_run(admin: Caller) -> None:
    data = await admin.gql("query Mine { viewer { accountId roles } }")
    assert data == {"viewer": {"accountId": admin.account_id, "roles": ["ADMIN"]}}
    error = await admin.gql_error("{ viewer { noSuchField } }")
    assert "noSuchField" in error["message"]


def test_the_page_module_is_in_sync_with_its_operations() -> None:
    assert Path(PAGE_MODULE).read_text("utf-8") == page_module(), "run `make trusted`"
    used = set(re.findall(r'\bgql\("(\w+)"', PAGE_JS.read_text("utf-8")))
    billing = {name for source, name, _ in read() if source == "billing"}
    assert used == billing  # every call names a trusted operation; none is left unused


@pytest.mark.parametrize(
    "document",
    [
        "query Broken { viewer { noSuchField } }",
        # Past the cost limit (api/cost.py): too many aliases.
        "query Many { "
        + " ".join(f"a{i}: viewer {{ userId }}" for i in range(MAX_ALIASES + 1))
        + " }",
        # A name the page already uses.
        "query Viewer { viewer { userId } }",
        'mutation Bad { removeCard(input: {cardId: "a\\u0000b"}) { removedCardId } }',
    ],
)
def test_a_bad_trusted_document_stops_the_start_up(
    document: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bad.graphql"
    path.write_text(document, "utf-8")
    monkeypatch.setitem(SOURCES, "bad", path)
    with pytest.raises(TrustedDocumentError):
        build_schema()
