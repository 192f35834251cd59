"""Production auth: RS256 tokens verified against the identity provider's JWKS.

A JWKS is served on loopback by the test (tests/support/identity.py) with RSA keys the test makes.
The app under test shares the session's database; its settings differ only in auth.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import jwt
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette

from api.asgi import create_app
from api.auth import AuthError, authenticate, issue_token, jwks_keys, verify_token
from billing.enums import Role
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import TEST_SECRET
from tests.support.gateways import GatewayHarness
from tests.support.identity import AUDIENCE, ISSUER, JwksServer, SigningKey, run_jwks
from workers.jobs import all_functions

VIEWER = "{ viewer { userId accountId roles } }"
BALANCE = "{ creditAccount { balance } }"

# One key pair for the module (2048-bit RSA takes a moment to make).
K1 = SigningKey.new("k1")
K2 = SigningKey.new("k2")
STRANGER = SigningKey.new("k1")  # same kid as K1, another key: a forgery


@pytest.fixture
def idp() -> Iterator[JwksServer]:
    with run_jwks(K1) as server:
        yield server


MakeApp = Callable[..., Starlette]


@pytest.fixture
def make_app(app: Starlette, settings: Settings, harness: GatewayHarness) -> MakeApp:
    """An app with other auth settings, on the session's database (``app`` holds it open)."""

    def make(**update: Any) -> Starlette:
        changed = settings.model_copy(update=update)
        queue = InProcessQueue(all_functions())
        return create_app(changed, gateway=harness.gateway, queue=queue)

    return make


