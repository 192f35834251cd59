"""The Starlette application: GraphQL on /graphql, health checks, lifespan."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from strawberry.asgi import GraphQL
from tortoise.contrib.starlette import RegisterTortoise

from api.auth import AuthError, Principal, bearer_token, verify_token
from api.context import Context
from api.schema import schema
from billing import sql
from billing.accounts import record_member
from billing.db import tortoise_config
from billing.enums import Role
from billing.gateways import PaymentGateway
from billing.gateways.factory import make_gateway
from billing.pricing import PriceBook, load_price_book
from billing.settings import Settings, get_settings

log = logging.getLogger(__name__)
ANONYMOUS = Principal(user_id="", account_id="", roles=frozenset())


class CreditsGraphQL(GraphQL[Context, None]):
    """Strawberry's ASGI app with our context (the principal is set by ``GraphQLEndpoint``)."""

    def __init__(self, settings: Settings, gateway: PaymentGateway, book: PriceBook) -> None:
        super().__init__(
            schema,
            graphql_ide="graphiql" if settings.show_graphiql else None,
            allow_queries_via_get=False,
        )
        self.settings, self.gateway, self.book = settings, gateway, book

    async def get_context(self, request: Any, response: Any) -> Context:
        principal: Principal = request.scope["state"]["principal"]
        return Context(
            principal=principal,
            settings=self.settings,
            gateway=self.gateway,
            book=self.book,
            request=request,
            response=response,
        )


class GraphQLEndpoint:
    """Authenticates every GraphQL request (HTTP 401 without a valid token) except the
    GraphiQL page itself, then hands over to Strawberry."""

    def __init__(self, graphql: CreditsGraphQL, settings: Settings) -> None:
        self.graphql = graphql
        self.settings = settings
        self._seen: OrderedDict[tuple[object, ...], None] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            # The GraphiQL page itself needs no token (a browser can't send one when it
            # navigates); it executes nothing, since queries are POST-only.
            wants_page = (
                request.method == "GET"
                and "text/html" in request.headers.get("accept", "")
                and "query" not in request.query_params
            )
            if wants_page:
                scope.setdefault("state", {})["principal"] = ANONYMOUS
            else:
                try:
                    principal = verify_token(
                        bearer_token(request.headers.get("authorization")), self.settings
                    )
                except AuthError as exc:
                    response = JSONResponse(
                        {
                            "errors": [
                                {
                                    "message": f"Unauthenticated: {exc}",
                                    "extensions": {"code": "UNAUTHENTICATED"},
                                }
                            ]
                        },
                        status_code=401,
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                    )
                    await response(scope, receive, send)
                    return
                await self._provision(principal)
                scope.setdefault("state", {})["principal"] = principal
        await self.graphql(scope, receive, send)

    async def _provision(self, p: Principal) -> None:
        """The first valid token naming an account creates it; members are remembered."""
        key = (p.account_id, p.user_id, p.email, p.name, Role.ADMIN in p.roles)
        if key in self._seen:
            return
        if not p.roles <= {Role.SERVICE}:  # a service token names no person
            await record_member(
                p.account_id, p.user_id, p.email, p.name, is_admin=Role.ADMIN in p.roles
            )
        else:
            from billing.accounts import ensure_account

            await ensure_account(p.account_id)
        self._seen[key] = None
        if len(self._seen) > 10_000:
            self._seen.popitem(last=False)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    try:
        await sql.fetch("SELECT 1 AS ok")
    except Exception as exc:  # any failure means not ready
        log.warning("readiness check failed: %s", exc)
        return JSONResponse({"status": "unavailable", "database": "down"}, status_code=503)
    return JSONResponse({"status": "ok", "database": "up"})


def create_app(
    settings: Settings | None = None, *, gateway: PaymentGateway | None = None
) -> Starlette:
    settings = settings or get_settings()
    gateway = gateway or make_gateway(settings)
    book = load_price_book(settings.price_book_path)
    graphql = GraphQLEndpoint(CreditsGraphQL(settings, gateway, book), settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with RegisterTortoise(app, config=tortoise_config(settings.database_url)):
            yield

    app = Starlette(
        routes=[
            Route("/graphql", graphql, methods=["GET", "POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
        ],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.gateway = gateway
    app.state.book = book
    return app
