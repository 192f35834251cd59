"""A spend gives the same result whichever writer applies it: the one-statement spend
(``fastspend``, PostgreSQL outside a transaction), the transactional spend (``posting``)
and the batch writer (``batchwrite``) append the same entry, leave the same balance, open
the same crossing, and report the same to the caller's ``changes``."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from tortoise.transactions import in_transaction

from billing import changes
from billing.changes import Changes, Crossing
from billing.enums import ProcessType, TransactionType
from billing.errors import BillingError
from billing.ledger import posting
from billing.ledger.posting import Movement
from billing.models import Account, LedgerEntry, Notification
from billing.pricing import PriceBook
from billing.spending import batch, usage
from billing.spending.request import SpendItem
from tests.billing.conftest import new_account

pytestmark = pytest.mark.usefixtures("domain")

LETTER = ProcessType.HANDWRITTEN_LETTER  # 35 credits a unit


async def _funded(credits: int, **setting: Any) -> str:
    account_id = await new_account(**setting)
    async with in_transaction():
        await posting.post(
            Movement(
                account_id=account_id,
                credits=credits,
                type=TransactionType.GRANT,
                process_type=ProcessType.ADMINISTRATIVE,
                description="funds",
                user_id="staff-1",
            )
        )
    return account_id


def _item(account_id: str, quantity: int = 2, key: str | None = None) -> SpendItem:
    return SpendItem(account_id, "svc-1", LETTER, quantity, "ref-1", key or uuid.uuid4().hex)


def _shape(entry: LedgerEntry | None) -> tuple[object, ...]:
    """What an entry says, but its id, account and time."""
    assert entry is not None
    return (
        TransactionType(entry.type),
        ProcessType(entry.process_type),
        entry.credits,
        entry.balance_after,
        entry.quantity,
        entry.user_id,
        entry.description,
        entry.reference,
        entry.payment_id,
        entry.reverses_entry_id,
    )


async def _one_statement(book: PriceBook, item: SpendItem) -> tuple[usage.ConsumeResult, Changes]:
    """``usage.consume``: one statement on PostgreSQL (its own transaction elsewhere)."""
    with changes.collect() as changed:
        result = await usage.consume(
            book,
            account_id=item.account_id,
            user_id=item.user_id,
            process_type=item.process_type,
            quantity=item.quantity,
            reference=item.reference,
            idempotency_key=item.idempotency_key,
        )
    return result, changed


async def _transactional(book: PriceBook, item: SpendItem) -> tuple[usage.ConsumeResult, Changes]:
    with changes.collect() as changed:
        async with in_transaction():
            result = await usage.consume_in_transaction(
                book,
                account_id=item.account_id,
                user_id=item.user_id,
                process_type=item.process_type,
                quantity=item.quantity,
                reference=item.reference,
                idempotency_key=item.idempotency_key,
            )
    return result, changed


async def _batched(book: PriceBook, item: SpendItem) -> tuple[usage.ConsumeResult, Changes]:
    with changes.collect() as changed:
        async with in_transaction():
            (result,) = await batch.consume_batch(book, [item])
    assert isinstance(result, usage.ConsumeResult)
    return result, changed


WRITERS = [_one_statement, _transactional, _batched]


async def _spend_across_the_threshold(book: PriceBook, writer: Any) -> tuple[Any, ...]:
    """100 credits, threshold 50: a spend of 70 crosses it. What each writer reports."""
    account_id = await _funded(100, threshold=50)
    result, changed = await writer(book, _item(account_id))
    account = await Account.get(id=account_id)
    stored = await LedgerEntry.filter(account_id=account_id, type=TransactionType.USAGE)
    assert result.entry is not None
    assert [e.id for e in stored] == [result.entry.id]
    assert changed.entries == [result.entry]  # reported: the entry the spend wrote
    assert _shape(changed.entries[0]) == _shape(stored[0])
    assert changed.crossings == [Crossing(account_id, account.recharge_seq)]
    assert account.recharge_crossed and account.recharge_seq == 1
    return (
        _shape(result.entry),
        result.balance,
        result.free_units_applied,
        account.balance,
        [c.recharge_seq for c in changed.crossings],
        changed.notifications,
    )


async def test_every_writer_spends_alike(book: PriceBook) -> None:
    seen = [await _spend_across_the_threshold(book, writer) for writer in WRITERS]
    assert seen[0] == (
        (
            TransactionType.USAGE,
            LETTER,
            -70,
            30,
            2,
            "svc-1",
            "Handwritten letter x 2",
            "ref-1",
            None,
            None,
        ),
        30,
        0,
        30,
        [1],
        [],
    )
    assert seen[1] == seen[0]
    assert seen[2] == seen[0]


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_spend_below_the_threshold_opens_no_new_crossing(
    book: PriceBook, writer: Any
) -> None:
    account_id = await _funded(200, threshold=150)
    _, crossed = await writer(book, _item(account_id))  # 200 -> 130: crossed
    _, changed = await writer(book, _item(account_id, quantity=1))  # 130 -> 95
    assert len(crossed.crossings) == 1
    assert changed.crossings == []
    assert [e.balance_after for e in changed.entries] == [95]


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_replay_reports_nothing(book: PriceBook, writer: Any) -> None:
    account_id = await _funded(100, threshold=50)
    item = _item(account_id)
    first, _ = await writer(book, item)
    again, changed = await writer(book, item)
    assert again.entry is not None and first.entry is not None
    assert again.entry.id == first.entry.id
    assert not changed


@pytest.mark.parametrize("writer", [_one_statement, _transactional])
async def test_a_refused_spend_reports_nothing(book: PriceBook, writer: Any) -> None:
    account_id = await _funded(50, threshold=40)
    with pytest.raises(BillingError):
        await writer(book, _item(account_id))  # 70 > 50
    assert (await Account.get(id=account_id)).balance == 50
    assert not (await Account.get(id=account_id)).recharge_crossed


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_low_balance_crossing_reports_its_notice(book: PriceBook, writer: Any) -> None:
    account_id = await _funded(100, low_level=50, admin=True)
    _, changed = await writer(book, _item(account_id))
    notices = await Notification.filter(account_id=account_id)
    assert [n.id for n in notices] == changed.notifications
    assert len(notices) == 1
    assert changed.crossings == []


async def test_a_batch_reports_every_entry_in_order_and_one_crossing_per_account(
    book: PriceBook,
) -> None:
    crossing = await _funded(200, threshold=100)
    staying = await _funded(500, threshold=100)
    items = [
        _item(crossing, 1),  # 165
        _item(staying, 1),  # 465
        _item(crossing, 1),  # 130
        _item(crossing, 1),  # 95: crossed
        _item(crossing, 1),  # 60: below already
        _item(crossing, 9),  # refused: 315 > 60
    ]
    with changes.collect() as changed:
        async with in_transaction():
            outcomes = await batch.consume_batch(book, items)
    assert isinstance(outcomes[-1], BillingError)
    assert [(e.account_id, e.balance_after) for e in changed.entries] == [
        (crossing, 165),
        (staying, 465),
        (crossing, 130),
        (crossing, 95),
        (crossing, 60),
    ]
    account = await Account.get(id=crossing)
    assert changed.crossings == [Crossing(crossing, account.recharge_seq)]
    assert account.recharge_seq == 1 and account.balance == 60
    assert (await Account.get(id=staying)).recharge_seq == 0
