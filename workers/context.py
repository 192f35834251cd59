"""The typed context every job function receives first (arq's ``ctx``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:
    from billing.payments.gateways import PaymentGateway
    from billing.pricing import PriceBook
    from runtime.live import Broadcaster
    from runtime.queue import JobQueue
    from runtime.settings import Settings


class JobContext(TypedDict, total=False):
    settings: Settings
    gateway: PaymentGateway
    book: PriceBook
    queue: JobQueue  # to enqueue follow-up jobs (after the job's own commit)
    mailer: Any  # runtime.mailer.Mailer
    live: Broadcaster  # live balance updates, published after the job's commit
    job_id: str
