"""Roles and tenant isolation: who may read the account, who may call each mutation, and
that another account's cards are NOT_FOUND, never its data."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from billing.enums import Role
from billing.models import MeteredUsage
from tests.conftest import Caller, MakeCaller
from tests.support.ops import (
    ACCOUNT,
    ADD_CARD,
    ADJUST,
    AUTO_RECHARGE,
    CARD_FIELDS,
    CONSUME,
    GRANT,
    METERED,
    PURCHASE,
    REMOVE_CARD,
    REVERSE,
    SET_PRIMARY,
    UPDATE_CARD,
    add_card,
    consume,
    grant,
    key,
)

VIEWER = "{ viewer { userId accountId roles email name } }"
PRICING = "{ creditPricing { centsPerCredit currency minPurchaseCredits maxPurchaseCredits } }"
ACCOUNT_ID = "query($accountId: ID) { creditAccount(accountId: $accountId) { id balance } }"

SNAPSHOT = f"""query($accountId: ID) {{
  creditAccount(accountId: $accountId) {{
    id balance cards {{ {CARD_FIELDS} }}
    autoRecharge {{ enabled trigger thresholdCredits rechargeCredits usePrimaryCard
      intervalDays notify notifyEmails monthlyLimitCredits card {{ id }} }}
    transactions(first: 100) {{ edges {{ node {{ id credits }} }} }}
  }}
}}"""


async def snapshot(who: Caller, account_id: str | None = None) -> dict[str, Any]:
    """Everything an admin (or staff naming the account) can see of it, plus metered usage."""
    data = await who.gql(SNAPSHOT, {"accountId": account_id})
    metered = await MeteredUsage.filter(account_id=data["creditAccount"]["id"]).count()
    return {**data["creditAccount"], "metered": metered}


async def forbidden(who: Caller, query: str, variables: dict[str, Any] | None = None) -> None:
    """A top-level FORBIDDEN error and no data."""
    response = await who.raw(query, variables)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.get("data") is None, body
    assert len(body["errors"]) == 1, body
    assert body["errors"][0]["extensions"]["code"] == "FORBIDDEN", body


def other_account() -> str:
    return f"other-{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- creditAccount


@pytest.mark.parametrize("role", [Role.USER, Role.SERVICE])
async def test_credit_account_needs_admin(caller: MakeCaller, account_id: str, role: Role) -> None:
    who = caller(account_id, role)
    await forbidden(who, ACCOUNT_ID)
    await forbidden(who, ACCOUNT_ID, {"accountId": account_id})
    await forbidden(who, ACCOUNT_ID, {"accountId": other_account()})


async def test_user_and_service_together_still_not_admin(
    caller: MakeCaller, account_id: str
) -> None:
    await forbidden(caller(account_id, Role.USER, Role.SERVICE), ACCOUNT_ID)


async def test_admin_reads_own_account_with_or_without_id(admin: Caller, staff: Caller) -> None:
    await grant(staff, admin.account_id, 70)
    expected = {"creditAccount": {"id": admin.account_id, "balance": 70}}
    assert await admin.gql(ACCOUNT_ID) == expected
    assert await admin.gql(ACCOUNT_ID, {"accountId": admin.account_id}) == expected


async def test_admin_may_not_name_another_account(
    admin: Caller, staff: Caller, caller: MakeCaller
) -> None:
    other = other_account()
    await grant(staff, other, 55)
    await forbidden(admin, ACCOUNT_ID, {"accountId": other})
    await forbidden(admin, ACCOUNT_ID, {"accountId": ""})
    # nor can an admin of one account with another role read a second account
    for extra in (Role.SERVICE, Role.USER):
        who = caller(admin.account_id, Role.ADMIN, extra)
        await forbidden(who, ACCOUNT_ID, {"accountId": other})


async def test_staff_must_name_the_account(staff: Caller) -> None:
    response = await staff.raw(ACCOUNT_ID)
    body = response.json()
    assert response.status_code == 200
    assert body.get("data") is None, body
    assert len(body["errors"]) == 1
    assert body["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_staff_reads_any_account(staff: Caller, admin: Caller) -> None:
    other = other_account()
    await grant(staff, admin.account_id, 30)
    await grant(staff, other, 40)
    assert await staff.gql(ACCOUNT_ID, {"accountId": admin.account_id}) == {
        "creditAccount": {"id": admin.account_id, "balance": 30}
    }
    assert await staff.gql(ACCOUNT_ID, {"accountId": other}) == {
        "creditAccount": {"id": other, "balance": 40}
    }
    card = await add_card(admin)
    seen = await staff.gql(ACCOUNT, {"accountId": admin.account_id})
    assert [c["id"] for c in seen["creditAccount"]["cards"]] == [card["id"]]


# ---------------------------------------------------------------- open queries


ROLE_SETS = [
    pytest.param((Role.ADMIN,), id="admin"),
    pytest.param((Role.USER,), id="user"),
    pytest.param((Role.SERVICE,), id="service"),
    pytest.param((Role.BILLING_STAFF,), id="staff"),
    pytest.param((Role.USER, Role.ADMIN), id="user-admin"),
]


@pytest.mark.parametrize("roles", ROLE_SETS)
async def test_viewer_and_pricing_are_open(
    caller: MakeCaller, account_id: str, roles: tuple[Role, ...]
) -> None:
    who = caller(account_id, *roles, user="u-open", email="open@example.com", name="Open")
    data = await who.gql(VIEWER)
    assert data["viewer"] == {
        "userId": "u-open",
        "accountId": account_id,
        "roles": sorted((r.value for r in roles), key=lambda r: list(Role).index(Role(r))),
        "email": "open@example.com",
        "name": "Open",
    }
    pricing = (await who.gql(PRICING))["creditPricing"]
    assert pricing["currency"] == "usd"
    assert pricing["centsPerCredit"] > 0
    assert 0 < pricing["minPurchaseCredits"] <= pricing["maxPurchaseCredits"]


# ---------------------------------------------------------------- mutations by role


def _mutations(
    account_id: str, card_id: str, usage_id: str
) -> dict[str, tuple[str, dict[str, Any]]]:
    """Each mutation with input that would write if the caller were allowed."""
    staff_input = {
        "accountId": account_id,
        "credits": 25,
        "reason": "role test",
        "idempotencyKey": key(),
    }
    usage_input = {
        "accountId": account_id,
        "userId": "user-1",
        "quantity": 1,
        "idempotencyKey": key(),
    }
    return {
        "addCard": (ADD_CARD, {"pm": "pm_card_mastercard", "primary": True}),
        "purchaseCredits": (
            PURCHASE,
            {"input": {"credits": 100, "cardId": card_id, "idempotencyKey": key()}},
        ),
        "updateAutoRecharge": (
            AUTO_RECHARGE,
            {
                "input": {
                    "enabled": True,
                    "trigger": "THRESHOLD",
                    "thresholdCredits": 10,
                    "rechargeCredits": 500,
                }
            },
        ),
        "consumeCredits": (CONSUME, {"input": {**usage_input, "processType": "POSTCARD"}}),
        "recordMeteredUsage": (
            METERED,
            {
                "input": {
                    **usage_input,
                    "processType": "PREMIUM_AUDIO_TRANSCRIPTION",
                    "idempotencyKey": key(),
                }
            },
        ),
        "grantCredits": (GRANT, {"input": staff_input}),
        "adjustCredits": (ADJUST, {"input": {**staff_input, "idempotencyKey": key()}}),
        "reverseUsage": (
            REVERSE,
            {"input": {"transactionId": usage_id, "reason": "role test", "idempotencyKey": key()}},
        ),
    }


FORBIDDEN_CASES = [
    (mutation, role)
    for mutation, roles in [
        ("addCard", [Role.USER, Role.SERVICE, Role.BILLING_STAFF]),
        ("purchaseCredits", [Role.USER, Role.SERVICE, Role.BILLING_STAFF]),
        ("updateAutoRecharge", [Role.USER, Role.SERVICE, Role.BILLING_STAFF]),
        ("consumeCredits", [Role.ADMIN, Role.USER]),
        ("recordMeteredUsage", [Role.ADMIN, Role.USER]),
        ("grantCredits", [Role.ADMIN, Role.SERVICE, Role.USER]),
        ("adjustCredits", [Role.ADMIN, Role.SERVICE, Role.USER]),
        ("reverseUsage", [Role.ADMIN, Role.USER]),
    ]
    for role in roles
]


@pytest.mark.parametrize(
    ("mutation", "role"),
    [pytest.param(m, r, id=f"{m}-{r.value}") for m, r in FORBIDDEN_CASES],
)
async def test_mutation_forbidden_for_role(
    admin: Caller,
    staff: Caller,
    service: Caller,
    caller: MakeCaller,
    mutation: str,
    role: Role,
) -> None:
    # An account with credits, a card and a usage entry: every mutation has something to do.
    await grant(staff, admin.account_id, 500)
    card = await add_card(admin)
    spent = await consume(service, "POSTCARD")
    assert spent["errors"] == []
    before = await snapshot(admin)

    # The caller's token names the same account, so an allowed call would write to it.
    who = caller(admin.account_id, role)
    query, variables = _mutations(admin.account_id, card["id"], spent["transaction"]["id"])[
        mutation
    ]
    await forbidden(who, query, variables)
    assert await snapshot(admin) == before


async def test_the_allowed_roles_do_write(admin: Caller, staff: Caller, service: Caller) -> None:
    """The counterpart of the FORBIDDEN cases: the same inputs succeed for the right role."""
    await grant(staff, admin.account_id, 500)
    card = await add_card(admin)
    spent = await consume(service, "POSTCARD")
    ops = _mutations(admin.account_id, card["id"], spent["transaction"]["id"])
    allowed = {
        "addCard": admin,
        "purchaseCredits": admin,
        "updateAutoRecharge": admin,
        "consumeCredits": service,
        "recordMeteredUsage": service,
        "grantCredits": staff,
        "adjustCredits": staff,
        "reverseUsage": service,
    }
    for mutation, who in allowed.items():
        query, variables = ops[mutation]
        data = await who.gql(query, variables)
        assert data[mutation]["errors"] == [], (mutation, data)
    after = await snapshot(admin)
    # 500 - 12 + 100 (purchase) - 12 (consume) + 25 (grant) + 25 (adjust) + 12 (reversal)
    assert after["balance"] == 638
    assert len(after["cards"]) == 2
    assert after["autoRecharge"]["enabled"] is True
    assert after["metered"] == 1


async def test_service_acts_only_on_its_own_account(
    service: Caller, staff: Caller, caller: MakeCaller
) -> None:
    other = other_account()
    await grant(staff, other, 100)
    other_admin = caller(other, Role.ADMIN)
    before = await snapshot(other_admin)
    payload = {
        "accountId": other,
        "userId": "user-1",
        "processType": "POSTCARD",
        "quantity": 1,
        "idempotencyKey": key(),
    }
    await forbidden(service, CONSUME, {"input": payload})
    await forbidden(
        service,
        METERED,
        {"input": {**payload, "processType": "BUSINESS_CARD_TRANSCRIPTION"}},
    )
    assert await snapshot(other_admin) == before


async def test_service_cannot_reverse_another_accounts_usage(
    service: Caller, staff: Caller, caller: MakeCaller
) -> None:
    other = other_account()
    other_service = caller(other, Role.SERVICE)
    other_admin = caller(other, Role.ADMIN)
    await grant(staff, other, 100)
    spent = await consume(other_service, "POSTCARD")
    before = await snapshot(other_admin)
    data = await service.gql(
        REVERSE,
        {
            "input": {
                "transactionId": spent["transaction"]["id"],
                "reason": "not mine",
                "idempotencyKey": key(),
            }
        },
    )
    payload = data["reverseUsage"]
    assert [(e["code"], e["field"]) for e in payload["errors"]] == [
        ("NOT_FOUND", ["transactionId"])
    ]
    assert payload["transaction"] is None
    assert payload["balance"] is None
    assert await snapshot(other_admin) == before


# ---------------------------------------------------------------- another account's cards


@pytest.fixture
async def foreign(caller: MakeCaller, staff: Caller) -> dict[str, Any]:
    """Another account with credits and two cards (a primary visa and a mastercard)."""
    other = other_account()
    other_admin = caller(other, Role.ADMIN)
    await grant(staff, other, 300)
    primary = await add_card(other_admin)
    secondary = await add_card(other_admin, "pm_card_mastercard")
    return {"admin": other_admin, "primary": primary, "secondary": secondary}


def _not_found(payload: dict[str, Any]) -> None:
    assert [(e["code"], e["field"]) for e in payload["errors"]] == [("NOT_FOUND", ["cardId"])]


async def test_update_foreign_card_is_not_found(admin: Caller, foreign: dict[str, Any]) -> None:
    await add_card(admin)
    before = await snapshot(foreign["admin"])
    data = await admin.gql(
        UPDATE_CARD,
        {"input": {"cardId": foreign["secondary"]["id"], "cardholderName": "Mallory"}},
    )
    _not_found(data["updateCard"])
    assert data["updateCard"]["card"] is None
    assert await snapshot(foreign["admin"]) == before


async def test_set_primary_foreign_card_is_not_found(
    admin: Caller, foreign: dict[str, Any]
) -> None:
    mine = await add_card(admin)
    before = await snapshot(foreign["admin"])
    mine_before = await snapshot(admin)
    data = await admin.gql(SET_PRIMARY, {"id": foreign["secondary"]["id"]})
    _not_found(data["setPrimaryCard"])
    assert data["setPrimaryCard"]["card"] is None
    assert await snapshot(foreign["admin"]) == before
    assert await snapshot(admin) == mine_before
    assert [c["id"] for c in mine_before["cards"]] == [mine["id"]]


async def test_remove_foreign_card_is_not_found(admin: Caller, foreign: dict[str, Any]) -> None:
    await add_card(admin)
    await add_card(admin, "pm_card_mastercard")
    before = await snapshot(foreign["admin"])
    for card in (foreign["secondary"], foreign["primary"]):
        data = await admin.gql(REMOVE_CARD, {"id": card["id"]})
        payload = data["removeCard"]
        _not_found(payload)
        assert payload["removedCardId"] is None
        assert payload["primaryCard"] is None
    assert await snapshot(foreign["admin"]) == before


async def test_purchase_with_foreign_card_is_not_found(
    admin: Caller, foreign: dict[str, Any]
) -> None:
    await add_card(admin)
    mine_before = await snapshot(admin)
    before = await snapshot(foreign["admin"])
    data = await admin.gql(
        PURCHASE,
        {"input": {"credits": 100, "cardId": foreign["primary"]["id"], "idempotencyKey": key()}},
    )
    payload = data["purchaseCredits"]
    _not_found(payload)
    assert payload["payment"] is None
    assert payload["transaction"] is None
    assert payload["balance"] is None
    assert await snapshot(admin) == mine_before
    assert await snapshot(foreign["admin"]) == before


@pytest.mark.parametrize(
    "card_id",
    ["nope", "", "Q2FyZDpub3QtYS11dWlk", "Q3JlZGl0VHJhbnNhY3Rpb246" + "A" * 20],
    ids=["garbage", "empty", "card-prefix-bad-uuid", "wrong-kind"],
)
async def test_malformed_card_ids_are_not_found(admin: Caller, card_id: str) -> None:
    await add_card(admin)
    await add_card(admin, "pm_card_mastercard")
    before = await snapshot(admin)
    for query, name, variables in (
        (UPDATE_CARD, "updateCard", {"input": {"cardId": card_id, "cardholderName": "X"}}),
        (SET_PRIMARY, "setPrimaryCard", {"id": card_id}),
        (REMOVE_CARD, "removeCard", {"id": card_id}),
        (
            PURCHASE,
            "purchaseCredits",
            {"input": {"credits": 100, "cardId": card_id, "idempotencyKey": key()}},
        ),
    ):
        payload = (await admin.gql(query, variables))[name]
        _not_found(payload)
    assert await snapshot(admin) == before
