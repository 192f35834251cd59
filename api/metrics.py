"""Prometheus metrics of the API: request latency (by GraphQL operation name, and by HTTP
route), spends and purchases by outcome. Job metrics live in ``workers.metrics``; both
register in prometheus-client's default registry, which ``GET /metrics`` serves.

With several uvicorn worker processes, set ``PROMETHEUS_MULTIPROC_DIR`` (an empty
directory) and each scrape aggregates every process (prometheus-client's multiprocess mode).
"""

from __future__ import annotations

import functools
import hmac
import os
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from graphql import GraphQLError, GraphQLSchema
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prometheus_multiprocess
from starlette.requests import Request
from starlette.responses import Response
from strawberry.extensions import FieldExtension, SchemaExtension
from strawberry.extensions.field_extension import AsyncExtensionResolver

from api.guards import facts_for

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

GRAPHQL_DURATION = Histogram(
    "credits_graphql_request_duration_seconds",
    "GraphQL operations: time from parsing to result, by root field and operation type.",
    ["operation", "operation_type"],
    buckets=LATENCY_BUCKETS,
)
HTTP_DURATION = Histogram(
    "credits_http_request_duration_seconds",
    "HTTP requests: time to the end of the response, by route and status.",
    ["method", "route", "status"],
    buckets=LATENCY_BUCKETS,
)
SPENDS = Counter(
    "credits_spends",
    "consumeCredits calls by process type and outcome "
    "(spent, free, or the error code: INSUFFICIENT_CREDITS, ...).",
    ["process_type", "outcome"],
)
SPENT_CREDITS = Counter(
    "credits_spent_credits", "Credits spent through consumeCredits.", ["process_type"]
)
PURCHASES = Counter(
    "credits_purchases",
    "purchaseCredits calls by outcome (the payment's status: SUCCEEDED, REQUIRES_ACTION, "
    "FAILED, PENDING; or the error code when no payment was made).",
    ["outcome"],
)

# Operation names come from clients: any token could fill a label set with junk names.
# The label is the operation's root field instead (a name of the schema, a bounded set):
# ``creditAccount``, ``consumeCredits``, ...; ``multiple`` for several, ``other`` for none.
METHODS = frozenset({"GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"})


def operation_label(root_fields: Iterable[str], known: Collection[str]) -> str:
    names = {n for n in root_fields if not n.startswith("__")}
    if len(names) > 1:
        return "multiple"
    if len(names) == 1:
        (name,) = names
        return name if name in known else "other"
    return "other"


def _root_fields(context: Any) -> list[str]:
    document = context.graphql_document
    if document is None:
        return []
    wanted = getattr(context, "_provided_operation_name", None)
    for name, operation in facts_for(context.query, document).operations:
        if wanted is None or name == wanted:
            return list(operation.fields)
    return []


def _value(raw: object) -> str:
    return str(getattr(raw, "value", raw))


def _error_code(exc: BaseException) -> str:
    if isinstance(exc, GraphQLError) and exc.extensions:
        return str(exc.extensions.get("code") or "error")
    return "error"


def _first_error_code(payload: Any) -> str | None:
    errors = getattr(payload, "errors", None) or []
    return _value(errors[0].code) if errors else None


def _arg(kwargs: dict[str, Any], *path: str) -> Any:
    value: Any = kwargs
    for key in path:
        value = value.get(key) if isinstance(value, dict) else getattr(value, key, None)
    return value


def _record_spend(payload: Any, kwargs: dict[str, Any], error: BaseException | None) -> None:
    process = _arg(kwargs, "input", "processType") or _arg(kwargs, "input", "process_type")
    process_type = _value(process) if process is not None else "unknown"
    if error is not None:
        SPENDS.labels(process_type, _error_code(error)).inc()
        return
    code = _first_error_code(payload)
    if code is not None:
        SPENDS.labels(process_type, code).inc()
        return
    transaction = getattr(payload, "transaction", None)
    if transaction is None:
        SPENDS.labels(process_type, "free").inc()
        return
    SPENDS.labels(process_type, "spent").inc()
    SPENT_CREDITS.labels(process_type).inc(-int(transaction.model.credits))


