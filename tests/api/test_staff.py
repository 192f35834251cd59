"""Billing staff over GraphQL: grantCredits, adjustCredits, and reading any account."""

from __future__ import annotations

import uuid
from typing import Any, cast

import pytest

from billing.enums import Role
from tests.conftest import Caller, MakeCaller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import ADJUST, CONSUME, GRANT, HISTORY, balance, key

STAFF_ACCOUNT = "query($accountId: ID) { creditAccount(accountId: $accountId) { id balance } }"


def staff_input(
    account_id: str, credits: int, reason: str = "goodwill", **extra: Any
) -> dict[str, Any]:
    return {
        "accountId": account_id,
        "credits": credits,
        "reason": reason,
        "idempotencyKey": key(),
        **extra,
    }


async def grant(staff: Caller, payload: dict[str, Any]) -> dict[str, Any]:
    return cast("dict[str, Any]", (await staff.gql(GRANT, {"input": payload}))["grantCredits"])


async def adjust(staff: Caller, payload: dict[str, Any]) -> dict[str, Any]:
    return cast("dict[str, Any]", (await staff.gql(ADJUST, {"input": payload}))["adjustCredits"])


async def staff_balance(staff: Caller, account_id: str) -> int:
    data = await staff.gql(STAFF_ACCOUNT, {"accountId": account_id})
    assert data["creditAccount"]["id"] == account_id
    return cast("int", data["creditAccount"]["balance"])


async def entries(staff: Caller, account_id: str) -> list[dict[str, Any]]:
    data = await staff.gql(HISTORY, {"accountId": account_id, "first": 100})
    return [e["node"] for e in data["creditAccount"]["transactions"]["edges"]]


def error_shape(payload: dict[str, Any]) -> list[tuple[str, list[str] | None]]:
    return [(e["code"], e["field"]) for e in payload["errors"]]


async def assert_forbidden_call(who: Caller, query: str, variables: dict[str, Any]) -> None:
    response = await who.raw(query, variables)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None, body
    assert len(body["errors"]) == 1, body
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN", body


MUTATIONS = {"grant": (GRANT, "grantCredits"), "adjust": (ADJUST, "adjustCredits")}


async def run(staff: Caller, which: str, payload: dict[str, Any]) -> dict[str, Any]:
    query, field = MUTATIONS[which]
    return cast("dict[str, Any]", (await staff.gql(query, {"input": payload}))[field])


# ---------------------------------------------------------------- grantCredits


async def test_grant_adds_a_grant_entry(admin: Caller, staff: Caller, account_id: str) -> None:
    result = await grant(staff, staff_input(account_id, 750, "welcome bonus"))
    assert result["errors"] == []
    tx = result["transaction"]
    assert tx["type"] == "GRANT"
    assert tx["processType"] == "ADMINISTRATIVE"
    assert tx["credits"] == 750
    assert tx["balanceAfter"] == 750
    assert tx["user"]["userId"] == staff.user_id
    assert tx["payment"] is None
    assert "welcome bonus" in tx["description"]
    assert result["balance"] == 750
    assert await balance(admin) == 750
    assert await assert_ledger_consistent(account_id) == 750

    second = await grant(staff, staff_input(account_id, 250))
    assert second["errors"] == []
    assert second["transaction"]["balanceAfter"] == 1_000
    assert second["balance"] == 1_000
    assert [e["type"] for e in await entries(staff, account_id)] == ["GRANT", "GRANT"]
    assert await assert_ledger_consistent(account_id) == 1_000


@pytest.mark.parametrize("credits", [0, -1, -500, 10_000_001])
async def test_grant_amount_out_of_range(credits: int, staff: Caller, account_id: str) -> None:
    await grant(staff, staff_input(account_id, 10))
    result = await grant(staff, staff_input(account_id, credits))
    assert error_shape(result) == [("INVALID_AMOUNT", ["credits"])]
    assert result["transaction"] is None
    assert result["balance"] is None
    assert await staff_balance(staff, account_id) == 10
    assert len(await entries(staff, account_id)) == 1


async def test_largest_grant_is_accepted(staff: Caller, account_id: str) -> None:
    result = await grant(staff, staff_input(account_id, 10_000_000))
    assert result["errors"] == []
    assert result["balance"] == 10_000_000
    assert await assert_ledger_consistent(account_id) == 10_000_000


async def test_grant_beyond_graphql_int_is_a_request_error(staff: Caller, account_id: str) -> None:
    response = await staff.raw(GRANT, {"input": staff_input(account_id, 2**31)})
    assert response.status_code in (200, 400), response.text
    body = response.json()
    assert body.get("data") is None, body
    assert body["errors"], body
    assert all(e["message"] != "Internal error." for e in body["errors"]), body


# ---------------------------------------------------------------- adjustCredits


