"""Tortoise's asyncpg client, with every pooled connection given back and a bounded wait.

Tortoise ORM (1.1.9, the newest release) takes a connection from the pool for a
transaction and then sends ``BEGIN``; when ``BEGIN`` raises (PostgreSQL restarting:
asyncpg's ``InternalClientError``, a connection reset), the connection is never released
and the task's context keeps pointing at the broken transaction. Each such failure loses
one connection for good, until the process hangs on an empty pool. Here a failed ``BEGIN``
closes its connection and gives it back, and the context is restored.

Taking a connection from the pool waits at most ``acquire_timeout`` seconds (a
``DATABASE_URL`` parameter, ``?acquire_timeout=5``): past it, ``DatabaseUnavailable``, which
the API answers as ``SERVICE_UNAVAILABLE``, instead of a request that hangs.

Used through ``runtime.db`` (the ``engine`` of a PostgreSQL connection).
"""

from __future__ import annotations

import contextlib
from typing import Any

from tortoise.backends.asyncpg.client import AsyncpgDBClient, TransactionWrapper
from tortoise.backends.base.client import (
    PoolConnectionWrapper,
    TransactionalDBClient,
    TransactionContextPooled,
)
from tortoise.connection import get_connections

from billing.errors import DatabaseUnavailable

DEFAULT_ACQUIRE_TIMEOUT = 10.0  # seconds


async def _acquire(client: SafeAsyncpgDBClient) -> Any:
    pool: Any = client._pool  # asyncpg.Pool (untyped)
    assert pool is not None
    try:
        return await pool.acquire(timeout=client.acquire_timeout)
    except TimeoutError:
        raise DatabaseUnavailable(
            f"no database connection became free within {client.acquire_timeout:g} s"
        ) from None


class _TransactionContext(TransactionContextPooled):
    """``TransactionContextPooled`` whose connection goes back to the pool when ``BEGIN``
    fails (Tortoise's keeps it)."""

    async def __aenter__(self) -> TransactionalDBClient:
        await self.ensure_connection()
        parent = self.client._parent
        assert isinstance(parent, SafeAsyncpgDBClient)
        connection = self.client._connection = await _acquire(parent)
        self.token = get_connections().set(self.connection_name, self.client)
        try:
            await self.client.begin()
        except BaseException:
            get_connections().reset(self.token)
            connection.terminate()  # its state is unknown: the pool opens a new one
            pool: Any = parent._pool
            if pool is not None:
                with contextlib.suppress(Exception):
                    await pool.release(connection)
            raise
        return self.client


class _PoolConnection(PoolConnectionWrapper[Any]):
    """A connection for one statement, waited for at most ``acquire_timeout``."""

    async def __aenter__(self) -> Any:
        await self.ensure_connection()
        client = self.client
        assert isinstance(client, SafeAsyncpgDBClient)
        self.connection = await _acquire(client)
        return self.connection


class SafeAsyncpgDBClient(AsyncpgDBClient):
    def __init__(self, *args: Any, acquire_timeout: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.acquire_timeout = (
            DEFAULT_ACQUIRE_TIMEOUT if acquire_timeout is None else float(acquire_timeout)
        )

    def acquire_connection(self) -> Any:
        return _PoolConnection(self, self._pool_init_lock)

    def _in_transaction(self) -> Any:
        return _TransactionContext(TransactionWrapper(self), self._pool_init_lock)

    def pool_stats(self) -> dict[str, int]:
        """The pool's size, connections idle and in use, and its maximum (``/metrics``)."""
        pool: Any = self._pool
        if pool is None:
            return {"max": self.pool_maxsize, "size": 0, "idle": 0, "in_use": 0}
        size, idle = pool.get_size(), pool.get_idle_size()
        return {"max": pool.get_max_size(), "size": size, "idle": idle, "in_use": size - idle}


client_class = SafeAsyncpgDBClient

__all__ = ["DatabaseUnavailable", "SafeAsyncpgDBClient", "client_class"]
