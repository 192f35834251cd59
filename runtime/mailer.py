"""Sending e-mail: over SMTP (``SMTP_URL``), or into the log in the embedded default.

``SMTP_URL`` forms:

- ``smtp://[user:pass@]host[:port]``: plain SMTP (port 25), upgraded with STARTTLS when
  the server offers it; ``?starttls=true`` requires STARTTLS (port 587 by default),
  ``?starttls=false`` never uses it.
- ``smtps://[user:pass@]host[:port]``: TLS from the first byte (port 465 by default).

User name and password are percent-decoded (``p%40ss`` is ``p@ss``).
"""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from urllib.parse import parse_qs, unquote, urlsplit

import aiosmtplib

from billing import clock, emails

# The port is the domain's (the outbox sends through it); named here too for callers.
from billing.notifications.mailer import Mailer as Mailer
from billing.notifications.mailer import MailRefused as MailRefused
from runtime.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0  # seconds, per SMTP command


def _one_line(value: str) -> str:
    return " ".join(value.split())


def build_message(
    *, mail_from: str, to: list[str], subject: str, body: str, message_id: str
) -> EmailMessage:
    checked = [a for a in (emails.normalized(address) for address in to) if a is not None]
    if len(checked) < len(to):  # never a header from an address not checked
        log.warning("dropped %d recipient(s) that are not e-mail addresses", len(to) - len(checked))
    if not checked:
        raise ValueError("no valid recipient")
    msg = EmailMessage()
    msg["From"] = mail_from
    msg["To"] = ", ".join(checked)
    msg["Subject"] = _one_line(subject)  # a header never carries a line break
    msg["Date"] = format_datetime(clock.now())
    msg["Message-ID"] = message_id
    msg.set_content(body)
    return msg


def _flag(query: dict[str, list[str]], name: str) -> bool | None:
    values = query.get(name)
    if not values:
        return None
    value = values[-1].strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"SMTP_URL: {name} must be true or false")


class SmtpMailer:
    """Sends through an SMTP relay with aiosmtplib, one connection per message."""

    def __init__(self, url: str, *, mail_from: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps"):
            raise ValueError("SMTP_URL must start with smtp:// or smtps://")
        if not parts.hostname:
            raise ValueError("SMTP_URL needs a host")
        query = parse_qs(parts.query)
        unknown = set(query) - {"starttls"}
        if unknown:
            raise ValueError(f"SMTP_URL: unknown parameter {', '.join(sorted(unknown))}")
        starttls = _flag(query, "starttls")
        self.use_tls = parts.scheme == "smtps"
        if self.use_tls and starttls:
            raise ValueError("SMTP_URL: smtps:// is TLS already; starttls=true needs smtp://")
        # None: STARTTLS if the server offers it (aiosmtplib's default).
        self.start_tls: bool | None = False if self.use_tls else starttls
        self.host = parts.hostname
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError("SMTP_URL has an invalid port") from exc
        self.port = port or (465 if self.use_tls else 587 if starttls else 25)
        self.username = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password is not None else None
        self.mail_from = mail_from
        self.envelope_from = parseaddr(mail_from)[1]
        if "@" not in self.envelope_from:
            raise ValueError("MAIL_FROM must contain an e-mail address")
        self.timeout = timeout

    def __repr__(self) -> str:  # never the password
        scheme = "smtps" if self.use_tls else "smtp"
        user = f"{self.username}@" if self.username else ""
        return f"SmtpMailer({scheme}://{user}{self.host}:{self.port})"

    async def send(self, *, to: list[str], subject: str, body: str, message_id: str) -> None:
        msg = build_message(
            mail_from=self.mail_from, to=to, subject=subject, body=body, message_id=message_id
        )
        refused, _ = await aiosmtplib.send(
            msg,
            sender=self.envelope_from,
            recipients=to,
            hostname=self.host,
            port=self.port,
            username=self.username,
            password=self._password,
            use_tls=self.use_tls,
            start_tls=self.start_tls,
            timeout=self.timeout,
        )
        # Every recipient refused raises (SMTPRecipientsRefused); some refused returns them.
        if refused:
            raise MailRefused({k: f"{v.code} {v.message}" for k, v in refused.items()})


class LogMailer:
    """The embedded default: writes the e-mail to the log instead of sending it."""

    def __init__(self, *, mail_from: str) -> None:
        self.mail_from = mail_from

    async def send(self, *, to: list[str], subject: str, body: str, message_id: str) -> None:
        log.info(
            "e-mail %s from %s to %s: %s\n%s",
            message_id,
            self.mail_from,
            ", ".join(to),
            _one_line(subject),
            body,
        )


def make_mailer(settings: Settings) -> Mailer:
    """SMTP when ``SMTP_URL`` is set, else the log."""
    if settings.smtp_url:
        return SmtpMailer(settings.smtp_url, mail_from=settings.mail_from)
    return LogMailer(mail_from=settings.mail_from)
