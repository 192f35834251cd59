"""Database configuration and migrations (Tortoise 1.x's own migration tool)."""

from __future__ import annotations

from typing import Any

import asyncpg

from runtime.settings import get_settings

APP_LABEL = "billing"


DEFAULT_POOL_SIZE = 20  # per process; DATABASE_URL's ?maxsize= overrides (Tortoise says 5)


class _NoResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection handed back without asyncpg's reset query.

    asyncpg runs ``RESET ALL; UNLISTEN *; ...`` on every release, one more round trip for
    each statement run outside a transaction. This service keeps no session state (no
    SET, LISTEN, advisory locks or server-side cursors), and an open transaction is still
    rolled back on release, so the round trip buys nothing."""

    def get_reset_query(self) -> str:
        return ""


def _connection(db_url: str) -> str | dict[str, Any]:
    if not db_url.startswith(("postgres://", "postgresql://", "asyncpg://")):
        return db_url
    from tortoise.backends.base.config_generator import expand_db_url

    config: dict[str, Any] = expand_db_url(db_url)
    credentials = config["credentials"]
    credentials.setdefault("maxsize", DEFAULT_POOL_SIZE)
    credentials["connection_class"] = _NoResetConnection
    # Tortoise's asyncpg client, with a connection given back when BEGIN fails and a
    # bounded wait for one (see runtime.pgclient).
    config["engine"] = "runtime.pgclient"
    return config


def tortoise_config(db_url: str) -> dict[str, Any]:
    return {
        "connections": {"default": _connection(db_url)},
        "apps": {
            APP_LABEL: {
                "models": ["billing.models"],
                "migrations": "billing.migrations",
                "default_connection": "default",
            }
        },
        "use_tz": True,
        "timezone": "UTC",
    }


def __getattr__(name: str) -> Any:
    # ``TORTOISE_ORM`` is read by the ``tortoise`` CLI (see pyproject's [tool.tortoise]);
    # computed lazily so importing this module never reads the environment.
    if name == "TORTOISE_ORM":
        return tortoise_config(get_settings().database_url)
    raise AttributeError(name)


async def migrate(db_url: str) -> None:
    """Apply every pending migration to the database at ``db_url``."""
    from tortoise import Tortoise
    from tortoise.migrations.api.migrate import migrate as run_migrations

    try:
        await run_migrations(config=tortoise_config(db_url))
    finally:
        await Tortoise.close_connections()
