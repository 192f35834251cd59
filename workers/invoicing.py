"""Monthly invoice jobs: thin arq-style functions over ``billing.invoices``.

- ``close_monthly_invoices`` (cron, hourly: each account's month closes at midnight on the
  first in its own time zone) closes last month for every account that needs it, one
  transaction per account, and enqueues each new invoice's charge after its commit.
- ``charge_invoice`` tries one charge (``billing.invoices.charge_invoice`` owns its
  transactions: the payment row commits before the gateway is called); the notice it
  writes is queued right after (``runtime.effects``).
- ``retry_due_invoices`` (cron) enqueues the invoices whose backoff has run out, and any
  whose first charge was never enqueued (Redis down at month end).

Registered by ``workers.jobs`` from ``INVOICE_FUNCTIONS``.
"""

from __future__ import annotations

import logging
import uuid

from tortoise.transactions import in_transaction

from billing import changes, invoices
from billing.enums import InvoiceStatus
from billing.models import Invoice
from runtime import effects, jobids
from runtime.queue import JobFunction, JobQueue
from workers.context import JobContext

log = logging.getLogger(__name__)


def charge_job_id(invoice: Invoice) -> str:
    """One job per charge attempt: a job delivered twice runs once."""
    return jobids.invoice_charge(invoice.id, invoices.next_attempt(invoice))


async def _enqueue_charge(queue: JobQueue | None, invoice: Invoice) -> bool:
    if queue is None:
        return False
    return await queue.enqueue("charge_invoice", str(invoice.id), job_id=charge_job_id(invoice))


async def close_monthly_invoices(ctx: JobContext) -> int:
    """Close last month (each account's own calendar) into invoices; returns how many
    invoices this run created. Running it again creates and charges nothing more."""
    book = ctx["book"]
    created = 0
    for month in await invoices.months_to_close():
        try:
            async with in_transaction():
                closed = await invoices.close_month(
                    month.account_id, month.period_start, month.period_end, currency=book.currency
                )
        except Exception:  # one account's failure must not stop the others' invoices
            log.exception("could not close %s for account %s", month.period_start, month.account_id)
            continue
        if closed is None or not closed.created:
            continue
        created += 1
        if closed.invoice.status is InvoiceStatus.OPEN:
            await _enqueue_charge(ctx.get("queue"), closed.invoice)
    return created


async def charge_invoice(ctx: JobContext, invoice_id: str) -> str:
    """Charge one invoice if it is open and due (safe to deliver any number of times)."""
    try:
        parsed = uuid.UUID(invoice_id)
    except ValueError:
        log.error("charge_invoice: %r is not an invoice id", invoice_id)
        return invoices.ChargeOutcome.NOT_FOUND.value
    with changes.collect() as changed:
        outcome = await invoices.charge_invoice(ctx["gateway"], parsed)
    # The invoice's notice (paid, or the charge failed) goes out now, not at the next sweep.
    await effects.after_commit(changed, queue=ctx.get("queue"), live=ctx.get("live"))
    return outcome.value


async def retry_due_invoices(ctx: JobContext) -> int:
    """Enqueue a charge for every open invoice that is due; returns how many."""
    async with in_transaction():
        due = await invoices.due_invoices()
    queued = 0
    for invoice in due:
        queued += await _enqueue_charge(ctx.get("queue"), invoice)
    return queued


INVOICE_FUNCTIONS: dict[str, JobFunction] = {
    "close_monthly_invoices": close_monthly_invoices,
    "charge_invoice": charge_invoice,
    "retry_due_invoices": retry_due_invoices,
}
