"""The service's one source of "now", so schedules and month ends can be tested."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

_offset = timedelta(0)


def now() -> datetime:
    return datetime.now(UTC) + _offset


@contextmanager
def travel(to: datetime) -> Iterator[None]:
    """Run the block as if the time were ``to`` (and moving on from there)."""
    global _offset
    previous = _offset
    _offset = to - datetime.now(UTC)
    try:
        yield
    finally:
        _offset = previous


def offset() -> timedelta:
    """How far ``now()`` is from the real clock (zero outside time-travelling tests)."""
    return _offset


def utc(value: datetime) -> datetime:
    """``value`` in UTC: any offset is converted, none means UTC already (SQLite compares
    stored times as UTC text). ``ValueError`` when the offset takes it past the first or
    last representable time (9999-12-31T23:00:00-05:00, say)."""
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{value.isoformat()} is out of range in UTC") from None
