"""Spending credits over GraphQL: consumeCredits, reverseUsage and recordMeteredUsage.

Prices are read from the creditPricing query, never hard-coded.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

import pytest

from api import ids
from billing.enums import Role
from tests.conftest import Caller, MakeCaller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import (
    ACCOUNT,
    CONSUME,
    HISTORY,
    METERED,
    REVERSE,
    add_card,
    balance,
    grant,
    key,
)

PRICING = """{ creditPricing { processes {
  processType billing creditsPerUnit freeMonthlyQuota centsPerUnit } } }"""

PREPAID = ["HANDWRITTEN_LETTER", "POSTCARD", "ADVANCED_EMAIL_TEST", "PROSPECT_SEARCH"]
FREE_QUOTA = ["SOCIAL_MEDIA_APPEND", "SMART_MATCH"]
METERED_PROCESSES = ["PREMIUM_AUDIO_TRANSCRIPTION", "BUSINESS_CARD_TRANSCRIPTION"]
NON_USAGE = ["MANUAL_PURCHASE", "AUTO_RECHARGE", "ADMINISTRATIVE"]


# ---------------------------------------------------------------- helpers


async def prices(who: Caller) -> dict[str, dict[str, Any]]:
    data = await who.gql(PRICING)
    return {p["processType"]: p for p in data["creditPricing"]["processes"]}


async def price_of(who: Caller, process: str) -> dict[str, Any]:
    return (await prices(who))[process]


def usage_input(
    service: Caller, process: str = "POSTCARD", quantity: int = 1, **extra: Any
) -> dict[str, Any]:
    return {
        "accountId": service.account_id,
        "userId": "user-1",
        "processType": process,
        "quantity": quantity,
        "idempotencyKey": key(),
        **extra,
    }


async def consume(service: Caller, payload: dict[str, Any]) -> dict[str, Any]:
    return cast(
        "dict[str, Any]", (await service.gql(CONSUME, {"input": payload}))["consumeCredits"]
    )


async def reverse(
    who: Caller, transaction_id: str, reason: str = "feature failed", **extra: Any
) -> dict[str, Any]:
    payload = {
        "transactionId": transaction_id,
        "reason": reason,
        "idempotencyKey": key(),
        **extra,
    }
    return cast("dict[str, Any]", (await who.gql(REVERSE, {"input": payload}))["reverseUsage"])


async def metered(service: Caller, payload: dict[str, Any]) -> dict[str, Any]:
    return cast(
        "dict[str, Any]", (await service.gql(METERED, {"input": payload}))["recordMeteredUsage"]
    )


async def entries(admin: Caller, *types: str) -> list[dict[str, Any]]:
    flt = {"types": list(types)} if types else None
    data = await admin.gql(HISTORY, {"filter": flt, "first": 100})
    return [e["node"] for e in data["creditAccount"]["transactions"]["edges"]]


async def free_quota(admin: Caller, process: str) -> dict[str, Any]:
    data = await admin.gql(ACCOUNT)
    quotas = {q["processType"]: q for q in data["creditAccount"]["freeQuotas"]}
    return cast("dict[str, Any]", quotas[process])


def error_shape(payload: dict[str, Any]) -> list[tuple[str, list[str] | None]]:
    return [(e["code"], e["field"]) for e in payload["errors"]]


def assert_forbidden(error: dict[str, Any]) -> None:
    assert error["extensions"]["code"] == "FORBIDDEN", error


async def assert_forbidden_call(who: Caller, query: str, variables: dict[str, Any]) -> None:
    response = await who.raw(query, variables)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None, body
    assert len(body["errors"]) == 1, body
    assert_forbidden(body["errors"][0])


async def assert_top_level_error(who: Caller, query: str, variables: dict[str, Any]) -> None:
    """A GraphQL request error (bad variable): no 500, no data, no internal error."""
    response = await who.raw(query, variables)
    assert response.status_code in (200, 400), response.text
    body = response.json()
    assert body.get("data") is None, body
    assert body["errors"], body
    assert all(e["message"] != "Internal error." for e in body["errors"]), body


def month_bounds_now() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


# ---------------------------------------------------------------- prepaid


async def test_price_book_billing_modes(service: Caller) -> None:
    book = await prices(service)
    for process in PREPAID:
        assert book[process]["billing"] == "PREPAID"
        assert book[process]["creditsPerUnit"] > 0
    for process in FREE_QUOTA:
        assert book[process]["billing"] == "FREE_QUOTA_THEN_PREPAID"
        assert book[process]["creditsPerUnit"] > 0
        assert book[process]["freeMonthlyQuota"] > 0
    for process in METERED_PROCESSES:
        assert book[process]["billing"] == "METERED"
        assert book[process]["centsPerUnit"] > 0


@pytest.mark.parametrize("process", PREPAID)
async def test_prepaid_use_spends_quantity_times_price(
    process: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    per_unit = (await price_of(service, process))["creditsPerUnit"]
    await grant(staff, service.account_id, 10_000)
    quantity = 3
    payload = await consume(
        service,
        usage_input(service, process, quantity, userId="user-42", reference="job-17"),
    )
    assert payload["errors"] == []
    cost = quantity * per_unit
    assert payload["freeUnitsApplied"] == 0
    assert payload["balance"] == 10_000 - cost
    tx = payload["transaction"]
    assert tx["type"] == "USAGE"
    assert tx["processType"] == process
    assert tx["credits"] == -cost
    assert tx["balanceAfter"] == 10_000 - cost
    assert tx["reference"] == "job-17"
    assert tx["user"]["userId"] == "user-42"
    assert tx["payment"] is None
    assert await balance(admin) == 10_000 - cost
    assert await assert_ledger_consistent(service.account_id) == 10_000 - cost
    usage = await entries(admin, "USAGE")
    assert [e["id"] for e in usage] == [tx["id"]]


async def test_spending_the_whole_balance_is_allowed(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    per_unit = (await price_of(service, "POSTCARD"))["creditsPerUnit"]
    await grant(staff, service.account_id, 2 * per_unit)
    payload = await consume(service, usage_input(service, "POSTCARD", 2))
    assert payload["errors"] == []
    assert payload["balance"] == 0
    assert await assert_ledger_consistent(service.account_id) == 0


async def test_short_balance_is_refused_and_writes_nothing(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    per_unit = (await price_of(service, "POSTCARD"))["creditsPerUnit"]
    await grant(staff, service.account_id, per_unit - 1)
    before = await entries(admin)
    payload = await consume(service, usage_input(service, "POSTCARD", 1))
    assert [e["code"] for e in payload["errors"]] == ["INSUFFICIENT_CREDITS"]
    assert payload["transaction"] is None
    assert payload["balance"] is None
    assert await balance(admin) == per_unit - 1
    assert await entries(admin) == before
    assert await assert_ledger_consistent(service.account_id) == per_unit - 1


async def test_refusal_is_not_remembered_under_its_key(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    per_unit = (await price_of(service, "HANDWRITTEN_LETTER"))["creditsPerUnit"]
    payload = usage_input(service, "HANDWRITTEN_LETTER", 2)
    refused = await consume(service, payload)
    assert [e["code"] for e in refused["errors"]] == ["INSUFFICIENT_CREDITS"]
    assert await balance(admin) == 0
    assert await entries(admin) == []

    await grant(staff, service.account_id, 2 * per_unit + 5)
    accepted = await consume(service, payload)
    assert accepted["errors"] == []
    assert accepted["transaction"]["credits"] == -2 * per_unit
    assert accepted["balance"] == 5
    # and now it is remembered: the retry replays it
    again = await consume(service, payload)
    assert again["errors"] == []
    assert again["transaction"]["id"] == accepted["transaction"]["id"]
    assert again["balance"] == 5
    assert await assert_ledger_consistent(service.account_id) == 5
    assert len(await entries(admin, "USAGE")) == 1


# ---------------------------------------------------------------- free quota then prepaid


@pytest.mark.parametrize("process", FREE_QUOTA)
async def test_free_units_come_first_then_credits(
    process: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    price = await price_of(service, process)
    allowance, per_unit = price["freeMonthlyQuota"], price["creditsPerUnit"]
    start, end = month_bounds_now()

    quota = await free_quota(admin, process)
    assert quota["allowance"] == allowance
    assert quota["used"] == 0

    # fully free: no transaction, balance returned, nothing in the ledger
    free = await consume(service, usage_input(service, process, 5))
    assert free["errors"] == []
    assert free["freeUnitsApplied"] == 5
    assert free["transaction"] is None
    assert free["balance"] == 0
    assert await entries(admin) == []
    quota = await free_quota(admin, process)
    assert quota["used"] == 5
    assert quota["allowance"] == allowance
    assert datetime.fromisoformat(quota["periodStart"]) == start
    assert datetime.fromisoformat(quota["periodEnd"]) == end

    # straddling the quota: pays only for the units beyond it
    await grant(staff, service.account_id, 1_000)
    rest = allowance - 5
    payload = await consume(service, usage_input(service, process, rest + 7, reference="batch-2"))
    assert payload["errors"] == []
    assert payload["freeUnitsApplied"] == rest
    tx = payload["transaction"]
    assert tx["type"] == "USAGE"
    assert tx["processType"] == process
    assert tx["credits"] == -7 * per_unit
    assert tx["balanceAfter"] == 1_000 - 7 * per_unit
    assert tx["reference"] == "batch-2"
    assert payload["balance"] == 1_000 - 7 * per_unit
    assert (await free_quota(admin, process))["used"] == allowance

    # quota used up: everything is paid
    paid = await consume(service, usage_input(service, process, 3))
    assert paid["errors"] == []
    assert paid["freeUnitsApplied"] == 0
    assert paid["transaction"]["credits"] == -3 * per_unit
    assert paid["balance"] == 1_000 - 10 * per_unit
    assert (await free_quota(admin, process))["used"] == allowance
    assert await assert_ledger_consistent(service.account_id) == 1_000 - 10 * per_unit


async def test_free_quotas_are_per_process(admin: Caller, service: Caller) -> None:
    first, second = FREE_QUOTA
    payload = await consume(service, usage_input(service, first, 4))
    assert payload["freeUnitsApplied"] == 4
    assert (await free_quota(admin, first))["used"] == 4
    assert (await free_quota(admin, second))["used"] == 0


@pytest.mark.parametrize("process", FREE_QUOTA)
async def test_unaffordable_rest_spends_nothing_not_even_free_units(
    process: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    price = await price_of(service, process)
    allowance, per_unit = price["freeMonthlyQuota"], price["creditsPerUnit"]
    used = await consume(service, usage_input(service, process, allowance - 2))
    assert used["freeUnitsApplied"] == allowance - 2
    # 2 free units left; 5 units need 3 paid, one credit short
    await grant(staff, service.account_id, 3 * per_unit - 1)
    before = await entries(admin)

    refused = await consume(service, usage_input(service, process, 5))
    assert [e["code"] for e in refused["errors"]] == ["INSUFFICIENT_CREDITS"]
    assert refused["transaction"] is None
    assert refused["freeUnitsApplied"] == 0
    assert (await free_quota(admin, process))["used"] == allowance - 2
    assert await balance(admin) == 3 * per_unit - 1
    assert await entries(admin) == before
    assert await assert_ledger_consistent(service.account_id) == 3 * per_unit - 1

    # the two free units are still there
    free = await consume(service, usage_input(service, process, 2))
    assert free["errors"] == []
    assert free["freeUnitsApplied"] == 2
    assert free["transaction"] is None


# ---------------------------------------------------------------- what consumeCredits refuses


@pytest.mark.parametrize("process", METERED_PROCESSES + NON_USAGE)
async def test_non_prepaid_process_is_refused(
    process: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, process, 1))
    assert error_shape(payload) == [("VALIDATION", ["processType"])]
    assert payload["transaction"] is None
    assert await balance(admin) == 1_000
    assert await entries(admin, "USAGE") == []


async def test_unknown_process_type_is_a_request_error(service: Caller) -> None:
    await assert_top_level_error(
        service, CONSUME, {"input": usage_input(service, "CARRIER_PIGEON", 1)}
    )


@pytest.mark.parametrize("quantity", [0, -1, 10_001])
async def test_quantity_out_of_range(
    quantity: int, admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, "PROSPECT_SEARCH", quantity))
    assert error_shape(payload) == [("VALIDATION", ["quantity"])]
    assert await balance(admin) == 1_000
    assert await entries(admin, "USAGE") == []


async def test_largest_quantity_is_accepted(service: Caller, staff: Caller) -> None:
    per_unit = (await price_of(service, "PROSPECT_SEARCH"))["creditsPerUnit"]
    await grant(staff, service.account_id, 10_000 * per_unit)
    payload = await consume(service, usage_input(service, "PROSPECT_SEARCH", 10_000))
    assert payload["errors"] == []
    assert payload["balance"] == 0


@pytest.mark.parametrize("quantity", [2**31, -(2**31) - 1, 2**64])
async def test_quantity_beyond_graphql_int_is_a_request_error(
    quantity: int, admin: Caller, service: Caller
) -> None:
    await assert_top_level_error(
        service, CONSUME, {"input": usage_input(service, "POSTCARD", quantity)}
    )
    assert await balance(admin) == 0


async def test_reference_too_long(admin: Caller, service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, "POSTCARD", 1, reference="r" * 256))
    assert error_shape(payload) == [("VALIDATION", ["reference"])]
    assert await balance(admin) == 1_000
    ok = await consume(service, usage_input(service, "POSTCARD", 1, reference="r" * 255))
    assert ok["errors"] == []
    assert ok["transaction"]["reference"] == "r" * 255


@pytest.mark.parametrize("bad_key", ["", "k" * 256], ids=["empty", "256-chars"])
async def test_bad_idempotency_key(
    bad_key: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, "POSTCARD", 1, idempotencyKey=bad_key))
    assert error_shape(payload) == [("VALIDATION", ["idempotencyKey"])]
    assert await balance(admin) == 1_000
    assert await entries(admin, "USAGE") == []


async def test_longest_idempotency_key_is_accepted(service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, "POSTCARD", 1, idempotencyKey="k" * 255))
    assert payload["errors"] == []


@pytest.mark.parametrize("user_id", ["", " padded ", "u" * 129], ids=["empty", "padded", "129"])
async def test_bad_user_id(user_id: str, admin: Caller, service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, "POSTCARD", 1, userId=user_id))
    assert error_shape(payload) == [("VALIDATION", ["userId"])]
    assert await balance(admin) == 1_000


async def test_several_bad_fields_are_reported_together(service: Caller) -> None:
    payload = await consume(service, usage_input(service, "POSTCARD", 0, reference="r" * 256))
    assert sorted(error_shape(payload)) == [
        ("VALIDATION", ["quantity"]),
        ("VALIDATION", ["reference"]),
    ]


# ---------------------------------------------------------------- idempotency


async def test_same_key_same_params_replays_the_first_result(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    per_unit = (await price_of(service, "ADVANCED_EMAIL_TEST"))["creditsPerUnit"]
    await grant(staff, service.account_id, 1_000)
    payload = usage_input(service, "ADVANCED_EMAIL_TEST", 4, reference="camp-9")
    first = await consume(service, payload)
    second = await consume(service, payload)
    assert first["errors"] == second["errors"] == []
    assert second["transaction"]["id"] == first["transaction"]["id"]
    assert second["transaction"]["credits"] == -4 * per_unit
    assert second["balance"] == first["balance"] == 1_000 - 4 * per_unit
    assert second["freeUnitsApplied"] == 0
    assert len(await entries(admin, "USAGE")) == 1
    assert await assert_ledger_consistent(service.account_id) == 1_000 - 4 * per_unit


@pytest.mark.parametrize(
    "change",
    [{"quantity": 5}, {"processType": "HANDWRITTEN_LETTER"}, {"reference": "other"}],
    ids=["quantity", "processType", "reference"],
)
async def test_same_key_other_params_is_refused(
    change: dict[str, Any], admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, service.account_id, 1_000)
    payload = usage_input(service, "POSTCARD", 2, reference="camp-1")
    first = await consume(service, payload)
    assert first["errors"] == []
    reused = await consume(service, {**payload, **change})
    assert error_shape(reused) == [("IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])]
    assert reused["transaction"] is None
    assert await balance(admin) == first["balance"]
    assert len(await entries(admin, "USAGE")) == 1


async def test_fully_free_use_replays(admin: Caller, service: Caller) -> None:
    payload = usage_input(service, "SMART_MATCH", 6)
    first = await consume(service, payload)
    second = await consume(service, payload)
    for result in (first, second):
        assert result["errors"] == []
        assert result["transaction"] is None
        assert result["freeUnitsApplied"] == 6
        assert result["balance"] == 0
    assert (await free_quota(admin, "SMART_MATCH"))["used"] == 6


async def test_straddling_use_replays(admin: Caller, service: Caller, staff: Caller) -> None:
    price = await price_of(service, "SOCIAL_MEDIA_APPEND")
    allowance, per_unit = price["freeMonthlyQuota"], price["creditsPerUnit"]
    await grant(staff, service.account_id, 1_000)
    payload = usage_input(service, "SOCIAL_MEDIA_APPEND", allowance + 4)
    first = await consume(service, payload)
    second = await consume(service, payload)
    assert first["errors"] == second["errors"] == []
    assert first["freeUnitsApplied"] == second["freeUnitsApplied"] == allowance
    assert second["transaction"]["id"] == first["transaction"]["id"]
    assert second["transaction"]["credits"] == -4 * per_unit
    assert second["balance"] == 1_000 - 4 * per_unit
    assert (await free_quota(admin, "SOCIAL_MEDIA_APPEND"))["used"] == allowance
    assert await assert_ledger_consistent(service.account_id) == 1_000 - 4 * per_unit


async def test_keys_are_per_account(
    caller: MakeCaller, admin: Caller, service: Caller, staff: Caller
) -> None:
    other = caller(f"other-{uuid.uuid4().hex[:12]}", Role.SERVICE)
    await grant(staff, service.account_id, 1_000)
    await grant(staff, other.account_id, 1_000)
    shared_key = key()
    mine = await consume(service, usage_input(service, "POSTCARD", 1, idempotencyKey=shared_key))
    theirs = await consume(other, usage_input(other, "POSTCARD", 2, idempotencyKey=shared_key))
    assert mine["errors"] == theirs["errors"] == []
    assert mine["transaction"]["id"] != theirs["transaction"]["id"]


# ---------------------------------------------------------------- who may consume


@pytest.mark.parametrize("role", [Role.ADMIN, Role.USER, Role.BILLING_STAFF])
async def test_consume_needs_service_role(
    role: Role, caller: MakeCaller, account_id: str, admin: Caller, staff: Caller
) -> None:
    await grant(staff, account_id, 1_000)
    who = caller(account_id, role)
    await assert_forbidden_call(who, CONSUME, {"input": usage_input(who, "POSTCARD", 1)})
    assert await balance(admin) == 1_000
    assert await entries(admin, "USAGE") == []


async def test_service_of_another_account_is_forbidden(
    caller: MakeCaller, admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, service.account_id, 1_000)
    other = caller(f"other-{uuid.uuid4().hex[:12]}", Role.SERVICE)
    payload = usage_input(service, "POSTCARD", 1)  # names this account
    await assert_forbidden_call(other, CONSUME, {"input": payload})
    assert await balance(admin) == 1_000
    assert await entries(admin, "USAGE") == []


# ---------------------------------------------------------------- reverseUsage


async def _spent(service: Caller, staff: Caller, process: str = "POSTCARD", quantity: int = 2):  # type: ignore[no-untyped-def]
    await grant(staff, service.account_id, 1_000)
    payload = await consume(service, usage_input(service, process, quantity, reference="job-1"))
    assert payload["errors"] == []
    return payload["transaction"]


@pytest.mark.parametrize("by", ["service", "staff"])
async def test_reversal_returns_the_credits(
    by: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff, "HANDWRITTEN_LETTER", 2)
    who = service if by == "service" else staff
    result = await reverse(who, spent["id"], "letter was not sent")
    assert result["errors"] == []
    tx = result["transaction"]
    assert tx["type"] == "REVERSAL"
    assert tx["credits"] == -spent["credits"] > 0
    assert tx["processType"] == "HANDWRITTEN_LETTER"
    assert tx["balanceAfter"] == 1_000
    assert tx["id"] != spent["id"]
    assert tx["user"]["userId"] == who.user_id
    assert result["balance"] == 1_000
    assert await balance(admin) == 1_000
    assert await assert_ledger_consistent(service.account_id) == 1_000
    assert [e["id"] for e in await entries(admin, "REVERSAL")] == [tx["id"]]


async def test_reversing_twice_is_refused(admin: Caller, service: Caller, staff: Caller) -> None:
    spent = await _spent(service, staff)
    first = await reverse(service, spent["id"])
    assert first["errors"] == []
    again = await reverse(staff, spent["id"])
    assert error_shape(again) == [("VALIDATION", ["transactionId"])]
    assert again["transaction"] is None
    assert await balance(admin) == 1_000
    assert len(await entries(admin, "REVERSAL")) == 1
    assert await assert_ledger_consistent(service.account_id) == 1_000


@pytest.mark.parametrize("by", ["service", "staff"])
async def test_only_usage_can_be_reversed(
    by: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    granted = await grant(staff, service.account_id, 500)
    who = service if by == "service" else staff
    result = await reverse(who, granted["transaction"]["id"])
    assert error_shape(result) == [("VALIDATION", ["transactionId"])]
    # nor can a reversal be reversed
    spent = await _spent(service, staff)
    reversal = (await reverse(service, spent["id"]))["transaction"]
    result = await reverse(who, reversal["id"])
    assert error_shape(result) == [("VALIDATION", ["transactionId"])]
    assert await balance(admin) == 1_500
    assert await assert_ledger_consistent(service.account_id) == 1_500


async def test_another_accounts_transaction_is_not_found(
    caller: MakeCaller, admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    other = caller(f"other-{uuid.uuid4().hex[:12]}", Role.SERVICE)
    result = await reverse(other, spent["id"])
    assert error_shape(result) == [("NOT_FOUND", ["transactionId"])]
    assert result["transaction"] is None
    assert await balance(admin) == 1_000 + spent["credits"]
    assert await entries(admin, "REVERSAL") == []
    # the owner still can
    assert (await reverse(service, spent["id"]))["errors"] == []


@pytest.mark.parametrize(
    "bad_id",
    [
        "not-an-id",
        "",
        ids.encode("CreditTransaction", "not-a-uuid"),
        ids.encode("Card", uuid.uuid4()),
        ids.encode("CreditTransaction", uuid.uuid4()),
    ],
    ids=["garbage", "empty", "bad-uuid", "other-kind", "unknown"],
)
async def test_malformed_or_unknown_transaction_id_is_not_found(
    bad_id: str, service: Caller, staff: Caller
) -> None:
    for who in (service, staff):
        result = await reverse(who, bad_id)
        assert error_shape(result) == [("NOT_FOUND", ["transactionId"])]


async def test_other_kind_of_id_for_a_real_entry_is_not_found(
    service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    raw = ids.decode("CreditTransaction", spent["id"])
    assert raw is not None
    result = await reverse(service, ids.encode("Payment", raw))
    assert error_shape(result) == [("NOT_FOUND", ["transactionId"])]


async def test_reversal_keeps_free_units_used(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    price = await price_of(service, "SMART_MATCH")
    allowance, per_unit = price["freeMonthlyQuota"], price["creditsPerUnit"]
    await grant(staff, service.account_id, 1_000)
    spent = await consume(service, usage_input(service, "SMART_MATCH", allowance + 9))
    assert spent["freeUnitsApplied"] == allowance
    result = await reverse(service, spent["transaction"]["id"])
    assert result["errors"] == []
    assert result["transaction"]["credits"] == 9 * per_unit
    assert result["transaction"]["processType"] == "SMART_MATCH"
    assert result["balance"] == 1_000
    assert (await free_quota(admin, "SMART_MATCH"))["used"] == allowance
    # the next use is fully paid
    after = await consume(service, usage_input(service, "SMART_MATCH", 1))
    assert after["freeUnitsApplied"] == 0
    assert after["transaction"]["credits"] == -per_unit
    assert await assert_ledger_consistent(service.account_id) == 1_000 - per_unit


async def test_reversal_replays_under_its_key(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    same_key = key()
    first = await reverse(service, spent["id"], "dup", idempotencyKey=same_key)
    second = await reverse(service, spent["id"], "dup", idempotencyKey=same_key)
    assert first["errors"] == second["errors"] == []
    assert second["transaction"]["id"] == first["transaction"]["id"]
    assert second["balance"] == first["balance"] == 1_000
    assert len(await entries(admin, "REVERSAL")) == 1
    other_reason = await reverse(service, spent["id"], "other", idempotencyKey=same_key)
    assert error_shape(other_reason) == [("IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])]
    assert await assert_ledger_consistent(service.account_id) == 1_000


@pytest.mark.parametrize("reason", ["", "   ", "r" * 501], ids=["empty", "blank", "501-chars"])
async def test_reversal_needs_a_reason(
    reason: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    result = await reverse(service, spent["id"], reason)
    assert error_shape(result) == [("VALIDATION", ["reason"])]
    assert await entries(admin, "REVERSAL") == []
    assert await balance(admin) == 1_000 + spent["credits"]


async def test_reversal_accepts_the_longest_reason(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    result = await reverse(service, spent["id"], "r" * 500)
    assert result["errors"] == []
    assert result["transaction"]["type"] == "REVERSAL"
    assert result["balance"] == 1_000
    assert await assert_ledger_consistent(service.account_id) == 1_000


@pytest.mark.parametrize("bad_key", ["", "k" * 256], ids=["empty", "256-chars"])
async def test_reversal_needs_a_valid_key(
    bad_key: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    result = await reverse(service, spent["id"], idempotencyKey=bad_key)
    assert error_shape(result) == [("VALIDATION", ["idempotencyKey"])]
    assert await entries(admin, "REVERSAL") == []


@pytest.mark.parametrize("role", [Role.ADMIN, Role.USER])
async def test_reversal_needs_service_or_staff(
    role: Role, caller: MakeCaller, admin: Caller, service: Caller, staff: Caller
) -> None:
    spent = await _spent(service, staff)
    who = caller(service.account_id, role)
    variables = {
        "input": {"transactionId": spent["id"], "reason": "please", "idempotencyKey": key()}
    }
    await assert_forbidden_call(who, REVERSE, variables)
    assert await entries(admin, "REVERSAL") == []


# ---------------------------------------------------------------- recordMeteredUsage


async def test_metered_usage_needs_a_card(admin: Caller, service: Caller) -> None:
    payload = usage_input(service, "PREMIUM_AUDIO_TRANSCRIPTION", 3)
    refused = await metered(service, payload)
    assert [e["code"] for e in refused["errors"]] == ["NO_CARD_ON_FILE"]
    assert refused["usage"] is None
    # not remembered: the same key works once a card is on file
    await add_card(admin)
    accepted = await metered(service, payload)
    assert accepted["errors"] == []
    assert accepted["usage"]["quantity"] == 3


@pytest.mark.parametrize("process", METERED_PROCESSES)
async def test_metered_usage_is_priced_in_cents(
    process: str, admin: Caller, service: Caller, staff: Caller
) -> None:
    cents = (await price_of(service, process))["centsPerUnit"]
    await add_card(admin)
    await grant(staff, service.account_id, 100)
    result = await metered(service, usage_input(service, process, 7, reference="call-1"))
    assert result["errors"] == []
    usage = result["usage"]
    assert usage["processType"] == process
    assert usage["quantity"] == 7
    assert usage["amountCents"] == 7 * cents
    assert usage["id"]
    datetime.fromisoformat(usage["createdAt"])
    # credits are not touched
    assert await balance(admin) == 100
    assert await entries(admin, "USAGE") == []
    assert await assert_ledger_consistent(service.account_id) == 100


@pytest.mark.parametrize("process", PREPAID + FREE_QUOTA + NON_USAGE)
async def test_metered_usage_refuses_other_processes(
    process: str, admin: Caller, service: Caller
) -> None:
    await add_card(admin)
    result = await metered(service, usage_input(service, process, 1))
    assert error_shape(result) == [("VALIDATION", ["processType"])]
    assert result["usage"] is None
    assert (await free_quota(admin, "SMART_MATCH"))["used"] == 0


@pytest.mark.parametrize("quantity", [0, -1, 10_001])
async def test_metered_quantity_out_of_range(quantity: int, admin: Caller, service: Caller) -> None:
    await add_card(admin)
    result = await metered(service, usage_input(service, "BUSINESS_CARD_TRANSCRIPTION", quantity))
    assert error_shape(result) == [("VALIDATION", ["quantity"])]


async def test_metered_usage_replays(admin: Caller, service: Caller) -> None:
    await add_card(admin)
    payload = usage_input(service, "BUSINESS_CARD_TRANSCRIPTION", 2)
    first = await metered(service, payload)
    second = await metered(service, payload)
    assert first["errors"] == second["errors"] == []
    assert second["usage"] == first["usage"]
    reused = await metered(service, {**payload, "quantity": 3})
    assert error_shape(reused) == [("IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])]
    assert reused["usage"] is None


@pytest.mark.parametrize("bad_key", ["", "k" * 256], ids=["empty", "256-chars"])
async def test_metered_usage_needs_a_valid_key(
    bad_key: str, admin: Caller, service: Caller
) -> None:
    await add_card(admin)
    payload = usage_input(service, "BUSINESS_CARD_TRANSCRIPTION", 2, idempotencyKey=bad_key)
    result = await metered(service, payload)
    assert error_shape(result) == [("VALIDATION", ["idempotencyKey"])]


@pytest.mark.parametrize("role", [Role.ADMIN, Role.USER, Role.BILLING_STAFF])
async def test_metered_usage_needs_service_role(
    role: Role, caller: MakeCaller, admin: Caller
) -> None:
    await add_card(admin)
    who = caller(admin.account_id, role)
    payload = usage_input(who, "PREMIUM_AUDIO_TRANSCRIPTION", 1)
    await assert_forbidden_call(who, METERED, {"input": payload})


async def test_metered_usage_by_another_accounts_service_is_forbidden(
    caller: MakeCaller, admin: Caller, service: Caller
) -> None:
    await add_card(admin)
    other = caller(f"other-{uuid.uuid4().hex[:12]}", Role.SERVICE)
    payload = usage_input(service, "PREMIUM_AUDIO_TRANSCRIPTION", 1)
    await assert_forbidden_call(other, METERED, {"input": payload})
