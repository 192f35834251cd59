"""The Starlette application, assembled: GraphQL on /graphql (``api.endpoint``), the Stripe
webhook (``api.webhooks``), the CSV report (``api.reports``), the billing page, health
checks and metrics, and the lifespan of what the app holds. What runs the jobs (their
functions, the in-process cron) is handed in by the composition root, ``api.asgi``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from tortoise.contrib.starlette import RegisterTortoise

from api import metrics as api_metrics
from api import page
from api.bodies import BoundedBody
from api.context import Services
from api.endpoint import CreditsGraphQL, GraphQLEndpoint
from api.observability import RequestIdMiddleware, readiness
from api.reports import transactions_csv
from api.webhooks import stripe_webhook
from billing.payments.gateways import PaymentGateway
from billing.pricing import load_price_book
from runtime.db import tortoise_config
from runtime.factory import make_gateway
from runtime.live import Broadcaster, InProcessBroadcaster, RedisBroadcaster
from runtime.mailer import make_mailer
from runtime.queue import ArqQueue, InProcessQueue, JobFunction, JobQueue
from runtime.settings import Settings, get_settings

#: The embedded default's cron: runs the periodic jobs on the in-process queue until
#: cancelled (``api.asgi`` hands in the one it wires).
Cron = Callable[[InProcessQueue, Settings], Coroutine[Any, Any, None]]


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


def create_app(
    settings: Settings | None = None,
    *,
    jobs: Mapping[str, JobFunction],
    cron: Cron | None,
    gateway: PaymentGateway | None = None,
    queue: JobQueue | None = None,
    live: Broadcaster | None = None,
) -> Starlette:
    """The app. ``jobs`` are the functions an in-process queue runs (when ``queue`` is not
    given) and ``cron`` runs the periodic jobs on it (``settings.periodic_seconds``)."""
    settings = settings or get_settings()
    gateway = gateway or make_gateway(settings)
    book = load_price_book(settings.price_book_path)
    services = Services(
        settings,
        gateway,
        book,
        queue or InProcessQueue(dict(jobs)),
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
            ticker: asyncio.Task[None] | None = None
            here = services.queue  # the embedded default runs its periodic jobs itself
            if (
                cron is not None
                and settings.periodic_seconds > 0
                and isinstance(here, InProcessQueue)
            ):
                ticker = asyncio.create_task(cron(here, settings))
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
