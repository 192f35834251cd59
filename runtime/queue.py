"""Where jobs go: arq on Redis in production, tasks in this process in the embedded default.

Both run the same job functions (``workers.jobs``) with an arq-style ``ctx`` first
argument. Job ids are deterministic, so enqueueing the same job twice runs it once.
Enqueue only after the transaction that made the job necessary has committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from runtime.resilience import Outage

log = logging.getLogger(__name__)

JobFunction = Callable[..., Awaitable[Any]]
REDIS_TIMEOUT = 2.0  # seconds, to connect and per command (the API's enqueues)


class JobQueue(Protocol):
    async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
        """Queue ``function(*args)`` under ``job_id``; False if it could not be queued."""
        ...

    async def close(self) -> None: ...


def notification_job_id(notification_id: int, attempts: int = 0) -> str:
    """One job id per try: a retry (``attempts`` moved on) is not taken for a finished job
    whose result arq still keeps, while the same try enqueued twice runs once."""
    return f"notification:{notification_id}:{attempts}"


class InProcessQueue:
    """Runs jobs as asyncio tasks in this process; a job id already running is not re-run."""

    def __init__(
        self, functions: dict[str, JobFunction], ctx: dict[str, Any] | None = None
    ) -> None:
        self.functions = dict(functions)
        self.ctx: dict[str, Any] = dict(ctx or {})
        self.ctx["queue"] = self
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    def bind(self, **ctx: Any) -> None:
        """Give the jobs what they need (settings, gateway, book, mailer)."""
        self.ctx.update(ctx)

    async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
        if function not in self.functions:
            raise KeyError(f"unknown job function {function}")
        running = self._tasks.get(job_id)
        if running is not None and not running.done():
            return True
        task = asyncio.get_running_loop().create_task(self._run(function, args, job_id))
        self._tasks[job_id] = task
        return True

    async def _run(self, function: str, args: tuple[Any, ...], job_id: str) -> Any:
        try:
            return await self.functions[function]({**self.ctx, "job_id": job_id}, *args)
        except Exception:
            log.exception("job %s (%s) failed", job_id, function)
            return None
        finally:
            if self._tasks.get(job_id) is asyncio.current_task():
                del self._tasks[job_id]

    async def drain(self) -> None:
        """Wait until every queued job (and any job those enqueue) has finished."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def close(self) -> None:
        await self.drain()


class ArqQueue:
    """Enqueues on Redis for ``arq`` workers. If Redis is down the job is not lost for
    good: the periodic sweep finds what it would have done."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.outage = Outage("Redis (job queue)", log)

    @classmethod
    async def connect(cls, redis_url: str) -> ArqQueue:
        """A queue on ``redis_url``; nothing is connected until used, so a process starts
        (degraded) while Redis is down. Short timeouts: a request never waits long on an
        unreachable Redis."""
        from arq.connections import ArqRedis

        return cls(
            ArqRedis.from_url(
                redis_url, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
            )
        )

    async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
        try:
            await self.pool.enqueue_job(function, *args, _job_id=job_id)
        except Exception as exc:  # Redis unreachable: the sweep will catch up
            self.outage.failed(exc)  # one warning per outage, not one per job
            log.debug("could not enqueue %s (%s): %s", function, job_id, exc)
            return False
        self.outage.recovered()
        return True

    async def ping(self) -> None:
        """Raises when Redis can't be reached (``/readyz``)."""
        await self.pool.ping()

    async def close(self) -> None:
        await self.pool.aclose()
