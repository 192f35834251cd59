"""What the spend path remembers between requests, and what it never carries across:

- what depends on the document only (its operations, their root fields, its string
  literals) is worked out once per distinct document text; who may run it, its variables
  and the operation a request names are judged on every request;
- a verified token is not verified again while it is valid, but is refused as soon as it
  expires or the key, secret, audience or issuer that verified it change.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pydantic import SecretStr
from starlette.applications import Starlette

from api import auth
from api.auth import AuthError, authenticate, issue_token, jwks_keys, verify_token
from billing.enums import Role
from runtime.settings import Settings
from tests.api.test_jwks import K1, K2, MakeApp, _settle, client, idp, make_app, post, production
from tests.conftest import TEST_SECRET, MakeCaller, new_key
from tests.support.identity import AUDIENCE, JwksServer

__all__ = ["idp", "make_app"]  # fixtures from tests.api.test_jwks

SPEND = """mutation Spend($i: ConsumeCreditsInput!) {
  consumeCredits(input: $i) { balance errors { code } }
}"""
VIEWER = "query Who { viewer { userId } }"


def _spend(account_id: str) -> dict[str, object]:
    return {
        "i": {
            "accountId": account_id,
            "userId": "u1",
            "processType": "POSTCARD",
            "quantity": 1,
            "idempotencyKey": new_key(),
        }
    }


async def test_one_document_is_judged_for_each_caller(caller: MakeCaller, account_id: str) -> None:
    """The same text, remembered once, is refused to an admin and run for a service, in
    any order: the permission check is per request."""
    service = caller(account_id, Role.SERVICE)
    admin = caller(account_id, Role.ADMIN)
    for _ in range(2):
        ran = await service.gql(SPEND, _spend(account_id))
        assert ran["consumeCredits"]["errors"] == [{"code": "INSUFFICIENT_CREDITS"}]
        refused = await admin.gql_error(SPEND, _spend(account_id))
        assert refused["extensions"]["code"] == "FORBIDDEN"
    # Another account, with the same document: a service spends for its own only.
    other = await service.gql_error(SPEND, _spend("acct-someone-else"))
    assert other["extensions"]["code"] == "FORBIDDEN"


async def test_documents_differing_in_one_literal_are_judged_apart(
    caller: MakeCaller, account_id: str
) -> None:
    staff = caller("vendor", Role.BILLING_STAFF)
    clean = '{ creditAccount(accountId: "' + account_id + '") { balance } }'
    dirty = '{ creditAccount(accountId: "' + account_id + '\\u0000") { balance } }'
    for _ in range(2):
        assert (await staff.gql(clean))["creditAccount"]["balance"] == 0
        error = await staff.gql_error(dirty)
        assert error["extensions"]["code"] == "BAD_USER_INPUT"
        assert "document" in error["message"]


async def test_variables_are_checked_on_every_request(caller: MakeCaller, account_id: str) -> None:
    """The document is remembered as clean; a request's variables are walked anew."""
    service = caller(account_id, Role.SERVICE)
    assert (await service.gql(SPEND, _spend(account_id)))["consumeCredits"]["errors"]
    bad = _spend(account_id)
    bad["i"]["reference"] = "ref\x00"  # type: ignore[index]
    error = await service.gql_error(SPEND, bad)
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert "$i" in error["message"]
    assert (await service.gql(SPEND, _spend(account_id)))["consumeCredits"]["errors"]


async def test_the_operation_is_the_one_each_request_names(
    caller: MakeCaller, account_id: str
) -> None:
    both = f"{VIEWER}\n{SPEND}"
    admin = caller(account_id, Role.ADMIN)

    async def run(name: str | None) -> dict[str, object]:
        body: dict[str, object] = {"query": both, "variables": _spend(account_id)}
        if name is not None:
            body["operationName"] = name
        response = await admin.http.post(
            "/graphql", json=body, headers={"Authorization": f"Bearer {admin.token}"}
        )
        result: dict[str, object] = response.json()
        return result

    for _ in range(2):
        assert await run("Who") == {"data": {"viewer": {"userId": admin.user_id}}}
        forbidden = await run("Spend")
        assert forbidden["errors"][0]["extensions"]["code"] == "FORBIDDEN"  # type: ignore[index]
        unnamed = await run(None)
        assert unnamed["errors"][0]["extensions"]["code"] == "BAD_REQUEST"  # type: ignore[index]


