"""``idempotency.claim``: the first request with a key claims it; a retry with the same
parameters gets the first result; other parameters are refused; keys are per account."""

from __future__ import annotations

import uuid

import pytest
from tortoise.transactions import in_transaction

from billing import idempotency
from billing.enums import ErrorCode
from billing.errors import BillingError
from billing.models import IdempotencyRecord
from tests.billing.conftest import new_account

pytestmark = pytest.mark.usefixtures("domain")

PARAMS = {"credits": 5, "reason": "test"}


async def _claim(
    account_id: str, key: str, params: dict[str, object], result: dict[str, object]
) -> idempotency.Replay | None:
    async with in_transaction():
        return await idempotency.claim(account_id, key, "grantCredits", params, result)


async def test_the_first_claims_and_a_retry_replays_its_result() -> None:
    account_id = await new_account()
    key = uuid.uuid4().hex
    assert await _claim(account_id, key, PARAMS, {"entry_id": "first"}) is None
    replay = await _claim(account_id, key, dict(PARAMS), {"entry_id": "second"})
    assert replay is not None
    assert replay.result == {"entry_id": "first"}
    assert await IdempotencyRecord.filter(account_id=account_id, key=key).count() == 1


async def test_other_parameters_with_the_key_are_refused() -> None:
    account_id = await new_account()
    key = uuid.uuid4().hex
    await _claim(account_id, key, PARAMS, {"entry_id": "first"})
    with pytest.raises(BillingError) as refused:
        await _claim(account_id, key, {**PARAMS, "credits": 6}, {"entry_id": "second"})
    assert [e.code for e in refused.value.errors] == [ErrorCode.IDEMPOTENCY_KEY_REUSED]
    with pytest.raises(BillingError) as other_operation:
        async with in_transaction():
            await idempotency.claim(account_id, key, "adjustCredits", PARAMS, {})
    assert [e.code for e in other_operation.value.errors] == [ErrorCode.IDEMPOTENCY_KEY_REUSED]


async def test_keys_are_per_account() -> None:
    first, second = await new_account(), await new_account()
    key = uuid.uuid4().hex
    assert await _claim(first, key, PARAMS, {"entry_id": "a"}) is None
    assert await _claim(second, key, PARAMS, {"entry_id": "b"}) is None


async def test_a_claim_rolled_back_is_not_remembered() -> None:
    account_id = await new_account()
    key = uuid.uuid4().hex
    with pytest.raises(RuntimeError):
        async with in_transaction():
            await idempotency.claim(account_id, key, "grantCredits", PARAMS, {"entry_id": "x"})
            raise RuntimeError("the work after the claim failed")
    assert await _claim(account_id, key, PARAMS, {"entry_id": "y"}) is None


@pytest.mark.parametrize("key", ["", "k" * 256])
async def test_a_bad_key_is_refused(key: str) -> None:
    account_id = await new_account()
    with pytest.raises(BillingError) as refused:
        await _claim(account_id, key, PARAMS, {})
    assert [(e.code, e.field) for e in refused.value.errors] == [
        (ErrorCode.VALIDATION, ("idempotencyKey",))
    ]