async def test_adjust_up_and_down(admin: Caller, staff: Caller, account_id: str) -> None:
    up = await adjust(staff, staff_input(account_id, 300, "migration from old system"))
    assert up["errors"] == []
    assert up["transaction"]["type"] == "ADJUSTMENT"
    assert up["transaction"]["processType"] == "ADMINISTRATIVE"
    assert up["transaction"]["credits"] == 300
    assert up["transaction"]["user"]["userId"] == staff.user_id
    assert up["balance"] == 300

    down = await adjust(staff, staff_input(account_id, -120, "double grant"))
    assert down["errors"] == []
    assert down["transaction"]["type"] == "ADJUSTMENT"
    assert down["transaction"]["credits"] == -120
    assert down["transaction"]["balanceAfter"] == 180
    assert down["balance"] == 180

    to_zero = await adjust(staff, staff_input(account_id, -180, "account closed"))
    assert to_zero["errors"] == []
    assert to_zero["balance"] == 0
    assert await balance(admin) == 0
    assert await assert_ledger_consistent(account_id) == 0


async def test_adjust_below_zero_is_refused(staff: Caller, account_id: str) -> None:
    await grant(staff, staff_input(account_id, 100))
    before = await entries(staff, account_id)
    result = await adjust(staff, staff_input(account_id, -101, "too much"))
    assert [e["code"] for e in result["errors"]] == ["INSUFFICIENT_CREDITS"]
    assert result["transaction"] is None
    assert result["balance"] is None
    assert await staff_balance(staff, account_id) == 100
    assert await entries(staff, account_id) == before
    assert await assert_ledger_consistent(account_id) == 100


async def test_refused_adjust_is_not_remembered(staff: Caller, account_id: str) -> None:
    payload = staff_input(account_id, -50, "claw back")
    refused = await adjust(staff, payload)
    assert [e["code"] for e in refused["errors"]] == ["INSUFFICIENT_CREDITS"]
    await grant(staff, staff_input(account_id, 80))
    accepted = await adjust(staff, payload)
    assert accepted["errors"] == []
    assert accepted["balance"] == 30


@pytest.mark.parametrize("credits", [0, 10_000_001, -10_000_001])
async def test_adjust_amount_out_of_range(credits: int, staff: Caller, account_id: str) -> None:
    result = await adjust(staff, staff_input(account_id, credits))
    assert error_shape(result) == [("INVALID_AMOUNT", ["credits"])]
    assert await entries(staff, account_id) == []


# ---------------------------------------------------------------- validation, both mutations


@pytest.mark.parametrize("which", ["grant", "adjust"])
@pytest.mark.parametrize("reason", ["", "   ", "r" * 501], ids=["empty", "blank", "501-chars"])
async def test_reason_is_required(which: str, reason: str, staff: Caller, account_id: str) -> None:
    result = await run(staff, which, staff_input(account_id, 10, reason))
    assert error_shape(result) == [("VALIDATION", ["reason"])]
    assert result["transaction"] is None
    assert await entries(staff, account_id) == []


@pytest.mark.parametrize("which", ["grant", "adjust"])
async def test_longest_reason_is_accepted(which: str, staff: Caller, account_id: str) -> None:
    reason = "r" * 500
    result = await run(staff, which, staff_input(account_id, 10, reason))
    assert result["errors"] == []
    assert result["transaction"]["credits"] == 10
    assert result["balance"] == 10
    assert await assert_ledger_consistent(account_id) == 10


@pytest.mark.parametrize("which", ["grant", "adjust"])
async def test_account_id_too_long(which: str, staff: Caller) -> None:
    too_long = "a" * 65
    result = await run(staff, which, staff_input(too_long, 10))
    assert error_shape(result) == [("VALIDATION", ["accountId"])]
    longest = f"acct-{uuid.uuid4().hex}".ljust(64, "x")
    ok = await run(staff, which, staff_input(longest, 10))
    assert ok["errors"] == []
    assert await staff_balance(staff, longest) == 10


@pytest.mark.parametrize("which", ["grant", "adjust"])
@pytest.mark.parametrize("bad_key", ["", "k" * 256], ids=["empty", "256-chars"])
async def test_bad_idempotency_key(
    which: str, bad_key: str, staff: Caller, account_id: str
) -> None:
    result = await run(staff, which, staff_input(account_id, 10, idempotencyKey=bad_key))
    assert error_shape(result) == [("VALIDATION", ["idempotencyKey"])]
    assert await entries(staff, account_id) == []


async def test_all_bad_fields_are_reported_together(staff: Caller, account_id: str) -> None:
    result = await grant(staff, staff_input(account_id, 0, ""))
    assert sorted(error_shape(result)) == [
        ("INVALID_AMOUNT", ["credits"]),
        ("VALIDATION", ["reason"]),
    ]


# ---------------------------------------------------------------- idempotency


