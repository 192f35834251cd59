"""Authentication: HTTP 401 without a valid token; lazy accounts; the dev token command."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from api.devtoken import main as devtoken_main
from billing.models import Account, Member
from tests.conftest import TEST_SECRET, Caller, MakeCaller
from tests.support.ops import BALANCE

VIEWER = "{ viewer { userId accountId roles email name } }"


async def _post(http, token: str | None, query: str = VIEWER):  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return await http.post("/graphql", json={"query": query}, headers=headers)


def _token(claims: dict[str, Any], secret: str = TEST_SECRET, alg: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=alg)


def _claims(**over: object) -> dict[str, Any]:
    base = {
        "sub": "u1",
        "account_id": "acct-auth",
        "roles": ["ADMIN"],
        "exp": int(time.time()) + 600,
    }
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


async def test_missing_token_is_401(http) -> None:  # type: ignore[no-untyped-def]
    response = await _post(http, None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        _token(_claims(exp=int(time.time()) - 3600)),  # expired
        _token(_claims(), secret="another-secret-that-is-also-long-enough!!"),  # forged
        _token(_claims(exp=None)),  # no exp
        _token(_claims(account_id=None)),  # no account
        _token(_claims(roles="ADMIN")),  # roles not a list
        jwt.encode(_claims(), key="", algorithm="none")
        if False
        else "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0."
        "eyJzdWIiOiJ1MSIsImFjY291bnRfaWQiOiJhIiwicm9sZXMiOlsiQURNSU4iXSwiZXhwIjo5OTk5OTk5OTk5fQ.",
    ],
    ids=["garbage", "expired", "forged", "no-exp", "no-account", "roles-not-list", "alg-none"],
)
async def test_bad_tokens_are_401(http, token: str) -> None:  # type: ignore[no-untyped-def]
    response = await _post(http, token)
    assert response.status_code == 401


async def test_basic_scheme_is_401(http) -> None:  # type: ignore[no-untyped-def]
    response = await http.post(
        "/graphql", json={"query": VIEWER}, headers={"Authorization": "Basic dXNlcjpwYXNz"}
    )
    assert response.status_code == 401


async def test_viewer_echoes_the_token(caller: MakeCaller, account_id: str) -> None:
    from billing.enums import Role

    me = caller(
        account_id, Role.USER, Role.ADMIN, user="u-7", email="u7@example.com", name="U Seven"
    )
    data = await me.gql(VIEWER)
    assert data["viewer"] == {
        "userId": "u-7",
        "accountId": account_id,
        "roles": ["ADMIN", "USER"],
        "email": "u7@example.com",
        "name": "U Seven",
    }


async def test_first_token_provisions_the_account_at_zero(admin: Caller) -> None:
    assert await Account.get_or_none(id=admin.account_id) is None
    assert (await admin.gql(BALANCE))["creditAccount"]["balance"] == 0
    account = await Account.get(id=admin.account_id)
    assert account.balance == 0
    member = await Member.get(account_id=admin.account_id, user_id=admin.user_id)
    assert (member.email, member.is_admin) == ("admin@example.com", True)


def test_devtoken_prints_a_token_the_service_accepts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.settings import get_settings

    monkeypatch.setenv("CREDITS_JWT_SECRET", TEST_SECRET)
    get_settings.cache_clear()
    try:
        assert (
            devtoken_main(["--account", "acme", "--user", "ada", "--roles", "ADMIN,SERVICE"]) == 0
        )
    finally:
        get_settings.cache_clear()
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS256"])
    assert claims["account_id"] == "acme" and claims["sub"] == "ada"
    assert claims["roles"] == ["ADMIN", "SERVICE"]
    assert claims["exp"] > time.time()


def test_short_secret_refuses_to_start() -> None:
    from pydantic import ValidationError

    from runtime.settings import Settings

    with pytest.raises(ValidationError, match="at least 32 bytes"):
        Settings(credits_jwt_secret="short", _env_file=None)
    with pytest.raises(ValidationError, match="required"):
        Settings(credits_env="production", _env_file=None)
