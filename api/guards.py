"""Requests refused before they run, whatever the resolvers do.

``TextGuard``: only text the database can store gets past GraphQL: every string a request
carries (its variables and the string literals of its document) must be valid Unicode
without NUL. Without it, a lone surrogate (JSON ``"\\ud800"``) in a reason, a reference,
an idempotency key or a search failed to encode deep in the database driver (SQLite and
PostgreSQL), and a NUL character was refused by PostgreSQL only: both surfaced as
``Internal error.``. Now the operation is refused before it runs, on both backends alike,
with ``BAD_USER_INPUT``.

``SubscriptionsOverWebsocket``: a subscription sent as a plain POST used to run its
field's resolver as a query's, which returned null for the non-null field: a masked
``Internal error.``. It is now refused with ``BAD_REQUEST`` (use the websocket).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from graphql import (
    ExecutionResult,
    GraphQLError,
    OperationDefinitionNode,
    StringValueNode,
    Visitor,
    visit,
)
from starlette.websockets import WebSocket
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType


def _unstorable(text: str) -> bool:
    if "\x00" in text:
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return True
    return False


def _bad_variable(variables: dict[str, Any] | None) -> str | None:
    """The first variable holding unstorable text, walked without recursion (a deeply
    nested value must not exhaust the stack)."""
    stack: list[tuple[str, Any]] = list((variables or {}).items())
    while stack:
        name, value = stack.pop()
        if isinstance(value, str):
            if _unstorable(value):
                return name
        elif isinstance(value, dict):
            for key, item in value.items():
                if _unstorable(key):
                    return name
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((name, item) for item in value)
    return None


class _Literals(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.bad = False

    def enter_string_value(self, node: StringValueNode, *_: Any) -> Any:
        if _unstorable(node.value):
            self.bad = True
            return self.BREAK
        return None


class TextGuard(SchemaExtension):
    """Refuse an operation carrying a lone surrogate or a NUL character, before it runs."""

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        message = None
        name = _bad_variable(context.variables)
        if name is not None:
            message = f"Variable ${name} holds text that is not valid Unicode or contains NUL."
        elif context.graphql_document is not None:
            literals = _Literals()
            visit(context.graphql_document, literals)
            if literals.bad:
                message = "A string in the document is not valid Unicode or contains NUL."
        if message is not None:
            error = GraphQLError(message, extensions={"code": "BAD_USER_INPUT"})
            context.result = ExecutionResult(data=None, errors=[error])
        yield


class SubscriptionsOverWebsocket(SchemaExtension):
    """Subscriptions only over graphql-transport-ws: over HTTP there is no stream to feed."""

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        request = getattr(context.context, "request", None)
        if (
            context.result is None
            and context.operation_type is OperationType.SUBSCRIPTION
            and not isinstance(request, WebSocket)
        ):
            error = GraphQLError(
                "Subscriptions are served over graphql-transport-ws (a websocket on /graphql).",
                extensions={"code": "BAD_REQUEST"},
            )
            context.result = ExecutionResult(data=None, errors=[error])
        yield


class OperationNameRequired(SchemaExtension):
    """The GraphQL spec: a document holding several operations runs only the one
    ``operationName`` names; without one it is an error (Strawberry would run the first)."""

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        document = context.graphql_document
        # ``operation_name`` falls back to the first operation's: ask what the client sent.
        named = getattr(context, "_provided_operation_name", None)
        if document is not None and not named and context.result is None:
            operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
            if len(operations) > 1:
                error = GraphQLError(
                    "Must provide operationName when the document holds several operations.",
                    extensions={"code": "BAD_REQUEST"},
                )
                context.result = ExecutionResult(data=None, errors=[error])
        yield


class FreshToken(SchemaExtension):
    """Over a websocket the token was checked once, at ``connection_init``: every
    operation on the socket is checked again against its expiry (HTTP checks it on each
    request), so an expired token runs nothing, even before the socket is closed."""

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        expires_at = getattr(context.context, "token_expires_at", None)
        if context.result is None and expires_at is not None and time.time() >= expires_at:
            error = GraphQLError(
                "The token has expired: reconnect with a new one.",
                extensions={"code": "UNAUTHENTICATED"},
            )
            context.result = ExecutionResult(data=None, errors=[error])
        yield
