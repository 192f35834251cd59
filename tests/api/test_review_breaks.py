"""Attacks on the speed pass's caches, checked in review and found to hold (kept as
regressions): a document's cached facts are not reused for another operation of the same
text, aliases and fragments hide no root field from the permission table, a trusted hash
runs only for a role the table lets run it, and a remembered token is not accepted once
the secret or the audience it was verified with has changed."""

from __future__ import annotations

from typing import Any, cast

import pytest
from pydantic import SecretStr

from api.auth import AuthError, authenticate, issue_token
from api.trusted import read, sha256
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import Caller

TWO = """
query Who { viewer { userId } }
mutation Grant {
  grantCredits(input: {accountId: "acct-x", credits: 5, reason: "r", idempotencyKey: "k"}) {
    errors { code }
  }
}
"""


async def post(caller: Caller, body: dict[str, Any]) -> dict[str, Any]:
    response = await caller.http.post(
        "/graphql", json=body, headers={"Authorization": f"Bearer {caller.token}"}
    )
    assert response.status_code == 200, response.text
    return cast("dict[str, Any]", response.json())


async def test_facts_of_one_operation_are_not_reused_for_another(user: Caller) -> None:
    allowed = await post(user, {"query": TWO, "operationName": "Who"})
    assert allowed["data"]["viewer"]["userId"] == user.user_id
    refused = await post(user, {"query": TWO, "operationName": "Grant"})
    assert refused["data"] is None
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"


async def test_aliases_and_fragments_hide_no_root_field(user: Caller) -> None:
    query = """
    mutation Hidden { ...M }
    fragment M on Mutation {
      ... on Mutation {
        viewer: grantCredits(
          input: {accountId: "acct-x", credits: 5, reason: "r", idempotencyKey: "k"}
        ) { errors { code } }
      }
    }
    """
    refused = await post(user, {"query": query})
    assert refused["data"] is None
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"


async def test_a_trusted_hash_runs_only_for_a_role_the_table_allows(admin: Caller) -> None:
    digest = next(sha256(text) for _, name, text in read() if name == "ConsumeCredits")
    refused = await post(
        admin,
        {
            "operationName": "ConsumeCredits",
            "variables": {
                "input": {
                    "accountId": admin.account_id,
                    "userId": admin.user_id,
                    "processType": "POSTCARD",
                    "quantity": 1,
                    "idempotencyKey": "k-1",
                }
            },
            "extensions": {"persistedQuery": {"version": 1, "sha256Hash": digest}},
        },
    )
    assert refused["data"] is None
    assert refused["errors"][0]["extensions"]["code"] == "FORBIDDEN"


@pytest.mark.parametrize("change", ["secret", "audience"])
async def test_a_remembered_token_is_refused_once_what_verified_it_changed(
    settings: Settings, change: str
) -> None:
    token = issue_token(settings, account_id="acct-cache", user_id="u-1", roles=[Role.ADMIN])
    assert (await authenticate(token, settings)).user_id == "u-1"
    if change == "secret":
        other = settings.model_copy(update={"credits_jwt_secret": SecretStr("s" * 40)})
    else:
        other = settings.model_copy(update={"credits_jwt_audience": "someone-else"})
    with pytest.raises(AuthError):
        await authenticate(token, other)
