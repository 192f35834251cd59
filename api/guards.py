"""Requests refused before they run, whatever the resolvers do.

Only text the database can store gets past GraphQL: every string a request
carries (its variables and the string literals of its document) must be valid Unicode
without NUL. Without it, a lone surrogate (JSON ``"\\ud800"``) in a reason, a reference,
an idempotency key or a search failed to encode deep in the database driver (SQLite and
PostgreSQL), and a NUL character was refused by PostgreSQL only: both surfaced as
``Internal error.``. Now the operation is refused before it runs, on both backends alike,
with ``BAD_USER_INPUT``.

A subscription sent as a plain POST used to run its field's resolver as a query's, which
returned null for the non-null field: a masked ``Internal error.``. It is now refused with
``BAD_REQUEST`` (use the websocket).

``Guards`` makes these checks and the other refusals made before an operation runs (an
expired websocket token, a missing ``operationName``, the permission table) in one hook.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    ExecutionResult,
    FieldNode,
    FragmentDefinitionNode,
    GraphQLError,
    OperationDefinitionNode,
    StringValueNode,
    Visitor,
    visit,
)
from starlette.websockets import WebSocket
from strawberry.extensions import SchemaExtension
from strawberry.types.graphql import OperationType

from api.context import Context
from api.permissions import forbidden, reach, root_fields


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


# ---------------------------------------------------------------- what a document holds


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation of a document, as the guards and the metrics need it."""

    kind: OperationType
    #: ``Query.viewer``, ``Mutation.consumeCredits``, ...: its root fields, fragments
    #: expanded, ``__typename`` and introspection left out (the permission table's keys).
    coordinates: tuple[str, ...]
    #: The root fields written directly in its selection (the metrics' label).
    fields: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DocumentFacts:
    """What depends on the document only, worked out once per distinct document."""

    #: A string literal holds a lone surrogate or NUL.
    bad_literal: bool
    #: The operations, in document order, with their names (None: anonymous).
    operations: tuple[tuple[str | None, Operation], ...]

    def operation(self, name: str | None) -> Operation | None:
        """The operation a request runs: the one ``name`` names, or the only one."""
        if name is None:
            return self.operations[0][1] if len(self.operations) == 1 else None
        return next((op for n, op in self.operations if n == name), None)


def document_facts(document: DocumentNode) -> DocumentFacts:
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    operations: list[tuple[str | None, Operation]] = []
    for d in document.definitions:
        if not isinstance(d, OperationDefinitionNode):
            continue
        root = d.operation.value.capitalize()  # Query, Mutation, Subscription
        coordinates = tuple(
            f"{root}.{name}"
            for name in root_fields(d.selection_set, fragments)
            if not name.startswith("__")  # __typename; introspection has its own switch
        )
        fields = tuple(s.name.value for s in d.selection_set.selections if isinstance(s, FieldNode))
        kind = OperationType(d.operation.value)
        operations.append((d.name.value if d.name else None, Operation(kind, coordinates, fields)))
    literals = _Literals()
    visit(document, literals)
    return DocumentFacts(literals.bad, tuple(operations))


#: Distinct documents remembered (the parser's and the validation's caches keep as many).
FACTS_CACHE_SIZE = 256
_facts: OrderedDict[str, DocumentFacts] = OrderedDict()


def facts_for(query: str | None, document: DocumentNode) -> DocumentFacts:
    """``document_facts``, remembered by the document's text (an LRU of
    ``FACTS_CACHE_SIZE``): the same text always parses to the same document."""
    if query is None:
        return document_facts(document)
    known = _facts.get(query)
    if known is not None:
        _facts.move_to_end(query)
        return known
    known = _facts[query] = document_facts(document)
    if len(_facts) > FACTS_CACHE_SIZE:
        _facts.popitem(last=False)
    return known


def _error(message: str, code: str) -> ExecutionResult:
    return ExecutionResult(data=None, errors=[GraphQLError(message, extensions={"code": code})])


