"""The notification outbox delivered over SMTP to an aiosmtpd server on loopback.

Each test queues its own notifications (fresh account, unique dedupe keys) and looks for
them at the SMTP server by their Message-ID, so mail other tests left in the outbox and a
sweep happened to deliver does not disturb it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta
from typing import Any, cast

import pytest
from starlette.applications import Starlette
from tortoise.transactions import in_transaction

from billing import clock
from billing.accounts import ensure_account
from billing.enums import NotificationKind
from billing.models import Notification
from billing.notifications import outbox
from runtime.mailer import LogMailer, Mailer, SmtpMailer, make_mailer
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import Caller
from tests.support.mailbox import SmtpServer, free_port
from workers.context import JobContext
from workers.mail import (
    MAIL_FUNCTIONS,
    deliver_pending_notifications,
    notification_job_id,
    send_notification,
)

MAIL_FROM = "Purchase Credits <credits@example.test>"


@pytest.fixture
def mailer(smtp: SmtpServer) -> SmtpMailer:
    return SmtpMailer(smtp.url, mail_from=MAIL_FROM, timeout=10)


@pytest.fixture
async def account(app: Starlette) -> str:
    """A fresh account (the app fixture has initialised the ORM)."""
    account_id = f"acct-{uuid.uuid4().hex[:12]}"
    await ensure_account(account_id)
    return account_id


async def queue(
    account_id: str,
    *,
    recipients: list[str] | None = None,
    key: str | None = None,
    subject: str = "Your credits were recharged",
    body: str = "1,000 credits were added.",
) -> int:
    async with in_transaction():
        notification_id = await outbox.queue(
            account_id,
            NotificationKind.RECHARGE_SUCCEEDED,
            dedupe_key=key or f"test:{uuid.uuid4().hex}",
            subject=subject,
            body=body,
            recipients=recipients,
        )
    assert notification_id is not None
    return notification_id


def mail_queue(mailer: Mailer) -> InProcessQueue:
    """The mail job functions run in this process, as the embedded default runs them."""
    q = InProcessQueue(MAIL_FUNCTIONS, {})
    q.ctx.update(mailer=mailer, queue=q)
    return q


async def sweep(q: InProcessQueue) -> None:
    await deliver_pending_notifications(cast("JobContext", q.ctx))
    await q.drain()


class EveryDeliveryQueue(InProcessQueue):
    """A queue that runs each enqueue twice, whatever its job id (a job delivered twice)."""

    async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
        await super().enqueue(function, *args, job_id=f"{job_id}:a")
        return await super().enqueue(function, *args, job_id=f"{job_id}:b")


class GateMailer:
    """Holds a send open until released, so a second sender runs while the first sends."""

    def __init__(self, inner: Mailer) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def send(self, *, to: list[str], subject: str, body: str, message_id: str) -> None:
        self.entered.set()
        await self.release.wait()
        await self.inner.send(to=to, subject=subject, body=body, message_id=message_id)


async def test_sent_once_with_recipients_subject_and_message_id(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    nid = await queue(
        account,
        recipients=["ops@example.test", "finance@example.test", "ops@example.test"],
        subject="Recharge\r\nBcc: victim@example.test",
        body="Hello,\n\n1,000 credits were added to your account.\n",
    )
    assert nid in await outbox.due_ids(10_000)

    assert await outbox.send_one(nid, mailer) is True
    assert await outbox.send_one(nid, mailer) is False

    mid = outbox.message_id(nid)
    assert mid == f"<notification-{nid}@credits>"
    [got] = smtp.inbox.with_id(mid)
    assert got.mail_from == "credits@example.test"
    assert got.rcpt_tos == ["ops@example.test", "finance@example.test"]
    assert got.message["To"] == "ops@example.test, finance@example.test"
    assert got.message["From"] == MAIL_FROM
    assert got.message["Subject"] == "Recharge Bcc: victim@example.test"
    assert got.message["Bcc"] is None
    assert got.message["Date"] is not None
    assert "1,000 credits were added" in got.message.get_content()

    row = await Notification.get(id=nid)
    assert row.sent_at is not None
    assert row.attempts == 1
    assert row.next_attempt_at is None
    assert row.last_error is None
    assert nid not in await outbox.due_ids(10_000)


async def test_default_recipients_are_the_accounts_admins(
    admin: Caller, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    await admin.gql("{ viewer { userId } }")  # the API records the admin and its e-mail
    nid = await queue(admin.account_id)

    assert await outbox.send_one(nid, mailer) is True
    [got] = smtp.inbox.with_id(outbox.message_id(nid))
    assert got.rcpt_tos == ["admin@example.com"]
    assert got.message["To"] == "admin@example.com"
    assert got.message["Subject"] == "Your credits were recharged"


async def test_no_admin_and_no_recipients_queues_nothing(account: str) -> None:
    async with in_transaction():
        nid = await outbox.queue(
            account,
            NotificationKind.BALANCE_LOW,
            dedupe_key=f"test:{uuid.uuid4().hex}",
            subject="Low balance",
            body="...",
        )
    assert nid is None


async def test_concurrent_send_one_sends_once(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    nid = await queue(account, recipients=["ops@example.test"])
    results = await asyncio.gather(*(outbox.send_one(nid, mailer) for _ in range(8)))
    assert sorted(results) == [False] * 7 + [True]
    assert len(smtp.inbox.with_id(outbox.message_id(nid))) == 1


async def test_second_sender_during_a_send_sends_nothing(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    nid = await queue(account, recipients=["ops@example.test"])
    gate = GateMailer(mailer)
    first = asyncio.create_task(outbox.send_one(nid, gate))
    await gate.entered.wait()  # the first has claimed the row and is sending

    assert await outbox.send_one(nid, mailer) is False
    assert nid not in await outbox.due_ids(10_000)  # the sweep leaves it alone too
    q = mail_queue(mailer)
    await sweep(q)
    assert smtp.inbox.with_id(outbox.message_id(nid)) == []

    gate.release.set()
    assert await first is True
    assert len(smtp.inbox.with_id(outbox.message_id(nid))) == 1
    assert (await Notification.get(id=nid)).attempts == 1


async def test_sweep_twice_and_concurrently_sends_each_once(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    ids = [await queue(account, recipients=[f"user{i}@example.test"]) for i in range(3)]
    q = mail_queue(mailer)
    await asyncio.gather(
        deliver_pending_notifications(cast("JobContext", q.ctx)),
        deliver_pending_notifications(cast("JobContext", q.ctx)),
    )
    await q.drain()
    await sweep(q)
    await sweep(q)

    for i, nid in enumerate(ids):
        [got] = smtp.inbox.with_id(outbox.message_id(nid))
        assert got.rcpt_tos == [f"user{i}@example.test"]
        assert (await Notification.get(id=nid)).sent_at is not None
    assert not set(ids) & set(await outbox.due_ids(10_000))


async def test_job_delivered_twice_sends_once(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    ids = [await queue(account, recipients=["ops@example.test"]) for _ in range(3)]
    q = EveryDeliveryQueue(MAIL_FUNCTIONS, {})
    q.ctx.update(mailer=mailer, queue=q)
    for nid in ids:  # what the event's code enqueues after its commit
        await q.enqueue("send_notification", nid, job_id=notification_job_id(nid))
    await asyncio.gather(
        deliver_pending_notifications(cast("JobContext", q.ctx)),
        deliver_pending_notifications(cast("JobContext", q.ctx)),
    )
    await q.drain()

    for nid in ids:
        assert len(smtp.inbox.with_id(outbox.message_id(nid))) == 1


async def test_send_notification_job(account: str, smtp: SmtpServer, mailer: SmtpMailer) -> None:
    nid = await queue(account, recipients=["ops@example.test"])
    ctx: Any = {"mailer": mailer}
    assert await send_notification(ctx, nid) is True
    assert await send_notification(ctx, nid) is False
    assert len(smtp.inbox.with_id(outbox.message_id(nid))) == 1


async def test_same_dedupe_key_twice_gives_one_email(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    key = f"test:{uuid.uuid4().hex}"
    nid = await queue(account, recipients=["ops@example.test"], key=key)
    async with in_transaction():
        again = await outbox.queue(
            account,
            NotificationKind.RECHARGE_SUCCEEDED,
            dedupe_key=key,
            subject="Your credits were recharged",
            body="...",
            recipients=["someone-else@example.test"],
        )
    assert again is None
    assert await Notification.filter(dedupe_key=key).count() == 1

    await sweep(mail_queue(mailer))
    assert await outbox.send_one(nid, mailer) is False
    [got] = smtp.inbox.with_id(outbox.message_id(nid))
    assert got.rcpt_tos == ["ops@example.test"]


@pytest.mark.parametrize("refuse", ["rcpt", "data"])
async def test_refused_then_retried_after_backoff(
    account: str, smtp: SmtpServer, mailer: SmtpMailer, refuse: str
) -> None:
    nid = await queue(account, recipients=["ops@example.test"])
    mid = outbox.message_id(nid)
    q = mail_queue(mailer)
    smtp.inbox.refuse = refuse

    assert await outbox.send_one(nid, mailer) is False
    row = await Notification.get(id=nid)
    assert row.sent_at is None
    assert row.attempts == 1
    assert row.last_error is not None and "550" in row.last_error
    assert row.next_attempt_at is not None and row.next_attempt_at > clock.now()
    assert smtp.inbox.with_id(mid) == []

    # Not due before its time: neither a direct call nor the sweep tries again.
    assert nid not in await outbox.due_ids(10_000)
    assert await outbox.send_one(nid, mailer) is False
    await sweep(q)
    assert (await Notification.get(id=nid)).attempts == 1

    smtp.inbox.refuse = None
    with clock.travel(row.next_attempt_at + timedelta(seconds=1)):
        assert nid in await outbox.due_ids(10_000)
        await asyncio.gather(sweep(q), sweep(q))
        assert await outbox.send_one(nid, mailer) is False
        await sweep(q)

    assert len(smtp.inbox.with_id(mid)) == 1
    row = await Notification.get(id=nid)
    assert row.sent_at is not None
    assert row.attempts == 2
    assert row.last_error is None
    assert row.next_attempt_at is None


async def test_unreachable_server_backs_off_and_is_never_lost(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    nid = await queue(account, recipients=["ops@example.test"])
    down = SmtpMailer(f"smtp://127.0.0.1:{free_port()}", mail_from=MAIL_FROM, timeout=10)

    assert await outbox.send_one(nid, down) is False
    first = await Notification.get(id=nid)
    assert (first.attempts, first.sent_at) == (1, None)
    assert first.last_error and first.next_attempt_at is not None
    assert await outbox.send_one(nid, mailer) is False  # not before its time

    with clock.travel(first.next_attempt_at + timedelta(seconds=1)):
        assert await outbox.send_one(nid, down) is False
        second = await Notification.get(id=nid)
        assert (second.attempts, second.sent_at) == (2, None)
        assert second.next_attempt_at is not None
        assert await outbox.send_one(nid, mailer) is False

    # The wait doubled: still not due when the first wait would have passed again.
    with clock.travel(second.next_attempt_at - outbox.retry_delay(1)):
        assert nid not in await outbox.due_ids(10_000)
    with clock.travel(second.next_attempt_at + timedelta(seconds=1)):
        assert await outbox.send_one(nid, mailer) is True
    assert len(smtp.inbox.with_id(outbox.message_id(nid))) == 1
    assert (await Notification.get(id=nid)).attempts == 3


def test_backoff_doubles_to_an_hour_and_never_stops() -> None:
    minutes = [outbox.retry_delay(n) / timedelta(minutes=1) for n in range(1, 10)]
    assert minutes == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert outbox.retry_delay(10_000) == timedelta(hours=1)


async def test_some_recipients_refused_is_not_resent(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    smtp.inbox.refuse_rcpt = {"gone@example.test"}
    nid = await queue(account, recipients=["ops@example.test", "gone@example.test"])

    assert await outbox.send_one(nid, mailer) is True
    [got] = smtp.inbox.with_id(outbox.message_id(nid))
    assert got.rcpt_tos == ["ops@example.test"]
    row = await Notification.get(id=nid)
    assert row.sent_at is not None
    assert row.last_error is not None and "gone@example.test" in row.last_error
    assert nid not in await outbox.due_ids(10_000)


async def test_rolled_back_notification_never_exists(
    account: str, smtp: SmtpServer, mailer: SmtpMailer
) -> None:
    key = f"test:{uuid.uuid4().hex}"

    class Boom(Exception):
        pass

    nid: int | None = None
    with pytest.raises(Boom):
        async with in_transaction():
            nid = await outbox.queue(
                account,
                NotificationKind.INVOICE_FAILED,
                dedupe_key=key,
                subject="Invoice failed",
                body="...",
                recipients=["ops@example.test"],
            )
            assert nid is not None
            raise Boom
    assert nid is not None
    assert not await Notification.filter(id=nid).exists()
    assert not await Notification.filter(dedupe_key=key).exists()
    assert nid not in await outbox.due_ids(10_000)
    assert await outbox.send_one(nid, mailer) is False
    await sweep(mail_queue(mailer))
    assert smtp.inbox.with_id(outbox.message_id(nid)) == []

    # The key was never used: the event happening for real queues it.
    again = await queue(account, recipients=["ops@example.test"], key=key)
    assert await outbox.send_one(again, mailer) is True
    assert len(smtp.inbox.with_id(outbox.message_id(again))) == 1


async def test_send_one_refuses_to_run_inside_a_transaction(account: str) -> None:
    nid = await queue(account, recipients=["ops@example.test"])
    with pytest.raises(RuntimeError):
        async with in_transaction():
            await outbox.send_one(nid, LogMailer(mail_from=MAIL_FROM))
    assert (await Notification.get(id=nid)).attempts == 0
    assert await outbox.send_one(nid, LogMailer(mail_from=MAIL_FROM)) is True


async def test_log_mailer_logs_the_mail(account: str, caplog: pytest.LogCaptureFixture) -> None:
    nid = await queue(
        account,
        recipients=["ops@example.test"],
        subject="Auto-recharge paused",
        body="Your card was declined three times.",
    )
    with caplog.at_level(logging.INFO, logger="runtime.mailer"):
        assert await outbox.send_one(nid, LogMailer(mail_from=MAIL_FROM)) is True
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "runtime.mailer")
    assert outbox.message_id(nid) in text
    assert "ops@example.test" in text
    assert "Auto-recharge paused" in text
    assert "Your card was declined three times." in text
    assert (await Notification.get(id=nid)).sent_at is not None


def test_make_mailer_from_settings() -> None:
    def settings(**kw: Any) -> Settings:
        return Settings(_env_file=None, **kw)

    assert isinstance(make_mailer(settings(smtp_url=None)), LogMailer)

    m = make_mailer(settings(smtp_url="smtps://mailer:p%40ss@mail.example.test"))
    assert isinstance(m, SmtpMailer)
    assert (m.host, m.port, m.use_tls, m.username) == ("mail.example.test", 465, True, "mailer")
    assert m.mail_from == "Purchase Credits <credits@localhost>"
    assert "p@ss" not in repr(m) and "p%40ss" not in repr(m)

    m = SmtpMailer("smtp://relay.example.test?starttls=true", mail_from=MAIL_FROM)
    assert (m.port, m.use_tls, m.start_tls) == (587, False, True)
    m = SmtpMailer("smtp://relay.example.test:2525", mail_from=MAIL_FROM)
    assert (m.port, m.use_tls, m.start_tls) == (2525, False, None)

    for bad in ("http://relay", "smtp://", "smtps://relay?starttls=true", "smtp://relay?x=1"):
        with pytest.raises(ValueError):
            SmtpMailer(bad, mail_from=MAIL_FROM)
