"""The Starlette application: GraphQL on /graphql, health checks, lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import jwt
import stripe
from cross_web import HTTPException  # what Strawberry raises for a 4xx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.unset import UNSET, UnsetType
from tortoise.contrib.starlette import RegisterTortoise

from api import encoding, page
from api import metrics as api_metrics
from api.auth import AuthError, Principal, authenticate, bearer_token
from api.bodies import BoundedBody
from api.context import Context
from api.errors import (
    GRAPHQL_RESPONSE,
    INTERNAL_MESSAGE,
    UNAVAILABLE,
    UNAVAILABLE_MESSAGE,
    UNEXPECTED,
    code_of,
    status_for,
    wants_graphql_response,
)
from api.graphiql import graphiql_page
from api.observability import RequestIdMiddleware, readiness
from api.reports import transactions_csv
from api.schema import build_schema
from billing import webhooks
from billing.accounts import record_member
from billing.db import tortoise_config
from billing.enums import Role
from billing.gateways import PaymentGateway
from billing.gateways.factory import make_gateway
from billing.mailer import make_mailer
from billing.pricing import PriceBook, load_price_book
from billing.settings import Settings, get_settings
from workers.jobs import PERIODIC, all_functions
from workers.live import Broadcaster, InProcessBroadcaster, RedisBroadcaster
from workers.queue import ArqQueue, InProcessQueue, JobQueue

log = logging.getLogger(__name__)
ANONYMOUS = Principal(user_id="", account_id="", roles=frozenset())


MAX_OPERATIONS_PER_SOCKET = 20


class CreditsGraphQL(GraphQL[Context, None]):
    """Strawberry's ASGI app with our context (the principal is set by ``GraphQLEndpoint``)."""

    def __init__(self, services: Services) -> None:
        super().__init__(
            build_schema(services.settings),
            graphql_ide="graphiql" if services.settings.show_graphiql else None,
            allow_queries_via_get=False,
            subscription_protocols=(GRAPHQL_TRANSPORT_WS_PROTOCOL,),
            # A socket that never authenticates is closed (4408) as soon as an HTTP
            # request's head would be; one socket runs at most this many operations at once.
            connection_init_wait_timeout=timedelta(
                seconds=services.settings.header_timeout_seconds
            ),
            max_subscriptions_per_connection=MAX_OPERATIONS_PER_SOCKET,
        )
        self.services = services
        #: Set by ``GraphQLEndpoint``: records the caller a websocket authenticated.
        self.provision: Callable[[Principal], Awaitable[None]] | None = None

    async def render_graphql_ide(self, request: Request) -> Response:
        return graphiql_page(request)  # self-contained (no CDN); see api/graphiql.py

    def parse_json(self, data: str | bytes) -> Any:
        try:
            value = super().parse_json(data)
        except (ValueError, RecursionError) as exc:
            # Not a JSONDecodeError, so Strawberry would answer 500: invalid UTF-8, arrays
            # nested past the recursion limit, a number of more than 4,300 digits.
            raise HTTPException(400, "Unable to parse request body as JSON") from exc
        if not isinstance(value, dict | list):  # Strawberry would answer a bare 500
            raise HTTPException(400, "The request body must be a JSON object")
        return value  # a list (a batch) is refused by Strawberry: batching is off

    def encode_json(self, data: object) -> bytes:
        return encoding.dumps(data)  # orjson

    async def process_result(self, request: Request, result: ExecutionResult) -> Any:
        """With ``application/graphql-response+json``, real status codes (``api.errors``)."""
        processed = await super().process_result(request, result)
        if wants_graphql_response(request.headers.get("accept", "")):
            response = request.scope.get("state", {}).get("graphql_sub_response")
            if response is not None:
                response.status_code = status_for(processed)
                response.graphql_media_type = GRAPHQL_RESPONSE
        return processed

    def create_response(self, response_data: Any, sub_response: Response) -> Response:
        response = super().create_response(response_data, sub_response)
        media_type = getattr(sub_response, "graphql_media_type", None)
        if media_type is not None:
            response.headers["content-type"] = f"{media_type}; charset=utf-8"
        return response

    async def get_context(self, request: Any, response: Any) -> Context:
        if hasattr(request, "scope"):  # for process_result (an HTTP request's response)
            request.scope.setdefault("state", {})["graphql_sub_response"] = response
        # A websocket is anonymous until its connection_init is accepted (on_ws_connect).
        principal: Principal = request.scope.get("state", {}).get("principal", ANONYMOUS)
        s = self.services
        return Context(
            principal=principal,
            settings=s.settings,
            gateway=s.gateway,
            book=s.book,
            queue=s.queue,
            live=s.live,
            request=request,
            response=response,
        )

    async def on_ws_connect(self, context: Context) -> UnsetType | dict[str, object] | None:
        """graphql-transport-ws: the bearer token comes in ``connection_init``'s payload,
        ``{"authorization": "Bearer <token>"}``; without a valid one the socket is closed
        with 4403 Forbidden."""
        params = context.connection_params or {}
        header = params.get("authorization", params.get("Authorization"))
        try:
            token = bearer_token(header if isinstance(header, str) else None)
            principal = await authenticate(token, self.services.settings)
        except AuthError as exc:
            log.info("refused a websocket: %s", exc)
            raise ConnectionRejectionError({"message": f"Unauthenticated: {exc}"}) from exc
        if self.provision is not None:
            await self.provision(principal)
        context.principal = principal
        context.token_expires_at = expires_at = _expires_at(token)
        socket = context.request
        if expires_at is not None and isinstance(socket, WebSocket):
            # The socket ends with its token (GraphQLEndpoint cancels this when it ends first).
            closer = asyncio.create_task(_close_at(socket, expires_at))
            socket.scope.setdefault("state", {})["token_closer"] = closer
        return UNSET


