"""Expected failures are data: a ``UserError`` carries a code, the input field and a message.

Domain functions raise ``BillingError`` (holding one or more ``UserError``) so that the
caller's transaction rolls back and nothing is written; the API turns it into the
payload's ``errors`` list.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from billing.enums import ErrorCode


@dataclass(frozen=True, slots=True)
class UserError:
    code: ErrorCode
    message: str
    field: tuple[str, ...] | None = None


class BillingError(Exception):
    """An expected failure: the transaction is rolled back and the errors are returned."""

    def __init__(self, errors: UserError | Sequence[UserError]) -> None:
        self.errors: tuple[UserError, ...] = (
            (errors,) if isinstance(errors, UserError) else tuple(errors)
        )
        super().__init__("; ".join(f"{e.code.value}: {e.message}" for e in self.errors))


def fail(code: ErrorCode, message: str, *field: str) -> BillingError:
    """Build a ``BillingError`` with one error, for ``raise fail(...)``."""
    return BillingError(UserError(code=code, message=message, field=tuple(field) or None))


class Validator:
    """Collects validation errors so a caller sees all of them at once."""

    def __init__(self) -> None:
        self.errors: list[UserError] = []

    def add(self, message: str, *field: str, code: ErrorCode = ErrorCode.VALIDATION) -> None:
        self.errors.append(UserError(code=code, message=message, field=tuple(field) or None))

    def check(self) -> None:
        if self.errors:
            raise BillingError(self.errors)


class DatabaseUnavailable(Exception):
    """The database can't serve right now (no connection became free in time): an outage,
    not a bug. The API answers it with ``extensions.code = "SERVICE_UNAVAILABLE"``."""

    code = "SERVICE_UNAVAILABLE"
