"""What follows a commit: the one path from ``billing.changes`` to the world.

A resolver or a job collects what its billing call changed (``billing.changes.collect``)
and, once that call has committed, calls ``after_commit``: live listeners hear of every
balance change, every notice written to the outbox is sent (its job enqueued), and every
threshold crossing opened gets its recharge job. Job ids come from ``runtime.jobids``, so
an enqueue repeated (or done again by the sweep) runs once. Nothing here raises for a
queue or Redis that is away: what is lost, the crons heal.
"""

from __future__ import annotations

from billing.changes import Changes
from runtime import jobids
from runtime.live import Broadcaster
from runtime.queue import JobQueue


async def after_commit(
    changed: Changes, *, queue: JobQueue | None, live: Broadcaster | None
) -> None:
    """Once the work that ``changed`` collected has committed: publish, send, recharge."""
    if live is not None and changed.entries:
        await live.publish(changed.entries)
    if queue is None:
        return
    for notification_id in changed.notifications:
        await queue.enqueue(
            "send_notification",
            notification_id,
            job_id=jobids.notification_job_id(notification_id),
        )
    for crossing in changed.crossings:
        await queue.enqueue(
            "threshold_recharge",
            crossing.account_id,
            job_id=jobids.threshold_recharge(crossing.account_id, crossing.recharge_seq),
        )