class GraphQLEndpoint:
    """Authenticates every GraphQL request (HTTP 401 without a valid token) except the
    GraphiQL page itself, then hands over to Strawberry."""

    def __init__(self, graphql: CreditsGraphQL, settings: Settings) -> None:
        self.graphql = graphql
        self.settings = settings
        self._seen: OrderedDict[tuple[object, ...], None] = OrderedDict()
        # A websocket carries its token in its first message, which Strawberry reads.
        graphql.provision = self._provision

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
                    principal = await authenticate(
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
                # The body was read already, within its bounds: api.bodies.BoundedBody.
                try:
                    await self._provision(principal)
                except Exception as exc:  # outside GraphQL: answer as its masking would
                    log.exception("could not record the caller of a GraphQL request")
                    await _unexpected(exc)(scope, receive, send)
                    return
                scope.setdefault("state", {})["principal"] = principal
        elif scope["type"] == "websocket":
            receive = _bounded_socket(receive, send, self.settings.max_body_bytes)
            try:
                await self.graphql(scope, receive, send)
            finally:
                closer = scope.get("state", {}).pop("token_closer", None)
                if closer is not None:
                    closer.cancel()
            return
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


#: A subscription's feed ends at the token's ``exp`` with an ``UNAUTHENTICATED`` event; the
#: socket is closed just after, so that event is delivered first.
CLOSE_AFTER_EXPIRY_SECONDS = 1.0
TOKEN_EXPIRED = 4401  # graphql-transport-ws's "Unauthorized"


def _unexpected(exc: Exception) -> Response:
    code = code_of(exc)
    UNEXPECTED.labels(code).inc()
    message = UNAVAILABLE_MESSAGE if code == UNAVAILABLE else INTERNAL_MESSAGE
    return JSONResponse(
        {"errors": [{"message": message, "extensions": {"code": code}}]},
        status_code=503 if code == UNAVAILABLE else 500,
    )


async def _close_at(socket: WebSocket, expires_at: float) -> None:
    await asyncio.sleep(max(0.0, expires_at - time.time()) + CLOSE_AFTER_EXPIRY_SECONDS)
    log.info("closing a websocket: its token expired")
    with contextlib.suppress(RuntimeError, OSError):  # closed meanwhile
        await socket.close(code=TOKEN_EXPIRED, reason="The token has expired.")


def _bounded_socket(receive: Receive, send: Send, limit: int) -> Receive:
    """A websocket ``receive`` that refuses a message larger than an HTTP body may be
    (close code 1009, "message too big"); the server's own frame limit is the same
    (``api.__main__.uvicorn_options``: ``ws_max_size``), so it is never buffered whole."""

    async def bounded() -> Message:
        message = await receive()
        if message["type"] == "websocket.receive":
            size = len(message.get("text") or "") + len(message.get("bytes") or b"")
            if size > limit:
                log.info("closing a websocket: a message of %d bytes", size)
                await send({"type": "websocket.close", "code": 1009, "reason": "Too big"})
                return {"type": "websocket.disconnect", "code": 1009}
        return message

    return bounded


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when the database answers in time: every request needs it. Redis (when jobs
    go through arq) is reported, but its loss only degrades the service (spends, purchases
    and reads go on; jobs are queued again by the sweep once it is back), so it never pulls
    a replica out of a load balancer: ``"status": "degraded"`` with 200."""
    services: Services = request.app.state.services
    checks = await readiness(services.settings, services.queue)
    api_metrics.observe_dependencies(checks)
    if checks.get("database") != "up":
        return JSONResponse({"status": "unavailable", **checks}, status_code=503)
    degraded = any(state != "up" for state in checks.values())
    return JSONResponse({"status": "degraded" if degraded else "ok", **checks})


async def stripe_webhook(request: Request) -> Response:
    """Verify the signature on the raw body, store the event once, process it in a job."""
    services: Services = request.app.state.services
    secret = services.settings.stripe_webhook_secret
    if services.settings.payment_gateway != "stripe" or secret is None:
        return JSONResponse({"error": "the Stripe gateway is not configured"}, status_code=404)
    payload = await request.body()  # already read, within its bounds: api.bodies
    try:
        text = payload.decode("utf-8")
        stripe.WebhookSignature.verify_header(
            text,
            request.headers.get("stripe-signature"),
            secret.get_secret_value(),
            tolerance=WEBHOOK_TOLERANCE_SECONDS,
        )
        event = json.loads(text)
        if not isinstance(event, dict) or not _event_id_ok(event.get("id")):
            raise ValueError("not an event (an id of 1 to 255 printable characters)")
    except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError) as exc:
        log.info("refused a Stripe webhook: %s", exc)
        return JSONResponse({"error": "invalid signature or payload"}, status_code=400)
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        # Signed by Stripe but not an event we could ever apply: kept as rejected, not
        # queued (its job would fail on every retry).
        await webhooks.record("stripe", event, rejected="data.object is not an object")
        log.info("refused a Stripe webhook %s: data.object is not an object", event["id"])
        return JSONResponse({"error": "data.object must be an object"}, status_code=400)
    stored = await webhooks.record("stripe", event)
    if stored is not None:
        await services.queue.enqueue(
            "process_gateway_event", stored, job_id=f"gateway-event-{stored}"
        )
    return JSONResponse({"received": True, "duplicate": stored is None})


WEBHOOK_TOLERANCE_SECONDS = 300


def _event_id_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable()


async def run_periodic(queue: InProcessQueue, settings: Settings) -> None:
    """The embedded default's cron: the periodic jobs arq would run, every few seconds."""
    tick = 0
    while True:
        await asyncio.sleep(settings.periodic_seconds)
        tick += 1
        for name, minutes in PERIODIC.items():
            if (tick - 1) % minutes == 0:
                try:
                    await queue.enqueue(name, job_id=f"cron:{name}:{tick}")
                except Exception:  # the ticker outlives any one tick (the jobs log their own)
                    log.exception("could not start the periodic job %s", name)


@dataclass
class Services:
    """What the app holds for its lifetime (typed, instead of loose ``app.state`` keys)."""

    settings: Settings
    gateway: PaymentGateway
    book: PriceBook
    queue: JobQueue
    live: Broadcaster  # in process in the embedded default; Redis pub/sub with arq


def _expires_at(token: str) -> float | None:
    """The ``exp`` of a token already verified (a live subscription ends with it)."""
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(exp) if isinstance(exp, int | float) else None


def create_app(
    settings: Settings | None = None,
    *,
    gateway: PaymentGateway | None = None,
    queue: JobQueue | None = None,
    live: Broadcaster | None = None,
) -> Starlette:
    settings = settings or get_settings()
    gateway = gateway or make_gateway(settings)
    book = load_price_book(settings.price_book_path)
    services = Services(
        settings,
        gateway,
        book,
        queue or InProcessQueue(all_functions()),
        live or InProcessBroadcaster(),
    )
    if isinstance(services.queue, InProcessQueue):
        # The embedded default: jobs run here, with what an arq worker would hold.
        services.queue.bind(
            settings=settings,
            gateway=gateway,
            book=book,
            mailer=make_mailer(settings),
            live=services.live,
        )
    graphql = GraphQLEndpoint(CreditsGraphQL(services), settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        verify = getattr(services.gateway, "verify", None)
        if verify is not None:
            await verify()  # a wrong Stripe key stops start-up with a clear message
        if queue is None and settings.job_queue == "arq":
            services.queue = await ArqQueue.connect(settings.redis_url)
        if live is None and settings.job_queue == "arq":
            # Workers elsewhere move balances too: hear them (and the other API
            # processes) through Redis pub/sub.
            services.live = RedisBroadcaster.connect(settings.redis_url)
        async with RegisterTortoise(app, config=tortoise_config(settings.database_url)):
            ticker = None
            if isinstance(services.queue, InProcessQueue) and settings.periodic_seconds > 0:
                ticker = asyncio.create_task(run_periodic(services.queue, settings))
            try:
                yield
            finally:
                if ticker is not None:
                    ticker.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ticker
                await services.queue.close()
                await services.live.close()

    app = Starlette(
        routes=[
            Route("/graphql", graphql, methods=["GET", "POST"]),
            WebSocketRoute("/graphql", graphql),  # subscriptions (graphql-transport-ws)
            Route("/webhooks/stripe", stripe_webhook, methods=["POST"]),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", api_metrics.metrics),
            Route("/reports/transactions.csv", transactions_csv),
            *page.routes(),  # GET / and /billing: the billing page
        ],
        middleware=[
            Middleware(RequestIdMiddleware),
            # Every route's body, read once, bounded in size and time.
            Middleware(
                BoundedBody,
                max_bytes=settings.max_body_bytes,
                timeout_seconds=settings.body_timeout_seconds,
            ),
        ],
        lifespan=lifespan,
    )
    app.state.services = services
    return app
