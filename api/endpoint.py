"""The GraphQL endpoint: Strawberry's ASGI app with our context, behind the check of
every request's bearer token (HTTP 401 without a valid one) and, over a websocket, the
token in ``connection_init`` (closed when it expires)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, cast

import jwt
from cross_web import AsyncHTTPRequestAdapter, HTTPException  # Strawberry raises it for a 4xx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from strawberry.asgi import ASGIWebSocketAdapter, GraphQL
from strawberry.exceptions import ConnectionRejectionError
from strawberry.http import GraphQLRequestData
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.types import ExecutionResult
from strawberry.types.unset import UNSET, UnsetType

from api import encoding
from api.auth import AuthError, Principal, authenticate, bearer_token
from api.context import Context, Services
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
from api.graphql.schema import build_schema
from api.trusted import Registry
from billing.accounts import ensure_account, record_member
from billing.enums import Role
from runtime.settings import Settings

log = logging.getLogger(__name__)
ANONYMOUS = Principal(user_id="", account_id="", roles=frozenset())


MAX_OPERATIONS_PER_SOCKET = 20


class TextFrames(ASGIWebSocketAdapter):
    """graphql-transport-ws messages as text frames: ``encode_json`` gives bytes (orjson),
    which Strawberry would send as binary frames, and a browser's ``JSON.parse`` of a
    binary frame (a Blob) fails (the billing page's live balance)."""

    async def send_json(self, message: Mapping[str, object]) -> None:
        try:
            await self.ws.send_text(encoding.dumps(message).decode("utf-8"))
        except WebSocketDisconnect as exc:
            raise WebSocketDisconnected from exc


class CreditsGraphQL(GraphQL[Context, None]):
    """Strawberry's ASGI app with our context (the principal is set by ``GraphQLEndpoint``)."""

    websocket_adapter_class = TextFrames

    def encode_json(self, data: object) -> bytes:
        return encoding.dumps(data)  # orjson

    def __init__(self, services: Services) -> None:
        schema = build_schema(services.settings)  # its trusted documents checked
        super().__init__(
            schema,
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
        self.trusted: Registry = schema.trusted
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

    async def execute_single(
        self,
        request: Request,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Response,
        context: Context,
        root_value: None,
        request_data: GraphQLRequestData,
    ) -> ExecutionResult:
        """A trusted document sent by its hash (``api.trusted``) runs its stored text; an
        unknown hash, or a hash that is not the ``query``'s, is answered with an error."""
        query, error = self.trusted.resolve(request_data.query, request_data.extensions)
        if error is not None:
            # As Apollo Server: never cached, HTTP 200 for PERSISTED_QUERY_NOT_FOUND.
            sub_response.headers["Cache-Control"] = "private, no-cache, must-revalidate"
            return ExecutionResult(data=None, errors=[error])
        if query is not request_data.query:
            request_data = dataclasses.replace(request_data, query=query)
        return await super().execute_single(
            request, request_adapter, sub_response, context, root_value, request_data
        )

    async def process_result(self, request: Request, result: ExecutionResult) -> Any:
        """With ``application/graphql-response+json``, real status codes (``api.errors``)."""
        processed = await super().process_result(request, result)
        if wants_graphql_response(request.headers.get("accept", "")):
            response = request.scope.get("state", {}).get("graphql_sub_response")
            if response is not None:
                response.status_code = status_for(cast(dict[str, Any], processed))
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
        return cast(UnsetType, UNSET)


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


def _expires_at(token: str) -> float | None:
    """The ``exp`` of a token already verified (a live subscription ends with it)."""
    exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    return float(exp) if isinstance(exp, int | float) else None
