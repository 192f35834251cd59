"""Run the service: apply migrations, then serve with uvicorn (``python -m api``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

import uvicorn

from billing.db import migrate
from billing.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-migrate", action="store_true", help="skip applying migrations")
    parser.add_argument("--migrate-only", action="store_true", help="apply migrations and exit")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    args = parser.parse_args(argv)
    settings = get_settings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.database_url.startswith("sqlite://"):
        path = settings.database_url.removeprefix("sqlite://")
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not args.no_migrate:
        asyncio.run(migrate(settings.database_url))
    if args.migrate_only:
        return 0
    base = f"http://{settings.host}:{settings.port}"
    print(
        f"\nPurchase Credits service on {base}\n"
        f"  GraphiQL:      open {base}/graphql in a browser"
        + ("" if settings.show_graphiql else " (disabled: set GRAPHIQL_ENABLED=true)")
        + "\n"
        "  Admin token:   make token   (or: .venv/bin/python -m api.devtoken --account acme "
        "--roles ADMIN)\n"
        "  In GraphiQL, open the Headers tab and paste "
        '{"Authorization": "Bearer <token>"}\n',
        flush=True,
    )
    uvicorn.run(
        "api.asgi:app",
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        log_level=settings.log_level.lower(),
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
