"""E-mail addresses, checked by a maintained library (``email-validator``) wherever one
enters: notification recipients typed by an admin, the ``email`` claim of a token, and
every recipient again when a message is built. A hand-written pattern let ``a@b.com\\n``
(the message's headers then ended early) and ``x,y<z>@b.com`` (two recipients) through.
"""

from __future__ import annotations

from email_validator import EmailNotValidError, validate_email

MAX_ADDRESS = 254  # RFC 5321's path limit, less the angle brackets


def normalized(address: str) -> str | None:
    """The address in normal form, or ``None`` if it is not one plain ASCII address."""
    if not isinstance(address, str) or len(address) > MAX_ADDRESS:
        return None
    try:
        result = validate_email(
            address,
            check_deliverability=False,
            allow_smtputf8=False,
            # Syntax, not deliverability: .test names (RFC 2606) pass, as in the tests.
            test_environment=True,
        )
    except EmailNotValidError:
        return None
    return str(result.normalized)
