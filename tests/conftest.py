"""Shared fixtures: the app on SQLite and (when TEST_DATABASE_URL is set) PostgreSQL,
a GraphQL client over HTTP, and signed tokens for every role."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette

from api.asgi import create_app
from api.auth import issue_token
from billing.accounts import forget_cached_accounts
from billing.enums import Role
from billing.payments.gateways import PaymentGateway
from billing.payments.gateways.sandbox import SandboxGateway
from runtime.db import migrate
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.support.gateways import (
    CountingStripeGateway,
    GatewayHarness,
    SandboxHarness,
    StripeHarness,
    run_localstripe,
)
from tests.support.mailbox import SmtpServer, run_smtp
from workers.jobs import all_functions

TEST_SECRET = "test-secret-that-is-long-enough-0123456789"
PG_URL = os.environ.get("TEST_DATABASE_URL", "")
# One backend per pytest process (Tortoise caches SQL per model, so a process talks to one
# dialect); `make test` runs the suite once per backend.
BACKEND = os.environ.get("TEST_BACKEND", "sqlite")
if BACKEND not in ("sqlite", "postgres"):
    raise RuntimeError("TEST_BACKEND must be sqlite or postgres")
if BACKEND == "postgres" and not PG_URL:
    raise RuntimeError("TEST_BACKEND=postgres needs TEST_DATABASE_URL")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgres://", "postgresql://", 1)


def pytest_report_header() -> str:
    return f"database backend: {BACKEND}"


@pytest_asyncio.fixture(scope="session")
async def db_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A freshly migrated database for the whole session."""
    forget_cached_accounts()
    if BACKEND == "sqlite":
        path = tmp_path_factory.mktemp("db") / "credits.sqlite3"
        url = f"sqlite://{path}"
        await migrate(url)
        yield url
        return
    name = f"credits_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(_asyncpg_dsn(PG_URL))  # type: ignore[no-untyped-call]
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    url = _with_database(PG_URL, name)
    await migrate(url)
    yield url
    forget_cached_accounts()
    admin = await asyncpg.connect(_asyncpg_dsn(PG_URL))  # type: ignore[no-untyped-call]
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def backend(db_url: str) -> str:
    return "postgres" if db_url.startswith("postgres") else "sqlite"


GATEWAYS = [g for g in os.environ.get("TEST_GATEWAYS", "sandbox,stripe").split(",") if g]
WEBHOOK_SECRET = "whsec_test_secret_for_the_suite"


@pytest.fixture(scope="session")
def localstripe_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """localstripe on loopback, from scratch, for the whole session."""
    yield from run_localstripe(tmp_path_factory.mktemp("localstripe"))


@pytest.fixture(scope="session", params=GATEWAYS)
def gateway_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="session")
def settings(db_url: str, gateway_name: str, request: pytest.FixtureRequest) -> Settings:
    extra: dict[str, Any] = {}
    if gateway_name == "stripe":
        extra = {
            "stripe_api_key": "sk_test_suite",
            "stripe_webhook_secret": WEBHOOK_SECRET,
            "stripe_api_base": request.getfixturevalue("localstripe_url"),
        }
    return Settings(
        database_url=db_url,
        credits_jwt_secret=TEST_SECRET,
        credits_env="development",
        payment_gateway=gateway_name,
        periodic_seconds=0,  # tests run the periodic jobs themselves
        _env_file=None,
        **extra,
    )


@pytest.fixture(scope="session")
def harness(settings: Settings, gateway_name: str) -> GatewayHarness:
    if gateway_name == "stripe":
        assert settings.stripe_api_base is not None
        stripe_gateway = CountingStripeGateway(
            "sk_test_suite", api_base=settings.stripe_api_base, max_network_retries=0
        )
        return StripeHarness(stripe_gateway, settings.stripe_api_base)
    return SandboxHarness(SandboxGateway())


@pytest.fixture(scope="session")
def gateway(harness: GatewayHarness) -> PaymentGateway:
    """The gateway instance the app uses (it counts its charges: charge_count)."""
    gw: PaymentGateway = harness.gateway
    return gw


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    """An SMTP server on loopback that the test reads mail from."""
    yield from run_smtp()


@pytest.fixture(scope="session")
def queue() -> InProcessQueue:
    """The app's job queue (in process); ``await queue.drain()`` waits for its jobs."""
    return InProcessQueue(all_functions())


@pytest_asyncio.fixture(scope="session")
async def app(
    settings: Settings, harness: GatewayHarness, queue: InProcessQueue
) -> AsyncIterator[Starlette]:
    application = create_app(settings, gateway=harness.gateway, queue=queue)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture
async def http(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@dataclass
class Caller:
    """Someone with a token, talking GraphQL over HTTP."""

    http: httpx.AsyncClient
    token: str
    account_id: str
    user_id: str
    harness: GatewayHarness | None = None

    async def raw(self, query: str, variables: dict[str, Any] | None = None) -> httpx.Response:
        if self.harness is not None:  # the browser's Stripe Elements, for Stripe's test cards
            query = await self.harness.translate(query)
            variables = await self.harness.translate(variables or {})
        return await self.http.post(
            "/graphql",
            json={"query": query, "variables": variables or {}},
            headers={"Authorization": f"Bearer {self.token}"},
        )

    async def gql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run an operation that must succeed without top-level errors; return ``data``."""
        response = await self.raw(query, variables)
        assert response.status_code == 200, response.text
        body = response.json()
        assert "errors" not in body, body
        return cast("dict[str, Any]", body["data"])

    async def gql_error(
        self, query: str, variables: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run an operation that must fail at the top level; return the first error."""
        response = await self.raw(query, variables)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body.get("errors"), body
        return cast("dict[str, Any]", body["errors"][0])


MakeCaller = Callable[..., Caller]


@pytest.fixture
def account_id() -> str:
    return f"acct-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def caller(http: httpx.AsyncClient, settings: Settings, harness: GatewayHarness) -> MakeCaller:
    def make(
        account: str,
        *roles: Role,
        user: str | None = None,
        email: str | None = None,
        name: str | None = None,
    ) -> Caller:
        user_id = user or f"user-{uuid.uuid4().hex[:8]}"
        token = issue_token(
            settings, account_id=account, user_id=user_id, roles=roles, email=email, name=name
        )
        return Caller(http, token, account, user_id, harness)

    return make


@pytest.fixture
def admin(caller: MakeCaller, account_id: str) -> Caller:
    return caller(account_id, Role.ADMIN, email="admin@example.com", name="Ada Admin")


@pytest.fixture
def service(caller: MakeCaller, account_id: str) -> Caller:
    return caller(account_id, Role.SERVICE, user="svc-letters")


@pytest.fixture
def staff(caller: MakeCaller) -> Caller:
    return caller("vendor", Role.BILLING_STAFF, user="staff-1", email="accounting@vendor.test")


@pytest.fixture
def user(caller: MakeCaller, account_id: str) -> Caller:
    return caller(account_id, Role.USER)


def new_key() -> str:
    return uuid.uuid4().hex


ROOT = Path(__file__).resolve().parent.parent
