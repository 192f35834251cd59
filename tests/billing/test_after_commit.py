"""``runtime.effects.after_commit``: what the domain recorded becomes, after commit, one
live publish of the entries, one send job per notice and one recharge job per crossing,
each under its id from ``runtime.jobids`` (so the sweep's enqueue of the same work is the
same job)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from billing.changes import Changes, Crossing
from billing.enums import ProcessType, TransactionType
from billing.models import LedgerEntry
from runtime import effects, jobids


class Queue:
    def __init__(self) -> None:
        self.jobs: list[tuple[str, tuple[Any, ...], str]] = []

    async def enqueue(self, function: str, *args: Any, job_id: str) -> bool:
        self.jobs.append((function, args, job_id))
        return True

    async def close(self) -> None:
        pass


class Live:
    def __init__(self) -> None:
        self.published: list[list[LedgerEntry]] = []

    async def publish(self, entries: Sequence[LedgerEntry]) -> None:
        self.published.append(list(entries))

    def listen(self, account_id: str) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass


def _entry(account_id: str, balance_after: int) -> LedgerEntry:
    return LedgerEntry(
        id=uuid.uuid4(),
        account_id=account_id,
        created_at=datetime.now(UTC),
        type=TransactionType.USAGE,
        process_type=ProcessType.POSTCARD,
        credits=-12,
        balance_after=balance_after,
        description="Postcard x 1",
    )


async def test_every_change_gets_its_effect_under_its_job_id() -> None:
    entries = [_entry("acct-a", 88), _entry("acct-b", 40)]
    changed = Changes(
        entries=entries,
        notifications=[7, 9],
        crossings=[Crossing("acct-b", 3)],
    )
    queue, live = Queue(), Live()
    await effects.after_commit(changed, queue=queue, live=live)
    assert live.published == [entries]
    assert queue.jobs == [
        ("send_notification", (7,), "notification:7:0"),
        ("send_notification", (9,), "notification:9:0"),
        ("threshold_recharge", ("acct-b",), "recharge:acct-b:3"),
    ]
    # The sweep builds the same ids for the same work.
    assert jobids.threshold_recharge("acct-b", 3) == "recharge:acct-b:3"
    assert jobids.notification_job_id(7) == "notification:7:0"


async def test_nothing_changed_nothing_done() -> None:
    queue, live = Queue(), Live()
    await effects.after_commit(Changes(), queue=queue, live=live)
    assert queue.jobs == [] and live.published == []


async def test_without_a_queue_or_live_it_does_what_it_can() -> None:
    changed = Changes(entries=[_entry("acct-a", 1)], crossings=[Crossing("acct-a", 1)])
    live = Live()
    await effects.after_commit(changed, queue=None, live=live)
    assert len(live.published) == 1
    queue = Queue()
    await effects.after_commit(changed, queue=queue, live=None)
    assert [job[0] for job in queue.jobs] == ["threshold_recharge"]
