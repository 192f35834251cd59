"""Threshold crossings, as the ledger records them (DESIGN.md section 3): a debit from at or
above the threshold to below it opens one crossing, numbered (``recharge_seq``: its recharge
job id and trigger key) and recorded in the caller's ``changes``; spending further below
opens none; a take-back (refund, dispute) never opens one; each new crossing gets the next
number."""

from __future__ import annotations

import pytest
from tortoise.transactions import in_transaction

from billing import changes
from billing.changes import Crossing
from billing.enums import ProcessType, TransactionType
from billing.ledger import entries, posting
from billing.ledger.posting import Movement
from billing.models import Account
from billing.recharge import runs
from tests.billing.conftest import new_account

pytestmark = pytest.mark.usefixtures("domain")


def _move(account_id: str, credits: int, *, opens_crossing: bool = True) -> Movement:
    return Movement(
        account_id=account_id,
        credits=credits,
        type=TransactionType.ADJUSTMENT,
        process_type=ProcessType.ADMINISTRATIVE,
        description="test movement",
        user_id="staff-1",
        opens_crossing=opens_crossing,
    )


async def _post(movement: Movement) -> changes.Changes:
    with changes.collect() as changed:
        async with in_transaction():
            await posting.post(movement)
    return changed


async def test_one_crossing_is_recorded_once_and_numbered() -> None:
    account_id = await new_account(threshold=100)
    assert not (await _post(_move(account_id, 150))).crossings  # a credit crosses nothing
    assert not (await _post(_move(account_id, -50))).crossings  # 100: at, not below

    crossed = await _post(_move(account_id, -1))  # 100 -> 99
    account = await Account.get(id=account_id)
    assert crossed.crossings == [Crossing(account_id, account.recharge_seq)]
    assert account.recharge_crossed
    assert [e.balance_after for e in crossed.entries] == [99]

    # Further below: the same crossing, nothing new recorded or numbered.
    further = await _post(_move(account_id, -10))
    assert further.crossings == []
    assert (await Account.get(id=account_id)).recharge_seq == account.recharge_seq


async def test_each_new_crossing_gets_the_next_number() -> None:
    account_id = await new_account(threshold=100)
    await _post(_move(account_id, 100))
    first = (await _post(_move(account_id, -1))).crossings
    await _post(_move(account_id, 1))  # back at the threshold
    second = (await _post(_move(account_id, -1))).crossings
    assert len(first) == len(second) == 1
    assert second[0].recharge_seq == first[0].recharge_seq + 1


async def test_a_take_back_opens_no_crossing() -> None:
    account_id = await new_account(threshold=100)
    await _post(_move(account_id, 150))
    taken = await _post(_move(account_id, -100, opens_crossing=False))
    assert taken.crossings == []
    assert [e.balance_after for e in taken.entries] == [50]
    account = await Account.get(id=account_id)
    assert not account.recharge_crossed
    assert account.recharge_seq == 0


async def test_no_threshold_no_crossing() -> None:
    account_id = await new_account(threshold=None)
    await _post(_move(account_id, 150))
    assert (await _post(_move(account_id, -150))).crossings == []


async def test_a_refused_debit_records_nothing() -> None:
    account_id = await new_account(threshold=100)
    await _post(_move(account_id, 150))
    with changes.collect() as changed, pytest.raises(Exception, match="does not cover"):
        async with in_transaction():
            await posting.post(_move(account_id, -151))
    assert not changed


async def test_saving_the_setting_below_the_threshold_is_a_crossing() -> None:
    account_id = await new_account(threshold=100)
    with changes.collect() as changed:
        async with in_transaction():
            await runs.open_crossing(account_id)
    account = await Account.get(id=account_id)
    assert changed.crossings == [Crossing(account_id, account.recharge_seq)]
    assert changed.entries == []


@pytest.mark.parametrize(
    ("before", "after", "threshold", "expected"),
    [
        (100, 99, 100, True),  # from at to below
        (150, 10, 100, True),  # from above to well below
        (100, 100, 100, False),  # at is not below
        (99, 50, 100, False),  # already below: no new crossing
        (150, 120, 100, False),  # still above
        (150, 10, None, False),  # no threshold
    ],
)
def test_the_crossing_rule(before: int, after: int, threshold: int | None, expected: bool) -> None:
    assert entries.crossed(before, after, threshold) is expected
    seq = entries.crossing_seq(before, after, threshold, 7)
    assert seq == (7 if expected else None)
