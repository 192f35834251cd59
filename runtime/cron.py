"""The periodic jobs: one list, run by arq's cron in production (``workers.settings``) and by
an in-process ticker in the embedded default (``ticking``, started by the API's lifespan).

A periodic job is named by its job function's registered name (``workers.jobs``): this
module only knows names and periods, so the API and the workers share it without the one
importing the other. The jobs are safe to run any number of times (each heals or queues
what is due), so a tick that runs late or twice changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from runtime import jobids
from runtime.queue import JobQueue

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Periodic:
    name: str  # the job function's registered name
    minutes: int  # every this many minutes (60 or more: hourly, at minute 5)
    #: Seconds of the minute it runs at under arq; more than one: more often than each minute.
    seconds: frozenset[int] = frozenset({0})

    def arq_minutes(self) -> set[int]:
        """The minutes of the hour arq's cron runs it at."""
        return {5} if self.minutes >= 60 else set(range(0, 60, self.minutes))

    def due_at_tick(self, tick: int) -> bool:
        """Whether the in-process ticker runs it at ``tick`` (1, 2, ...): the first tick,
        then every ``minutes`` ticks."""
        return (tick - 1) % self.minutes == 0


#: Months close at each account's local midnight, so invoices are looked for every hour.
#: The sweep settles what a fault left half-done (a payment stuck PENDING past
#: ``billing.recharge.runs.STUCK_AFTER``, a recharge nobody could queue) within seconds of
#: the fault ending, not minutes: it runs four times a minute under arq.
PERIODIC: tuple[Periodic, ...] = (
    Periodic("enqueue_due_schedules", 1),
    Periodic("sweep", 1, frozenset({0, 15, 30, 45})),
    Periodic("deliver_pending_notifications", 1),
    Periodic("retry_due_invoices", 10),
    Periodic("close_monthly_invoices", 60),
)


async def tick(queue: JobQueue, number: int) -> None:
    """Enqueue the periodic jobs due at tick ``number``; a failure to enqueue one is logged
    and does not stop the others."""
    for job in PERIODIC:
        if job.due_at_tick(number):
            try:
                await queue.enqueue(job.name, job_id=jobids.cron_tick(job.name, number))
            except Exception:  # the ticker outlives any one tick (the jobs log their own)
                log.exception("could not start the periodic job %s", job.name)


async def run_periodic(queue: JobQueue, period_seconds: float) -> None:
    """The embedded default's cron: a tick every ``period_seconds`` (standing for a
    minute), for ever."""
    number = 0
    while True:
        await asyncio.sleep(period_seconds)
        number += 1
        await tick(queue, number)


@contextlib.asynccontextmanager
async def ticking(queue: JobQueue, period_seconds: float) -> AsyncIterator[None]:
    """Run the periodic jobs on ``queue`` while the block runs (not at all when
    ``period_seconds`` is 0 or less); the ticker is stopped when the block ends."""
    if period_seconds <= 0:
        yield
        return
    ticker = asyncio.create_task(run_periodic(queue, period_seconds), name="periodic-jobs")
    try:
        yield
    finally:
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