@asynccontextmanager
async def client(application: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


async def post(c: httpx.AsyncClient, token: str, query: str = VIEWER) -> httpx.Response:
    return await c.post(
        "/graphql", json={"query": query}, headers={"Authorization": f"Bearer {token}"}
    )


def production(idp: JwksServer, **more: Any) -> dict[str, Any]:
    return {
        "credits_env": "production",
        "credits_jwks_url": idp.url,
        "credits_jwt_audience": AUDIENCE,
        "credits_jwt_issuer": ISSUER,
        **more,
    }


async def test_rs256_token_from_the_jwks_is_accepted(idp: JwksServer, make_app: MakeApp) -> None:
    application = make_app(**production(idp))
    async with client(application) as c:
        response = await post(c, K1.sign(account_id="acct-rs256", user_id="ada"))
        assert response.status_code == 200, response.text
        assert response.json()["data"]["viewer"] == {
            "userId": "ada",
            "accountId": "acct-rs256",
            "roles": ["ADMIN"],
        }
        # The key is cached: more requests fetch nothing.
        for _ in range(3):
            response = await post(c, K1.sign(account_id="acct-rs256"), BALANCE)
            assert response.json() == {"data": {"creditAccount": {"balance": 0}}}
    assert idp.hits == 1


async def test_a_rotated_key_is_picked_up_without_a_restart(
    idp: JwksServer, make_app: MakeApp
) -> None:
    application = make_app(**production(idp))
    async with client(application) as c:
        assert (await post(c, K1.sign())).status_code == 200
        assert idp.hits == 1
        # The provider rotates: k2 published, k1 withdrawn.
        idp.publish(K2)
        response = await post(c, K2.sign(user_id="after-rotation"))
        assert response.status_code == 200, response.text
        assert response.json()["data"]["viewer"]["userId"] == "after-rotation"
        assert idp.hits == 2  # the unknown kid fetched the set once
        # The withdrawn key no longer verifies anything (and costs no fetch: cooldown).
        response = await post(c, K1.sign())
        assert response.status_code == 401
        assert idp.hits == 2
        # Made-up kids don't turn into fetches either.
        for i in range(5):
            assert (await post(c, K2.sign(kid=f"made-up-{i}"))).status_code == 401
        assert idp.hits == 2
        assert (await post(c, K2.sign())).status_code == 200


async def test_a_jwks_outage_does_not_take_down_cached_keys(
    idp: JwksServer, make_app: MakeApp
) -> None:
    application = make_app(**production(idp, credits_jwks_cache_seconds=1))
    store = jwks_keys(application.state.services.settings)
    assert store is not None
    async with client(application) as c:
        assert (await post(c, K1.sign())).status_code == 200
        # First the provider answers 503, then it is gone altogether.
        idp.status = 503
        await asyncio.sleep(1.1)  # the cached set is now stale: refreshed behind requests
        assert (await post(c, K1.sign())).status_code == 200
        await _settle(store)
        assert idp.hits == 2  # the refresh was tried, failed, and kept the keys
        idp.stop()
        for _ in range(3):
            assert (await post(c, K1.sign(), BALANCE)).status_code == 200
        # A key never seen can't be checked while the provider is down: 401, not 500.
        response = await post(c, K2.sign())
        assert response.status_code == 401
        assert "unavailable" in response.json()["errors"][0]["message"]
        assert (await post(c, K1.sign())).status_code == 200


async def _settle(store: Any) -> None:
    """Wait for a background refresh of ``store`` to finish."""
    deadline = time.monotonic() + 10
    while store._inflight is not None and not store._inflight.done():
        assert time.monotonic() < deadline, "the JWKS refresh did not finish"
        await asyncio.sleep(0.02)


async def test_a_jwks_fetch_does_not_block_the_event_loop(
    idp: JwksServer, make_app: MakeApp
) -> None:
    idp.delay = 0.6
    application = make_app(**production(idp))
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    try:
        async with client(application) as c:
            started = time.monotonic()
            assert (await post(c, K1.sign())).status_code == 200
            assert time.monotonic() - started >= 0.6  # it did wait for the provider...
    finally:
        task.cancel()
    assert max(gaps) < 0.3, max(gaps)  # ...while the loop went on


def _hs256(claims: dict[str, Any], secret: bytes, header: dict[str, Any]) -> str:
    """Sign by hand (PyJWT refuses to use a PEM public key as an HMAC secret)."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def _claims() -> dict[str, Any]:
    now = int(time.time())
    return {
        "sub": "mallory",
        "account_id": "acct-x",
        "roles": ["BILLING_STAFF"],
        "aud": AUDIENCE,
        "iss": ISSUER,
        "exp": now + 600,
    }


BAD_TOKENS: dict[str, Callable[[], str]] = {
    "wrong-audience": lambda: K1.sign(audience="another-service"),
    "no-audience": lambda: K1.sign(audience=None),
    "wrong-issuer": lambda: K1.sign(issuer="https://evil.example.test/"),
    "no-issuer": lambda: K1.sign(issuer=None),
    "expired": lambda: K1.sign(ttl=-3600),
    "forged-same-kid": lambda: STRANGER.sign(),
    "rs384": lambda: K1.sign(algorithm="RS384"),
    "ps256": lambda: K1.sign(algorithm="PS256"),
    "no-kid": lambda: jwt.encode(_claims(), K1.private, algorithm="RS256"),
    "alg-none": lambda: (
        _hs256(_claims(), b"", {"alg": "none", "kid": "k1"}).rsplit(".", 1)[0] + "."
    ),
    # Algorithm confusion: HS256 "signed" with the provider's public key as the secret.
    "hs256-with-public-key": lambda: _hs256(
        _claims(), K1.public_pem(), {"alg": "HS256", "kid": "k1", "typ": "JWT"}
    ),
    # A perfectly good development token: production with a JWKS accepts RS256 only.
    "hs256-with-the-secret": lambda: _hs256(
        _claims(), TEST_SECRET.encode(), {"alg": "HS256", "typ": "JWT"}
    ),
}


@pytest.mark.parametrize("make_token", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
async def test_bad_rs256_tokens_are_401(
    idp: JwksServer, make_app: MakeApp, make_token: Callable[[], str]
) -> None:
    application = make_app(**production(idp))
    async with client(application) as c:
        assert (await post(c, K1.sign())).status_code == 200  # the set is known
        response = await post(c, make_token())
        assert response.status_code == 401, response.text
        assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


async def test_development_takes_both_kinds_of_token(idp: JwksServer, make_app: MakeApp) -> None:
    application = make_app(credits_jwks_url=idp.url)  # development, no aud/iss configured
    settings = application.state.services.settings
    async with client(application) as c:
        dev = issue_token(settings, account_id="acct-dev", user_id="dev", roles=[Role.ADMIN])
        assert (await post(c, dev)).json()["data"]["viewer"]["userId"] == "dev"
        rs = K1.sign(user_id="idp-user", audience=None, issuer=None)
        assert (await post(c, rs)).json()["data"]["viewer"]["userId"] == "idp-user"
        # With no audience configured, a token naming one is refused (PyJWT's default).
        assert (await post(c, K1.sign())).status_code == 401
        # The public key is no HMAC secret here either.
        forged = _hs256(_claims(), K1.public_pem(), {"alg": "HS256", "typ": "JWT"})
        assert (await post(c, forged)).status_code == 401


async def test_audience_and_issuer_apply_to_hs256_too(make_app: MakeApp) -> None:
    application = make_app(credits_jwt_audience=AUDIENCE, credits_jwt_issuer=ISSUER)
    settings = application.state.services.settings
    good = issue_token(settings, account_id="acct-aud", user_id="u", roles=[Role.ADMIN])
    assert jwt.decode(good, options={"verify_signature": False})["aud"] == AUDIENCE
    plain = jwt.encode(
        {"sub": "u", "account_id": "a", "roles": [], "exp": int(time.time()) + 60},
        TEST_SECRET,
        algorithm="HS256",
    )
    async with client(application) as c:
        assert (await post(c, good)).status_code == 200
        assert (await post(c, plain)).status_code == 401


async def test_sync_verify_token_uses_cached_keys_only(idp: JwksServer) -> None:
    settings = Settings(
        credits_jwt_secret=TEST_SECRET,
        credits_jwks_url=idp.url,
        credits_jwt_audience=AUDIENCE,
        credits_jwt_issuer=ISSUER,
        _env_file=None,
    )
    token = K1.sign(user_id="sync")
    with pytest.raises(AuthError, match="unknown signing key"):
        verify_token(token, settings)  # it never fetches
    assert (await authenticate(token, settings)).user_id == "sync"
    assert verify_token(token, settings).user_id == "sync"


def test_production_needs_a_jwks_or_a_secret() -> None:
    stripe: dict[str, Any] = {
        "payment_gateway": "stripe",
        "stripe_api_key": "sk_test_x",
        "stripe_webhook_secret": "whsec_x",
        "_env_file": None,
    }
    with pytest.raises(ValidationError, match=r"CREDITS_JWKS_URL .* or CREDITS_JWT_SECRET"):
        Settings(credits_env="production", **stripe)
    jwks_only = Settings(
        credits_env="production", credits_jwks_url="https://id.example.test/jwks", **stripe
    )
    assert not jwks_only.hs256_enabled and jwks_only.credits_jwt_secret is None
    both = Settings(
        credits_env="production",
        credits_jwks_url="https://id.example.test/jwks",
        credits_jwt_secret=TEST_SECRET,
        **stripe,
    )
    assert not both.hs256_enabled  # a JWKS in production means RS256 only
    secret_only = Settings(credits_env="production", credits_jwt_secret=TEST_SECRET, **stripe)
    assert secret_only.hs256_enabled
    with pytest.raises(ValidationError, match="https"):
        Settings(credits_env="production", credits_jwks_url="http://id.example.test/jwks", **stripe)
    with pytest.raises(ValidationError, match="http"):
        Settings(credits_jwks_url="file:///etc/passwd", _env_file=None)
    dev = Settings(credits_jwks_url="http://id.internal/jwks", _env_file=None)
    assert dev.hs256_enabled
