"""E-mail notifications through an outbox.

``queue`` writes the message in the caller's transaction, together with the event it tells
of, so a notice is never lost and never written twice (``dedupe_key`` is unique). A job
sends it after commit; the sweep resends what is still unsent.
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta
from typing import Any, NamedTuple

from tortoise.backends.base.client import TransactionalDBClient
from tortoise.transactions import in_transaction

from billing import changes, clock, sql
from billing.accounts import admin_emails
from billing.enums import NotificationKind
from billing.notifications.mailer import Mailer, MailRefused

log = logging.getLogger(__name__)

MAX_SUBJECT = 300


async def queue(
    account_id: str,
    kind: NotificationKind,
    *,
    dedupe_key: str,
    subject: str,
    body: str,
    recipients: list[str] | None = None,
) -> int | None:
    """Write an outbox row (caller's transaction). ``recipients=None`` means the account's
    admins. Returns the row id, or None if this ``dedupe_key`` was queued before or there
    is nobody to tell."""
    to = list(dict.fromkeys(recipients if recipients else await admin_emails(account_id)))
    if not to:
        return None
    rows = await sql.fetch(
        "INSERT INTO notification (account_id, kind, dedupe_key, recipients, subject, body, "
        "created_at, attempts) VALUES (?, ?, ?, ?, ?, ?, ?, 0) "
        "ON CONFLICT (dedupe_key) DO NOTHING RETURNING id",
        account_id,
        kind.value,
        dedupe_key[:255],
        json.dumps(to),
        subject[:MAX_SUBJECT],
        body,
        sql.now(),
    )
    notification_id = int(rows[0]["id"]) if rows else None
    # Sent right after the caller's commit (by whoever collects the changes); the cron
    # only heals what a lost enqueue left behind.
    changes.notification_queued(notification_id)
    return notification_id


# --- Delivery -----------------------------------------------------------------------------
#
# ``send_one`` claims the row, sends outside any transaction, then marks it sent:
#
# 1. Claim: one conditional UPDATE (its own short transaction) that succeeds only while the
#    row is unsent and due, bumps ``attempts`` and pushes ``next_attempt_at`` to the end of
#    a lease. A second caller (a job delivered twice, the sweep, another worker) finds the
#    row not due and sends nothing. ``attempts`` doubles as the claim's fencing token.
# 2. Send to the SMTP relay, no transaction open, bounded by SEND_TIMEOUT (< LEASE).
# 3. Mark sent (``sent_at``), or on failure record ``last_error`` and set ``next_attempt_at``
#    by capped exponential backoff. A notice is retried for as long as it takes.
#
# At-least-once window: if the process dies (or the database is unreachable) after the relay
# accepted the message but before ``sent_at`` is written, the lease expires and the message
# is sent again. The Message-ID is deterministic (``<notification-{id}@credits>``), so a
# receiver can drop the duplicate. The same holds if a relay accepts a message but its reply
# is lost (a timeout after DATA).

LEASE = timedelta(minutes=10)
SEND_TIMEOUT = timedelta(minutes=2)
FIRST_RETRY = timedelta(minutes=1)
MAX_RETRY = timedelta(hours=1)
MAX_ERROR = 500


def message_id(notification_id: int) -> str:
    return f"<notification-{notification_id}@credits>"


def retry_delay(attempts: int) -> timedelta:
    """The wait after the ``attempts``-th failed try: 1 min, 2, 4, ... capped at 1 h."""
    exponent = min(max(attempts - 1, 0), 16)
    return min(FIRST_RETRY * (1 << exponent), MAX_RETRY)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return " ".join(text.split())[:MAX_ERROR]


def _recipients(value: Any) -> list[str]:
    decoded = json.loads(value) if isinstance(value, str | bytes) else value
    return [str(r) for r in decoded or []]


async def send_one(notification_id: int, mailer: Mailer) -> bool:
    """Send one notification if it is unsent and due; True if this call sent it.

    Never call it inside a transaction: the claim must commit before the e-mail goes out.
    A failure is recorded on the row (retried later by ``due_ids``' sweep), not raised.
    """
    if isinstance(sql.connection(), TransactionalDBClient):
        raise RuntimeError("send_one must not run inside a transaction")
    now = clock.now()
    async with in_transaction():
        rows = await sql.fetch(
            "UPDATE notification SET attempts = attempts + 1, next_attempt_at = ? "
            "WHERE id = ? AND sent_at IS NULL "
            "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) "
            "RETURNING recipients, subject, body, attempts",
            now + LEASE,
            notification_id,
            now,
        )
    if not rows:
        return False  # sent already, claimed by someone else, waiting to retry, or unknown
    row = rows[0]
    attempt = int(row["attempts"])
    to = _recipients(row["recipients"])
    error: str | None = None
    try:
        if not to:
            raise ValueError("no recipients")
        async with asyncio.timeout(SEND_TIMEOUT.total_seconds()):
            await mailer.send(
                to=to,
                subject=str(row["subject"]),
                body=str(row["body"]),
                message_id=message_id(notification_id),
            )
    except MailRefused as exc:
        # Accepted for some recipients: retrying would send them a second copy.
        error = _describe(exc)
        log.warning("notification %s partly refused: %s", notification_id, error)
    except Exception as exc:  # the relay refused or was unreachable: retry later
        delay = retry_delay(attempt)
        log.warning(
            "notification %s not sent (attempt %s), retry in %s: %s",
            notification_id,
            attempt,
            delay,
            _describe(exc),
        )
        await sql.execute(
            "UPDATE notification SET next_attempt_at = ?, last_error = ? "
            "WHERE id = ? AND sent_at IS NULL AND attempts = ?",
            clock.now() + delay,
            _describe(exc),
            notification_id,
            attempt,
        )
        return False
    await sql.execute(
        "UPDATE notification SET sent_at = ?, next_attempt_at = NULL, last_error = ? "
        "WHERE id = ? AND sent_at IS NULL",
        clock.now(),
        error,
        notification_id,
    )
    return True


class Due(NamedTuple):
    id: int
    attempts: int


async def due(limit: int = 500, *, after_id: int = 0) -> list[Due]:
    """Unsent notifications whose time has come (never tried, retry due, or lease expired),
    by id from ``after_id`` on; served by the (sent_at, next_attempt_at) index."""
    rows = await sql.fetch(
        "SELECT id, attempts FROM notification WHERE sent_at IS NULL "
        "AND (next_attempt_at IS NULL OR next_attempt_at <= ?) AND id > ? "
        "ORDER BY id LIMIT ?",
        clock.now(),
        after_id,
        limit,
    )
    return [Due(int(r["id"]), int(r["attempts"])) for r in rows]


async def due_ids(limit: int = 500, *, after_id: int = 0) -> list[int]:
    return [d.id for d in await due(limit, after_id=after_id)]
