"""Job functions that deliver the notification outbox (``billing.notifications.outbox``).

``send_notification`` is enqueued after the transaction that queued a notification
commits (``runtime.effects.after_commit``; job ids from ``runtime.jobids``);
``deliver_pending_notifications`` is the cron sweep that (re-)enqueues whatever is due:
never sent because an enqueue was lost, a retry after an SMTP failure, or a claim whose
worker died.
"""

from __future__ import annotations

from billing.notifications import outbox
from billing.notifications.mailer import Mailer
from runtime.jobids import notification_job_id as notification_job_id
from runtime.mailer import make_mailer
from runtime.queue import JobFunction
from workers.context import JobContext

SWEEP_BATCH = 500


def _mailer(ctx: JobContext) -> Mailer:
    mailer: Mailer | None = ctx.get("mailer")
    if mailer is None:
        mailer = make_mailer(ctx["settings"])
        ctx["mailer"] = mailer
    return mailer


async def send_notification(ctx: JobContext, notification_id: int) -> bool:
    """Send one notification; False if it was sent already, is not due, or failed (the
    failure is recorded on the row and the sweep retries it)."""
    return await outbox.send_one(notification_id, _mailer(ctx))


async def deliver_pending_notifications(ctx: JobContext) -> int:
    """Enqueue every due notification, a page at a time; returns how many were enqueued."""
    queued = 0
    after_id = 0
    while True:
        page = await outbox.due(SWEEP_BATCH, after_id=after_id)
        for item in page:
            if await ctx["queue"].enqueue(
                "send_notification",
                item.id,
                job_id=notification_job_id(item.id, item.attempts),
            ):
                queued += 1
        if len(page) < SWEEP_BATCH:
            return queued
        after_id = page[-1].id


MAIL_FUNCTIONS: dict[str, JobFunction] = {
    "send_notification": send_notification,
    "deliver_pending_notifications": deliver_pending_notifications,
}
