"""What a unit of work changed, for its caller to act on after commit.

``ledger.post`` reports every entry it appends (each one moves a balance), and the
low-balance alert reports the notice it writes to the outbox, to the collector of the
current context, if there is one. The caller that owns the transaction (a resolver or a
job) opens ``collect()`` around its billing call and, once that call has committed, tells
live subscribers of the balance changes and queues the notices' delivery. Nothing here
knows how that is done (``api`` and ``workers`` do it); without a collector, reports are
dropped.

A collector holds what its context did; a collector opened inside another one (a job run
from a request's task, say) takes over until it closes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from billing.models import LedgerEntry


@dataclass(slots=True)
class Changes:
    entries: list[LedgerEntry] = field(default_factory=list)  # in the order they were posted
    notifications: list[int] = field(default_factory=list)  # outbox rows to send

    def __bool__(self) -> bool:
        return bool(self.entries or self.notifications)


_current: ContextVar[Changes | None] = ContextVar("billing_changes", default=None)


@contextmanager
def collect() -> Iterator[Changes]:
    """Collect what the work done inside the block changes (act on it after commit)."""
    changes = Changes()
    token = _current.set(changes)
    try:
        yield changes
    finally:
        _current.reset(token)


def entry_posted(entry: LedgerEntry) -> None:
    changes = _current.get()
    if changes is not None:
        changes.entries.append(entry)


def notification_queued(notification_id: int | None) -> None:
    changes = _current.get()
    if changes is not None and notification_id is not None:
        changes.notifications.append(notification_id)