async def test_a_subscription_posted_is_refused_each_time(
    caller: MakeCaller, account_id: str
) -> None:
    admin = caller(account_id, Role.ADMIN)
    document = "subscription { creditBalanceChanged { balance } }"
    for _ in range(2):
        error = await admin.gql_error(document)
        assert error["extensions"]["code"] == "BAD_REQUEST"


# ---------------------------------------------------------------- verified tokens


def _settings(**update: object) -> Settings:
    return Settings(credits_jwt_secret=TEST_SECRET, _env_file=None).model_copy(update=update)


async def test_a_remembered_token_is_refused_once_it_expires(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(auth, "LEEWAY_SECONDS", 0)
    settings = _settings()
    token = issue_token(settings, account_id="acct-exp", user_id="u", roles=[], ttl_seconds=1)
    principal = await authenticate(token, settings)
    assert await authenticate(token, settings) == principal  # remembered
    assert verify_token(token, settings) == principal
    expires = auth._verified[token].expires_at
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(AuthError, match="expired"):
        await authenticate(token, settings)
    with pytest.raises(AuthError, match="expired"):
        verify_token(token, settings)
    assert token not in auth._verified


async def test_a_remembered_token_is_verified_again_when_the_settings_change() -> None:
    settings = _settings()
    token = issue_token(settings, account_id="acct-keys", user_id="u", roles=["ADMIN"])
    assert (await authenticate(token, settings)).account_id == "acct-keys"
    # Another shared secret: the token's signature no longer holds.
    rotated = _settings(credits_jwt_secret=SecretStr("another-secret-that-is-long-enough-987"))
    with pytest.raises(AuthError, match="Signature"):
        await authenticate(token, rotated)
    # An audience asked for now, which the token does not carry.
    with pytest.raises(AuthError, match="aud"):
        await authenticate(token, _settings(credits_jwt_audience=AUDIENCE))
    # Production with a JWKS: HS256 is not accepted at all any more.
    with pytest.raises(AuthError, match="not accepted"):
        await authenticate(
            token,
            _settings(credits_env="production", credits_jwks_url="http://127.0.0.1:9/jwks"),
        )
    assert (await authenticate(token, settings)).account_id == "acct-keys"


async def test_a_remembered_token_is_refused_once_its_key_leaves_the_jwks(
    idp: JwksServer, make_app: MakeApp
) -> None:
    application: Starlette = make_app(**production(idp, credits_jwks_cache_seconds=1))
    store = jwks_keys(application.state.services.settings)
    assert store is not None
    token = K1.sign(user_id="before-rotation")
    async with client(application) as c:
        assert (await post(c, token)).status_code == 200
        assert (await post(c, token)).status_code == 200  # remembered: no fetch
        assert idp.hits == 1
        idp.publish(K2)  # k1 withdrawn
        await asyncio.sleep(1.1)  # the set is stale: the next request refreshes it behind
        assert (await post(c, token)).status_code == 200
        await _settle(store)
        assert idp.hits == 2
        response = await post(c, token)
        assert response.status_code == 401, response.text


# ---------------------------------------------------------------- JSON out, the heap


def test_json_out_is_compact_and_takes_what_orjson_refuses() -> None:
    import json
    import logging

    from api.encoding import dumps
    from runtime import logs

    data = {"data": {"consumeCredits": {"balance": 7, "errors": []}}, "é": "ü"}
    assert json.loads(dumps(data)) == data
    assert b" " not in dumps(data)
    # A lone surrogate (quoted back in a syntax error, say): the standard encoder's way.
    assert json.loads(dumps({"message": "bad \ud800"})) == {"message": "bad \ud800"}
    assert json.loads(dumps({"n": 2**70})) == {"n": 2**70}
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "text %s", ("\ud800",), None)
    line = json.loads(logs.json_formatter().format(record))
    assert line["message"] == "text \ud800"
    assert line["level"] == "INFO"


def test_the_served_process_freezes_its_start_up_heap() -> None:
    """The ASGI entry point (what uvicorn imports) settles the heap once the app is built."""
    import subprocess
    import sys

    from api.heap import GEN0_THRESHOLD

    # uvicorn imports the module, then reads ``app`` from it (made on first use).
    probe = (
        "import gc; from api import asgi; asgi.app; "
        "print(gc.get_freeze_count() > 0, gc.get_threshold()[0])"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "CREDITS_ENV": "development"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", str(GEN0_THRESHOLD)]
