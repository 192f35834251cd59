"""Run the service: apply migrations, then serve with uvicorn (``python -m api``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

import uvicorn

from api.auth import issue_token
from billing.enums import Role
from runtime import logs
from runtime.db import migrate
from runtime.settings import Settings, get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-migrate", action="store_true", help="skip applying migrations")
    parser.add_argument("--migrate-only", action="store_true", help="apply migrations and exit")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="uvicorn worker processes (default: WEB_CONCURRENCY, else 1)",
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    logs.configure(settings.log_level, settings.log_format)
    if settings.database_url.startswith("sqlite://"):
        path = settings.database_url.removeprefix("sqlite://")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        asyncio.run(migrate(settings.database_url))
    if args.migrate_only:
        return 0
    print(banner(settings), flush=True)
    workers = args.workers if args.workers is not None else settings.web_concurrency
    if workers > 1 and (settings.job_queue != "arq" or not is_postgres(settings)):
        logging.getLogger("api").warning(
            "%d API processes on %s with JOB_QUEUE=%s: each process has its own in-process "
            "queue and live-balance feed, and SQLite takes one writer at a time; scale out "
            "on PostgreSQL with JOB_QUEUE=arq",
            workers,
            "PostgreSQL" if is_postgres(settings) else "SQLite",
            settings.job_queue,
        )
    uvicorn.run("api.asgi:app", **uvicorn_options(settings, workers=workers))
    return 0


def is_postgres(settings: Settings) -> bool:
    return settings.database_url.startswith(("postgres://", "postgresql://", "asyncpg://"))


DEV_ADMIN = {"account_id": "acme", "user_id": "admin-1", "email": "admin@example.com"}


def banner(settings: Settings) -> str:
    """What ``make run`` prints: the billing page's link first (in development, signed in
    as a development admin: the token rides in the URL fragment, which the page moves into
    session storage and removes from the address bar)."""
    base = f"http://{settings.host}:{settings.port}"
    lines = [f"\nPurchase Credits service on {base}"]
    if not settings.is_production and settings.hs256_enabled:
        token = issue_token(
            settings,
            account_id=DEV_ADMIN["account_id"],
            user_id=DEV_ADMIN["user_id"],
            roles=[Role.ADMIN],
            email=DEV_ADMIN["email"],
            name="Development Admin",
            ttl_seconds=12 * 3600,
        )
        lines.append(f"  Billing page:  {base}/billing#token={token}")
        lines.append("                 (a development admin of account acme, for 12 hours)")
    else:
        lines.append(f"  Billing page:  {base}/billing (opened by the platform with a token)")
    lines.append(
        f"  GraphiQL:      {base}/graphql"
        + ("" if settings.show_graphiql else " (disabled: set GRAPHIQL_ENABLED=true)")
    )
    lines.append("  Admin token:   make token   (make token HEADERS=1: GraphiQL's Headers JSON)")
    return "\n".join(lines) + "\n"


def uvicorn_options(settings: Settings, *, workers: int = 1) -> dict[str, Any]:
    """How uvicorn serves the app: our JSON logging (the API writes its own access log,
    with the request id) and a graceful shutdown that lets in-flight requests finish."""
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": workers,
        "log_level": settings.log_level.lower(),
        "log_config": logs.config(settings.log_level, settings.log_format),
        "access_log": False,
        "proxy_headers": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_seconds,
        **connection_limits(settings),
    }


def connection_limits(settings: Settings) -> dict[str, Any]:
    """What uvicorn bounds per connection (tests serve the app with these too)."""
    return {
        # A websocket message may be as large as an HTTP body, no larger (the default
        # is 16 MiB, buffered whole before the app sees it).
        "ws_max_size": settings.max_body_bytes,
        # h11 bounds a request's head (httptools, uvicorn's default, bounds nothing); see
        # api/server.py for the deadline on it. Idle keep-alive connections are dropped.
        "http": "api.server:BoundedH11Protocol",
        "h11_max_incomplete_event_size": settings.max_header_bytes,
        "timeout_keep_alive": settings.keep_alive_seconds,
    }


if __name__ == "__main__":
    raise SystemExit(main())