def _record_purchase(payload: Any, kwargs: dict[str, Any], error: BaseException | None) -> None:
    if error is not None:
        PURCHASES.labels(_error_code(error)).inc()
        return
    payment = getattr(payload, "payment", None)
    if payment is not None:
        PURCHASES.labels(_value(payment.model.status)).inc()
        return
    PURCHASES.labels(_first_error_code(payload) or "unknown").inc()


Recorder = Callable[[Any, dict[str, Any], BaseException | None], None]


class Recorded(FieldExtension):
    """Counts the outcome of a money mutation (``consumeCredits``, ``purchaseCredits``):
    a field extension on those fields alone, so no other field pays for it (a schema
    extension's ``resolve`` hook would wrap every field of every operation)."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    async def resolve_async(
        self, next_: AsyncExtensionResolver, source: Any, info: Any, **kwargs: Any
    ) -> Any:
        try:
            value = await next_(source, info, **kwargs)
        except Exception as exc:
            self.recorder(None, kwargs, exc)
            raise
        self.recorder(value, kwargs, None)
        return value


def spends() -> Recorded:
    return Recorded(_record_spend)


def purchases() -> Recorded:
    return Recorded(_record_purchase)


class MetricsExtension(SchemaExtension):
    """Times each operation by the root field it runs (``api.guards.facts_for``)."""

    def on_operation(self) -> Iterator[None]:
        started = time.perf_counter()
        yield
        context = self.execution_context
        try:
            kind = context.operation_type.value
        except Exception:  # no operation in the document (a parse error)
            kind = "unknown"
        if kind == "subscription":
            return  # a subscription's "duration" is the life of the connection
        known = _known_fields(context.schema._schema)
        label = operation_label(_root_fields(context), known)
        GRAPHQL_DURATION.labels(label, kind).observe(time.perf_counter() - started)


@functools.cache
def _known_fields(schema: GraphQLSchema) -> frozenset[str]:
    roots = (schema.query_type, schema.mutation_type, schema.subscription_type)
    return frozenset(name for root in roots if root is not None for name in root.fields)


DEPENDENCY_UP = Gauge(
    "credits_dependency_up",
    "1 when the dependency answered the last readiness check (/readyz), else 0.",
    ["dependency"],
    multiprocess_mode="liveall",
)
DB_POOL = Gauge(
    "credits_db_pool_connections",
    "PostgreSQL connection pool of this process: max, size, idle and in_use connections.",
    ["state"],
    multiprocess_mode="liveall",
)


def observe_dependencies(checks: dict[str, str]) -> None:
    for name, state in checks.items():
        DEPENDENCY_UP.labels(name).set(1 if state == "up" else 0)


def _observe_pool() -> None:
    from billing import sql  # the ORM may not be up (metrics are served regardless)

    try:
        stats = getattr(sql.connection(), "pool_stats", None)
    except Exception:
        return
    if stats is not None:
        for state, value in stats().items():
            DB_POOL.labels(state).set(value)


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    """``route`` is a route's path template (or ``unmatched``): a bounded set."""
    method = method if method in METHODS else "other"
    HTTP_DURATION.labels(method, route, str(status)).observe(seconds)


def registry() -> CollectorRegistry:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        collected = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(collected)  # type: ignore[no-untyped-call]
        return collected
    return REGISTRY


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format. With ``METRICS_TOKEN`` set, only a scraper
    sending it as a bearer token gets them; in production without one, nobody does (the
    figures are cross-tenant: serve them on the internal network only, with a token)."""
    settings = request.app.state.services.settings
    expected = settings.metrics_token
    if expected is None:
        if settings.is_production:
            return Response("Not Found", status_code=404, media_type="text/plain")
    else:
        sent = request.headers.get("authorization", "")
        wanted = f"Bearer {expected.get_secret_value()}"
        if not hmac.compare_digest(sent.encode(), wanted.encode()):
            return Response(
                "Unauthorized",
                status_code=401,
                media_type="text/plain",
                headers={"WWW-Authenticate": "Bearer"},
            )
    _observe_pool()
    return Response(generate_latest(registry()), media_type=CONTENT_TYPE_LATEST)
