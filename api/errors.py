"""Unexpected failures answer as failures.

An exception that is not a GraphQL error (a bug, the database gone) is masked (its text
never reaches the client) but keeps a code, so clients, load balancers and metrics can
tell it from a refusal:

- ``SERVICE_UNAVAILABLE`` when a dependency is down: the database can't be reached or has
  no free connection (``billing.errors.DatabaseUnavailable``), a connection dropped. A
  retry shortly may work.
- ``INTERNAL_SERVER_ERROR`` for anything else.

Each is counted in ``credits_graphql_unexpected_errors`` by code.

HTTP status codes follow the GraphQL-over-HTTP specification. A client that accepts
``application/graphql-response+json`` (and prefers it to ``application/json``) gets that
media type and real status codes: a request that can't be executed (parse or validation
errors) is 400 with no ``data``; an operation that failed as a whole (``data`` null) for an
unexpected reason is 500 (503 for ``SERVICE_UNAVAILABLE``), with no ``data`` entry, as the
specification asks of a response without data; ``FORBIDDEN`` is 403. With
``application/json`` (the default) every GraphQL response stays 200, as that
specification asks for that media type.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from graphql import GraphQLError
from prometheus_client import Counter
from strawberry.extensions import MaskErrors
from tortoise.exceptions import DBConnectionError

from billing.errors import DatabaseUnavailable

INTERNAL = "INTERNAL_SERVER_ERROR"
UNAVAILABLE = "SERVICE_UNAVAILABLE"
INTERNAL_MESSAGE = "Internal error."
UNAVAILABLE_MESSAGE = "The service is unavailable right now: try again shortly."
GRAPHQL_RESPONSE = "application/graphql-response+json"

UNEXPECTED = Counter(
    "credits_graphql_unexpected_errors",
    "GraphQL errors that were not expected failures, by code (INTERNAL_SERVER_ERROR: a "
    "bug; SERVICE_UNAVAILABLE: a dependency such as the database was down).",
    ["code"],
)

_UNAVAILABLE_TYPES: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    DBConnectionError,
    OSError,  # refused, reset
    TimeoutError,
    asyncpg.PostgresConnectionError,
    # "connection is closed", "connection was closed in the middle"
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
)


def _unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) says a dependency is down."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, _UNAVAILABLE_TYPES):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def code_of(original: BaseException | None) -> str:
    return UNAVAILABLE if _unavailable(original) else INTERNAL


class CodedMaskErrors(MaskErrors):
    """Strawberry's ``MaskErrors``, with ``extensions.code`` and a count of each."""

    def _process_result(self, result: object) -> None:
        # Strawberry's asks isinstance of a runtime-checkable Protocol first: costly on
        # every operation, for the few that have errors.
        errors = getattr(result, "errors", None)
        if errors:
            result.errors = self._process_errors(errors)  # type: ignore[attr-defined]

    def anonymise_error(self, error: GraphQLError) -> GraphQLError:
        code = code_of(error.original_error)
        UNEXPECTED.labels(code).inc()
        return GraphQLError(
            message=UNAVAILABLE_MESSAGE if code == UNAVAILABLE else INTERNAL_MESSAGE,
            nodes=error.nodes,
            source=error.source,
            positions=error.positions,
            path=error.path,
            original_error=None,
            extensions={"code": code},
        )


def wants_graphql_response(accept: str) -> bool:
    """The client takes ``application/graphql-response+json`` and doesn't prefer JSON."""
    kinds = [part.split(";")[0].strip().lower() for part in accept.split(",")]
    if GRAPHQL_RESPONSE not in kinds:
        return False
    return "application/json" not in kinds or kinds.index(GRAPHQL_RESPONSE) < kinds.index(
        "application/json"
    )


def status_for(response: dict[str, Any]) -> int:
    """The status of a processed GraphQL response (``application/graphql-response+json``);
    drops ``data`` from a response that has none to give."""
    errors = response.get("errors") or []
    if not errors or response.get("data") is not None:
        return 200
    codes = {str((e.get("extensions") or {}).get("code") or "") for e in errors}
    if codes == {"PERSISTED_QUERY_NOT_FOUND"}:
        return 200  # as Apollo Server: its clients then send the text (api.trusted)
    if all(not e.get("path") for e in errors) and not codes & {INTERNAL, UNAVAILABLE}:
        status = 403 if "FORBIDDEN" in codes else 400  # a request error: nothing ran
    elif UNAVAILABLE in codes:
        status = 503
    elif INTERNAL in codes:
        status = 500
    elif "FORBIDDEN" in codes:
        status = 403
    else:
        return 200  # a field error nulled the result: a "partial response"
    response.pop("data", None)
    return status
