"""The typed context every job function receives first (arq's ``ctx``): the services of
``runtime.services`` and the job's id."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from billing.notifications.mailer import Mailer
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
    mailer: Mailer
    live: Broadcaster  # live balance updates, published after the job's commit
    job_id: str
