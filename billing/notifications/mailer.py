"""The port the outbox sends e-mail through; ``runtime.mailer`` implements it (SMTP, or the
log in development), so the domain names no transport."""

from __future__ import annotations

from typing import Protocol


class Mailer(Protocol):
    async def send(self, *, to: list[str], subject: str, body: str, message_id: str) -> None:
        """Deliver one e-mail to the relay; raise if it was not accepted."""
        ...


class MailRefused(Exception):
    """The relay accepted the message for some recipients and refused the others."""

    def __init__(self, refused: dict[str, str]) -> None:
        self.refused = refused
        super().__init__("refused " + "; ".join(f"{k}: {v}" for k, v in refused.items()))
