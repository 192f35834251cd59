"""Database configuration and migrations (Tortoise 1.x's own migration tool)."""

from __future__ import annotations

from typing import Any

from billing.settings import get_settings

APP_LABEL = "billing"


def tortoise_config(db_url: str) -> dict[str, Any]:
    return {
        "connections": {"default": db_url},
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
