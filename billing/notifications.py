"""E-mail notifications through an outbox.

``queue`` writes the message in the caller's transaction, together with the event it tells
of, so a notice is never lost and never written twice (``dedupe_key`` is unique). A job
sends it after commit; the sweep resends what is still unsent.
"""

from __future__ import annotations

import json

from billing import sql
from billing.accounts import admin_emails
from billing.enums import NotificationKind

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
    return int(rows[0]["id"]) if rows else None