@pytest.mark.parametrize("which", ["grant", "adjust"])
async def test_replay_returns_the_first_entry(which: str, staff: Caller, account_id: str) -> None:
    payload = staff_input(account_id, 40, "promo")
    first = await run(staff, which, payload)
    second = await run(staff, which, payload)
    assert first["errors"] == second["errors"] == []
    assert second["transaction"]["id"] == first["transaction"]["id"]
    assert second["balance"] == first["balance"] == 40
    assert len(await entries(staff, account_id)) == 1
    assert await assert_ledger_consistent(account_id) == 40


@pytest.mark.parametrize("which", ["grant", "adjust"])
@pytest.mark.parametrize(
    "change", [{"credits": 41}, {"reason": "other"}], ids=["credits", "reason"]
)
async def test_same_key_other_params_is_refused(
    which: str, change: dict[str, Any], staff: Caller, account_id: str
) -> None:
    payload = staff_input(account_id, 40, "promo")
    assert (await run(staff, which, payload))["errors"] == []
    reused = await run(staff, which, {**payload, **change})
    assert error_shape(reused) == [("IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])]
    assert reused["transaction"] is None
    assert await staff_balance(staff, account_id) == 40
    assert len(await entries(staff, account_id)) == 1


async def test_grant_key_cannot_be_reused_for_adjust(staff: Caller, account_id: str) -> None:
    payload = staff_input(account_id, 40, "promo")
    assert (await grant(staff, payload))["errors"] == []
    reused = await adjust(staff, payload)
    assert error_shape(reused) == [("IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])]
    assert await staff_balance(staff, account_id) == 40


# ---------------------------------------------------------------- who may grant


@pytest.mark.parametrize("which", ["grant", "adjust"])
@pytest.mark.parametrize("role", [Role.ADMIN, Role.SERVICE, Role.USER])
async def test_only_staff_may_grant_or_adjust(
    which: str, role: Role, caller: MakeCaller, admin: Caller, account_id: str
) -> None:
    who = caller(account_id, role)
    query, _ = MUTATIONS[which]
    await assert_forbidden_call(who, query, {"input": staff_input(account_id, 100)})
    assert await balance(admin) == 0


# ---------------------------------------------------------------- accounts


async def test_grant_to_a_never_seen_account_creates_it(caller: MakeCaller, staff: Caller) -> None:
    fresh = f"acct-{uuid.uuid4().hex[:12]}"
    result = await grant(staff, staff_input(fresh, 500, "trial"))
    assert result["errors"] == []
    assert result["balance"] == 500
    assert await staff_balance(staff, fresh) == 500
    assert await assert_ledger_consistent(fresh) == 500

    # the account's own admin sees it, with or without naming it
    admin = caller(fresh, Role.ADMIN)
    assert await balance(admin) == 500
    own = await admin.gql(STAFF_ACCOUNT, {"accountId": fresh})
    assert own["creditAccount"] == {"id": fresh, "balance": 500}
    # and the account's services can spend it
    service = caller(fresh, Role.SERVICE)
    spent = await service.gql(
        CONSUME,
        {
            "input": {
                "accountId": fresh,
                "userId": "u1",
                "processType": "PROSPECT_SEARCH",
                "quantity": 1,
                "idempotencyKey": key(),
            }
        },
    )
    assert spent["consumeCredits"]["errors"] == []
    assert await assert_ledger_consistent(fresh) == spent["consumeCredits"]["balance"]


async def test_staff_reads_any_account(staff: Caller, caller: MakeCaller) -> None:
    a, b = (f"acct-{uuid.uuid4().hex[:12]}" for _ in range(2))
    await grant(staff, staff_input(a, 11))
    await grant(staff, staff_input(b, 22))
    assert await staff_balance(staff, a) == 11
    assert await staff_balance(staff, b) == 22
    # an admin of one cannot read the other
    admin_a = caller(a, Role.ADMIN)
    error = await admin_a.gql_error(STAFF_ACCOUNT, {"accountId": b})
    assert error["extensions"]["code"] == "FORBIDDEN"


async def test_staff_must_name_an_account(staff: Caller) -> None:
    error = await staff.gql_error(STAFF_ACCOUNT, {"accountId": None})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_staff_history_shows_who_did_what(
    admin: Caller, staff: Caller, caller: MakeCaller, account_id: str
) -> None:
    other_staff = caller("vendor", Role.BILLING_STAFF, user="staff-2")
    await grant(staff, staff_input(account_id, 100, "first"))
    await adjust(other_staff, staff_input(account_id, -30, "second"))
    history = await entries(staff, account_id)
    assert [(e["type"], e["credits"], e["user"]["userId"]) for e in history] == [
        ("ADJUSTMENT", -30, "staff-2"),
        ("GRANT", 100, "staff-1"),
    ]
    # the admin sees the same entries
    data = await admin.gql(HISTORY, {"first": 100})
    assert [e["node"]["id"] for e in data["creditAccount"]["transactions"]["edges"]] == [
        e["id"] for e in history
    ]
