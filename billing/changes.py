"""What a unit of work changed, for its caller to act on after commit.

The ledger's writers report every entry they append (each one moves a balance) and every
auto-recharge threshold crossing they open (the account and the crossing's number), and the
outbox reports every notice it writes, to the collector of the current context, if there
is one. The caller that owns the transaction (a resolver or a job) opens ``collect()``
around its billing call and, once that call has committed, hands the collector to
``runtime.effects.after_commit``: live subscribers hear of the balance changes, each notice
is sent and each crossing gets its recharge job. Nothing here knows how that is done;
without a collector, reports are dropped (the crons heal what is left undone).

A collector holds what its context did; a collector opened inside another one (a job run
from a request's task, say) takes over until it closes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from billing.models import LedgerEntry


@dataclass(frozen=True, slots=True)
class Crossing:
    """A debit took the balance under the account's auto-recharge threshold: the crossing
    numbered ``recharge_seq`` is open (its recharge job id and trigger key)."""

    account_id: str
    recharge_seq: int


@dataclass(slots=True)
class Changes:
    entries: list[LedgerEntry] = field(default_factory=list)  # in the order they were posted
    notifications: list[int] = field(default_factory=list)  # outbox rows to send
    crossings: list[Crossing] = field(default_factory=list)  # threshold recharges to run

    def __bool__(self) -> bool:
        return bool(self.entries or self.notifications or self.crossings)


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


def threshold_crossed(account_id: str, recharge_seq: int) -> None:
    changes = _current.get()
    if changes is not None:
        changes.crossings.append(Crossing(account_id, recharge_seq))
