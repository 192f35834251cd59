"""Riding out lost dependencies, and noticing dead workers.

``Outage`` is how every long-running loop meets a dependency that went away: it keeps
going, waits with a growing backoff, writes one warning when the outage starts and one
line when it ends (with how long it lasted), never one per failed try.

``ResilientWorker`` is arq's worker made to survive Redis going away: arq's own poll loop
lets a redis ``ConnectionError`` escape and the process exits. Here a poll that fails for
Redis waits (backoff) and polls again; nothing of the worker's state is lost.

It also keeps a *liveness* record in Redis: every few seconds it writes the ids of the jobs
it is running under a key of its own that expires soon after (``credits:worker:<id>``). A
worker killed mid-job (``kill -9``, the machine lost) leaves arq's in-progress key behind,
and arq would refuse to run that job again, or anything enqueued under its id, until the
key expires. ``reap_orphaned_jobs`` (run by every live worker every few seconds) deletes an
in-progress key that no live worker claims, so the job, still in the queue, runs again
within seconds. Jobs are idempotent (each re-checks under its account's lock), so a job run
twice after a false alarm (a worker stalled past its liveness TTL) is safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from arq import Worker
from arq.constants import in_progress_key_prefix
from redis.exceptions import RedisError

from runtime import jobids

log = logging.getLogger(__name__)

#: What a lost Redis raises (a refused or reset connection, a timeout, a server error).
REDIS_DOWN: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

LIVENESS_PREFIX = "credits:worker:"
LIVENESS_EVERY = 2.0  # seconds between liveness writes
LIVENESS_TTL = 15.0  # a worker silent this long is dead
REAP_EVERY = 5.0  # seconds between looks for orphaned in-progress keys
#: An in-progress key younger than this is never reaped: its worker may not have written
#: its liveness record since it took the job.
REAP_GRACE = LIVENESS_TTL
SWEEP = "sweep"  # the job that finds what a lost enqueue left behind (workers.jobs)


class Outage:
    """One dependency's outages, for one loop: log once, back off, log the recovery."""

    def __init__(
        self, what: str, logger: logging.Logger, *, first: float = 0.5, cap: float = 5.0
    ) -> None:
        self.what = what
        self.log = logger
        self.first = first
        self.cap = cap
        self.since: float | None = None
        self.failures = 0

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Record a failed try; returns how long to wait before the next one."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning(
                "%s is unreachable (%s); retrying with backoff",
                self.what,
                exc or type(exc).__name__,
            )
        self.failures += 1
        return float(min(self.cap, self.first * 2 ** min(self.failures - 1, 10)))

    def recovered(self) -> None:
        if self.since is None:
            return
        lasted = time.monotonic() - self.since
        self.log.info("%s is back after %.1f s (%d failed tries)", self.what, lasted, self.failures)
        self.since = None
        self.failures = 0


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


async def _claimed_jobs(redis: Any) -> set[str]:
    """The job ids the live workers' liveness keys say they are running."""
    running: set[str] = set()
    async for key in redis.scan_iter(match=LIVENESS_PREFIX + "*", count=200):
        raw = await redis.get(key)
        if raw is None:
            continue
        try:
            running.update(str(job) for job in json.loads(raw).get("jobs", []))
        except (ValueError, AttributeError, TypeError):
            continue
    return running


async def _is_orphaned(redis: Any, key: str, in_progress_ttl_s: float) -> bool:
    """Whether in-progress ``key`` (of a queued job no live worker claims) is old enough
    to free: arq's own expiry on it says how long ago it was set."""
    left_ms = await redis.pttl(key)
    if left_ms < 0:  # gone meanwhile, or no expiry (not arq's): leave it
        return False
    age_s = in_progress_ttl_s - left_ms / 1000
    return bool(age_s >= REAP_GRACE)


async def reap_orphaned_jobs(redis: Any, queue_name: str, in_progress_ttl_s: float) -> list[str]:
    """Delete the in-progress keys of queued jobs no live worker claims (their worker
    died); returns the job ids freed. A key younger than ``REAP_GRACE`` is left alone, and
    so is the key arq keeps a while after a cron job ended (that job left the queue)."""
    running = await _claimed_jobs(redis)
    freed: list[str] = []
    async for key in redis.scan_iter(match=in_progress_key_prefix + "*", count=200):
        name = key.decode() if isinstance(key, bytes) else str(key)
        job_id = name[len(in_progress_key_prefix) :]
        if job_id in running or await redis.zscore(queue_name, job_id) is None:
            continue
        if await _is_orphaned(redis, name, in_progress_ttl_s) and await redis.delete(name):
            freed.append(job_id)
    if freed:
        log.warning("freed %d job(s) whose worker died: %s", len(freed), ", ".join(freed))
    return freed


class ResilientWorker(Worker):
    """arq's ``Worker`` that survives Redis outages and reaps dead workers' jobs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.worker_id = worker_id()
        self.redis_outage = Outage("Redis (arq worker)", log, cap=2.0)
        self._next_liveness = 0.0
        self._next_reap = 0.0

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
            await self._liveness()
            if self.redis_outage.ongoing:
                # What could not be queued meanwhile (the API's recharge jobs): the sweep
                # finds it now rather than at its next minute.
                await self.pool.enqueue_job(
                    SWEEP, _job_id=jobids.after_outage(SWEEP, uuid.uuid4().hex[:12])
                )
        except REDIS_DOWN as exc:
            await asyncio.sleep(self.redis_outage.failed(exc))
            return
        self.redis_outage.recovered()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq takes a slot (semaphore, counter) and then talks to Redis: a failure there
        # would keep the slot forever. Give it back.
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except REDIS_DOWN:
                self.job_counter -= 1
                self.sem.release()
                raise

    async def _liveness(self) -> None:
        now = time.monotonic()
        if now >= self._next_liveness:
            self._next_liveness = now + LIVENESS_EVERY
            jobs = [job for job, task in self.tasks.items() if not task.done()]
            await self.pool.set(
                LIVENESS_PREFIX + self.worker_id,
                json.dumps({"jobs": jobs}),
                px=int(LIVENESS_TTL * 1000),
            )
        if now >= self._next_reap:
            self._next_reap = now + REAP_EVERY
            await reap_orphaned_jobs(self.pool, self.queue_name, self.in_progress_timeout_s)

    async def close(self) -> None:
        if self._pool is not None:
            with contextlib.suppress(*REDIS_DOWN):
                await self.pool.delete(LIVENESS_PREFIX + self.worker_id)
        try:
            await super().close()
        except REDIS_DOWN:  # stopped during an outage: still close what the jobs opened
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
