"""The services a process builds once and its work shares: settings, the payment gateway,
the price book, the mailer, the job queue and the live-balance broadcaster.

An arq worker builds them at start-up (``workers.settings``) and every job finds them in its
``ctx`` (``workers.context.JobContext``); the API builds the same set (its in-process queue
hands them to the jobs it runs, so they hold what an arq worker would). Which queue and
broadcaster a process uses is its own choice: in process, or Redis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from billing.notifications.mailer import Mailer
from billing.payments.gateways import PaymentGateway
from billing.pricing import PriceBook, load_price_book
from runtime.factory import make_gateway
from runtime.live import Broadcaster
from runtime.mailer import make_mailer
from runtime.queue import JobQueue
from runtime.settings import Settings


@dataclass
class Services:
    settings: Settings
    gateway: PaymentGateway
    book: PriceBook
    mailer: Mailer
    queue: JobQueue  # to enqueue follow-up jobs (after the work's own commit)
    live: Broadcaster  # live balance updates, published after the work's commit

    def job_context(self) -> dict[str, Any]:
        """What every job finds in its ``ctx`` (see ``workers.context.JobContext``)."""
        return {
            "settings": self.settings,
            "gateway": self.gateway,
            "book": self.book,
            "mailer": self.mailer,
            "queue": self.queue,
            "live": self.live,
        }


def build(
    settings: Settings,
    *,
    queue: JobQueue,
    live: Broadcaster,
    gateway: PaymentGateway | None = None,
) -> Services:
    """The services for ``settings``: the gateway its settings name unless one is given
    (tests give theirs), the price book at ``PRICE_BOOK_PATH``, the mailer of ``SMTP_URL``."""
    return Services(
        settings=settings,
        gateway=gateway or make_gateway(settings),
        book=load_price_book(settings.price_book_path),
        mailer=make_mailer(settings),
        queue=queue,
        live=live,
    )


async def verify_gateway(gateway: PaymentGateway) -> None:
    """Check the gateway's credentials where it can (Stripe): a wrong key stops start-up
    with a clear message instead of failing the first charge."""
    verify = getattr(gateway, "verify", None)
    if verify is not None:
        await verify()
