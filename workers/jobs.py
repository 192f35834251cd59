"""Job functions: each parses its arguments, calls one ``billing`` function (which owns or
is given its transaction), and enqueues follow-up jobs after that commit. A job that can
move a balance collects its changes and publishes them (live balance) after the commit."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from tortoise.transactions import in_transaction

from billing import changes
from billing.enums import AutoRechargeTrigger
from billing.recharge import runs
from billing.settlement import heal, webhooks
from runtime import effects, jobids
from runtime.jobmetrics import count_recharge, instrument
from runtime.queue import JobFunction
from workers.context import JobContext
from workers.invoicing import INVOICE_FUNCTIONS
from workers.mail import MAIL_FUNCTIONS

log = logging.getLogger(__name__)


async def after_commit(ctx: JobContext, changed: changes.Changes) -> None:
    """Publish the balance changes the job committed, send the notices it wrote and queue
    the recharges of the crossings it opened."""
    await effects.after_commit(changed, queue=ctx.get("queue"), live=ctx.get("live"))


async def process_gateway_event(ctx: JobContext, event_id: int) -> bool:
    """Apply a stored gateway (Stripe) event; a no-op if it was already applied."""
    try:
        with changes.collect() as changed:
            async with in_transaction():
                done = await webhooks.process(event_id)
    except Exception as exc:
        # Counted, so one event that keeps failing does not stay first in the sweep's list.
        await webhooks.count_failed_attempt(event_id, f"{type(exc).__name__}: {exc}")
        raise
    await after_commit(ctx, changed)
    return done


async def threshold_recharge(ctx: JobContext, account_id: str) -> str:
    """Recharge an account that fell below its threshold (re-checked under its lock)."""
    with changes.collect() as changed:
        result = await runs.run(
            ctx["gateway"], ctx["book"], account_id, AutoRechargeTrigger.THRESHOLD
        )
    await after_commit(ctx, changed)
    count_recharge(AutoRechargeTrigger.THRESHOLD.value, result.outcome.value)
    return result.outcome.value


async def scheduled_recharge(ctx: JobContext, account_id: str, due_at: str) -> str:
    """The scheduled recharge due at ``due_at`` (ISO), once."""
    with changes.collect() as changed:
        result = await runs.run(
            ctx["gateway"],
            ctx["book"],
            account_id,
            AutoRechargeTrigger.SCHEDULE,
            datetime.fromisoformat(due_at),
        )
    await after_commit(ctx, changed)
    count_recharge(AutoRechargeTrigger.SCHEDULE.value, result.outcome.value)
    return result.outcome.value


async def enqueue_due_schedules(ctx: JobContext) -> int:
    """Cron: queue every scheduled recharge whose time has come."""
    due = await runs.due_schedules()
    for account_id, at in due:
        await ctx["queue"].enqueue(
            "scheduled_recharge",
            account_id,
            at.isoformat(),
            job_id=jobids.scheduled_recharge(account_id, at),
        )
    return len(due)


async def sweep(ctx: JobContext) -> dict[str, int]:
    """Cron, the safety net: what a lost enqueue or a crash left behind.

    Accounts below their threshold with no recharge in flight get their job; payments stuck
    in PENDING are settled from the gateway's record; stored events not yet processed are
    processed."""
    below = await runs.below_threshold()
    for account_id, seq in below:
        await ctx["queue"].enqueue(
            "threshold_recharge", account_id, job_id=jobids.threshold_recharge(account_id, seq)
        )
    stuck = await runs.stuck_payments() + await runs.payments_to_recheck()
    healed = 0
    for payment_id in stuck:
        try:
            with changes.collect() as changed:
                await heal.heal_payment(ctx["gateway"], payment_id)
            await after_commit(ctx, changed)
            healed += 1
        except Exception:
            log.exception("could not settle stuck payment %s", payment_id)
    events = await webhooks.pending_events(older_than_seconds=60)
    for event_id, attempts in events:
        # A new job id per attempt: a kept (pending) event is tried again, not deduped.
        await ctx["queue"].enqueue(
            "process_gateway_event", event_id, job_id=jobids.gateway_event(event_id, attempts)
        )
    return {"below_threshold": len(below), "stuck_payments": healed, "events": len(events)}


FUNCTIONS: dict[str, JobFunction] = {
    "process_gateway_event": process_gateway_event,
    "threshold_recharge": threshold_recharge,
    "scheduled_recharge": scheduled_recharge,
    "enqueue_due_schedules": enqueue_due_schedules,
    "sweep": sweep,
    **MAIL_FUNCTIONS,
    **INVOICE_FUNCTIONS,
}


def all_functions() -> dict[str, Any]:
    """Every job function, timed and counted (``runtime.jobmetrics``)."""
    return {name: instrument(name, function) for name, function in FUNCTIONS.items()}
