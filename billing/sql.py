"""Raw SQL for the few hot statements, written once for SQLite and PostgreSQL.

Datetimes are passed as they are: asyncpg takes them natively, and Tortoise registers a
sqlite3 adapter that stores them exactly as its own queries do (so raw and ORM rows compare).

Queries use ``?`` placeholders; on PostgreSQL they are rewritten to ``$1, $2, ...``.
The connection is whatever Tortoise routes the current task to, so a caller's
``in_transaction()`` applies here too.
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import lru_cache
from typing import Any

from tortoise import connections
from tortoise.backends.base.client import BaseDBAsyncClient, TransactionalDBClient

from billing import clock

_PLACEHOLDER = re.compile(r"\?")


def connection() -> BaseDBAsyncClient:
    conn: BaseDBAsyncClient = connections.get("default")
    return conn


def in_transaction() -> bool:
    """Whether the current task runs inside a transaction (``in_transaction()``)."""
    return isinstance(connection(), TransactionalDBClient)


def is_postgres(conn: BaseDBAsyncClient) -> bool:
    return conn.capabilities.dialect == "postgres"


@lru_cache(maxsize=256)
def _to_postgres(query: str) -> str:
    counter = iter(range(1, 65_536))  # PostgreSQL takes at most 65,535 parameters
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", query)


async def fetch(query: str, *values: Any) -> list[dict[str, Any]]:
    """Run a statement (``RETURNING`` included) and return its rows as dicts."""
    conn = connection()
    if is_postgres(conn):
        query = _to_postgres(query)
    return await conn.execute_query_dict(query, list(values))


async def execute(query: str, *values: Any) -> int:
    """Run a statement and return the number of rows it changed."""
    conn = connection()
    if is_postgres(conn):
        query = _to_postgres(query)
    count, _ = await conn.execute_query(query, list(values))
    return count


def now() -> datetime:
    return clock.now()