class Guards(SchemaExtension):
    """Every refusal made before an operation runs, in one hook, in this order (a later
    refusal is checked only when no earlier one applied, except the text check, which
    always has the last word):

    1. a websocket's token is checked again for each operation against its expiry (HTTP
       checks it on each request), so an expired token runs nothing, even before the
       socket is closed (``UNAUTHENTICATED``);
    2. the GraphQL spec: a document holding several operations runs only the one
       ``operationName`` names; without one it is an error (Strawberry would run the first)
       (``BAD_REQUEST``);
    3. ``api.permissions.TABLE`` for every root field, before anything of it runs
       (``FORBIDDEN``, no data);
    4. only text the database can store: every variable and every string literal of the
       document valid Unicode without NUL (``BAD_USER_INPUT``);
    5. subscriptions only over graphql-transport-ws: over HTTP there is no stream to feed
       (``BAD_REQUEST``).

    What depends on the document alone (its operations, their root fields, its literals)
    is worked out once per distinct document (``facts_for``); per request only the
    variables are walked. It also keeps the request's variables as sent (before GraphQL
    fills in defaults) in ``Context.raw_variables``.
    """

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        ctx = context.context
        document = context.graphql_document
        trusted = getattr(context, "trusted_document", None)  # api.bounded.Documents
        if trusted is not None:
            facts: DocumentFacts | None = trusted.facts  # worked out at start-up
        else:
            facts = facts_for(context.query, document) if document is not None else None
        # ``operation_name`` falls back to the first operation's: ask what the client sent.
        named: str | None = getattr(context, "_provided_operation_name", None)
        operation = facts.operation(named) if facts is not None else None
        result = context.result
        if result is None:
            result = _refusal(ctx, facts, named, operation)
        text = _text_refusal(context.variables, facts)
        if text is not None:  # the text check has the last word
            result = text
        elif result is None:
            result = _subscription_refusal(ctx, operation)
        context.result = result
        if isinstance(ctx, Context):
            ctx.raw_variables = dict(context.variables or {})
        yield


def _refusal(
    ctx: object, facts: DocumentFacts | None, named: str | None, operation: Operation | None
) -> ExecutionResult | None:
    """The first of: an expired token (websockets), a missing operationName, a root
    field the caller's roles may not reach (``api.permissions``)."""
    expires_at = getattr(ctx, "token_expires_at", None)
    if expires_at is not None and time.time() >= expires_at:
        return _error("The token has expired: reconnect with a new one.", "UNAUTHENTICATED")
    if facts is not None and not named and len(facts.operations) > 1:
        return _error(
            "Must provide operationName when the document holds several operations.",
            "BAD_REQUEST",
        )
    principal = getattr(ctx, "principal", None)
    if principal is not None and operation is not None:
        for coordinate in operation.coordinates:
            if reach(principal, coordinate) is None:
                return ExecutionResult(data=None, errors=[forbidden(coordinate)])
    return None


def _text_refusal(
    variables: dict[str, Any] | None, facts: DocumentFacts | None
) -> ExecutionResult | None:
    """Text the database could not store: in a variable, or a string in the document."""
    name = _bad_variable(variables)
    if name is not None:
        return _error(
            f"Variable ${name} holds text that is not valid Unicode or contains NUL.",
            "BAD_USER_INPUT",
        )
    if facts is not None and facts.bad_literal:
        return _error(
            "A string in the document is not valid Unicode or contains NUL.", "BAD_USER_INPUT"
        )
    return None


def _subscription_refusal(ctx: object, operation: Operation | None) -> ExecutionResult | None:
    """A subscription not over a websocket (POSTed) is refused, not answered with null."""
    if (
        operation is not None
        and operation.kind is OperationType.SUBSCRIPTION
        and not isinstance(getattr(ctx, "request", None), WebSocket)
    ):
        return _error(
            "Subscriptions are served over graphql-transport-ws (a websocket on /graphql).",
            "BAD_REQUEST",
        )
    return None
