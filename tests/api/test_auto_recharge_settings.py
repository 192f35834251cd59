"""updateAutoRecharge: what is stored and shown on creditAccount.autoRecharge, and every
refusal (with its code and field) leaving the previous setting as it was."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from billing.enums import Role
from tests.conftest import Caller, MakeCaller
from tests.support.ops import AUTO_RECHARGE, SET_PRIMARY, add_card, grant

AR_FIELDS = (
    "enabled trigger intervalDays thresholdCredits rechargeCredits usePrimaryCard "
    "card { id last4 } notify notifyEmails monthlyLimitCredits nextRunAt lastRunAt "
    "consecutiveFailures pausedReason"
)
SETTING = f"{{ creditAccount {{ autoRecharge {{ {AR_FIELDS} }} }} }}"

THRESHOLD = {
    "enabled": True,
    "trigger": "THRESHOLD",
    "thresholdCredits": 25,
    "rechargeCredits": 500,
}
SCHEDULE = {"enabled": True, "trigger": "SCHEDULE", "intervalDays": 30, "rechargeCredits": 500}

DEFAULTS: dict[str, Any] = {
    "enabled": False,
    "trigger": None,
    "intervalDays": None,
    "thresholdCredits": None,
    "rechargeCredits": None,
    "usePrimaryCard": True,
    "card": None,
    "notify": False,
    "notifyEmails": [],
    "monthlyLimitCredits": None,
    "nextRunAt": None,
    "lastRunAt": None,
    "consecutiveFailures": 0,
    "pausedReason": None,
}


async def update(admin: Caller, input: dict[str, Any]) -> dict[str, Any]:
    return cast(
        "dict[str, Any]", (await admin.gql(AUTO_RECHARGE, {"input": input}))["updateAutoRecharge"]
    )


async def enable(admin: Caller, input: dict[str, Any]) -> dict[str, Any]:
    payload = await update(admin, input)
    assert payload["errors"] == [], payload
    return cast("dict[str, Any]", payload["autoRecharge"])


async def setting(admin: Caller) -> dict[str, Any]:
    return cast("dict[str, Any]", (await admin.gql(SETTING))["creditAccount"]["autoRecharge"])


def short(card: dict[str, Any]) -> dict[str, Any]:
    """A card as autoRecharge shows it."""
    return {"id": card["id"], "last4": card["last4"]}


def errors_of(payload: dict[str, Any]) -> list[tuple[str, list[str] | None]]:
    return sorted(((e["code"], e["field"]) for e in payload["errors"]), key=str)


@pytest.fixture
async def funded(admin: Caller, staff: Caller) -> Caller:
    """An admin whose account holds 1,000 credits (above any threshold used here), so
    enabling a threshold never starts a recharge at once."""
    await grant(staff, admin.account_id, 1000)
    return admin


# ---------------------------------------------------------------- accepted settings


async def test_default_is_disabled(admin: Caller) -> None:
    assert await setting(admin) == DEFAULTS


async def test_enable_threshold(funded: Caller) -> None:
    card = await add_card(funded)
    shown = await enable(funded, THRESHOLD)
    assert shown == {
        **DEFAULTS,
        "enabled": True,
        "trigger": "THRESHOLD",
        "thresholdCredits": 25,
        "rechargeCredits": 500,
        "card": short(card),
    }
    assert await setting(funded) == shown


async def test_threshold_card_follows_the_primary(funded: Caller) -> None:
    first = await add_card(funded)
    second = await add_card(funded, "pm_card_mastercard")
    assert (await enable(funded, THRESHOLD))["card"]["id"] == first["id"]
    data = await funded.gql(SET_PRIMARY, {"id": second["id"]})
    assert data["setPrimaryCard"]["errors"] == []
    assert (await setting(funded))["card"] == short(second)


async def test_enable_with_every_option(funded: Caller) -> None:
    await add_card(funded)
    emails = ["billing@example.com", "Finance.Team+credits@example.co.uk"]
    shown = await enable(
        funded,
        {**THRESHOLD, "notify": True, "notifyEmails": emails, "monthlyLimitCredits": 2000},
    )
    assert shown["notify"] is True
    assert shown["notifyEmails"] == emails
    assert shown["monthlyLimitCredits"] == 2000
    assert await setting(funded) == shown


async def test_enable_schedule(funded: Caller) -> None:
    card = await add_card(funded)
    shown = await enable(funded, SCHEDULE)
    assert {**shown, "nextRunAt": None} == {
        **DEFAULTS,
        "enabled": True,
        "trigger": "SCHEDULE",
        "intervalDays": 30,
        "rechargeCredits": 500,
        "card": short(card),
    }
    next_run = datetime.fromisoformat(shown["nextRunAt"])
    expected = datetime.now(UTC) + timedelta(days=30)
    assert abs(next_run - expected) < timedelta(minutes=10)
    assert next_run.utcoffset() == timedelta(0)  # times on the wire are UTC
    stored = await setting(funded)
    assert datetime.fromisoformat(stored["nextRunAt"]) == next_run


async def test_disable(funded: Caller) -> None:
    await add_card(funded)
    on = await enable(funded, {**SCHEDULE, "notify": True, "notifyEmails": ["a@example.com"]})
    shown = await enable(funded, {"enabled": False})
    # turned off, its configuration kept for the next {enabled: true} (DESIGN.md section 3)
    assert shown == {**on, "enabled": False, "nextRunAt": None}
    assert shown["card"] is not None  # the primary card is still shown
    assert await setting(funded) == shown


async def test_disable_without_any_card(admin: Caller) -> None:
    shown = await enable(admin, {"enabled": False, "notify": True, "notifyEmails": []})
    assert shown == {**DEFAULTS, "notify": True}
    assert await setting(admin) == shown


async def test_pinned_secondary_card(funded: Caller) -> None:
    primary = await add_card(funded)
    secondary = await add_card(funded, "pm_card_mastercard")
    assert primary["isPrimary"] is True and secondary["isPrimary"] is False
    shown = await enable(funded, {**THRESHOLD, "usePrimaryCard": False, "cardId": secondary["id"]})
    assert shown["usePrimaryCard"] is False
    assert shown["card"] == short(secondary)
    assert await setting(funded) == shown


@pytest.mark.parametrize(
    "input",
    [
        pytest.param({**SCHEDULE, "intervalDays": 1}, id="interval-1"),
        pytest.param({**SCHEDULE, "intervalDays": 365}, id="interval-365"),
        pytest.param({**THRESHOLD, "rechargeCredits": 100}, id="recharge-min"),
        pytest.param(
            {**THRESHOLD, "notifyEmails": [f"u{i}@example.com" for i in range(10)]},
            id="ten-emails",
        ),
        pytest.param({**THRESHOLD, "monthlyLimitCredits": 500}, id="limit-equals-recharge"),
    ],
)
async def test_boundaries_accepted(funded: Caller, input: dict[str, Any]) -> None:
    await add_card(funded)
    shown = await enable(funded, input)
    for name, value in input.items():
        assert shown[name] == value, name
    assert await setting(funded) == shown


# ---------------------------------------------------------------- refusals


@pytest.fixture
async def previous(funded: Caller) -> dict[str, Any]:
    """A valid setting already in place (two cards, the primary used)."""
    await add_card(funded)
    await add_card(funded, "pm_card_mastercard")
    return await enable(
        funded,
        {
            **THRESHOLD,
            "notify": True,
            "notifyEmails": ["billing@example.com"],
            "monthlyLimitCredits": 2000,
        },
    )


def _cleared(d: dict[str, Any], *names: str) -> dict[str, Any]:
    """``d`` with ``names`` cleared by an explicit null (an omitted field keeps its value)."""
    return {**d, **dict.fromkeys(names)}


INVALID = [
    pytest.param(_cleared(THRESHOLD, "trigger"), [("VALIDATION", ["trigger"])], id="no-trigger"),
    pytest.param(
        _cleared(THRESHOLD, "rechargeCredits"),
        [("VALIDATION", ["rechargeCredits"])],
        id="no-recharge-credits",
    ),
    pytest.param(
        {"enabled": True, "thresholdCredits": 25, "trigger": None, "rechargeCredits": None},
        [("VALIDATION", ["rechargeCredits"]), ("VALIDATION", ["trigger"])],
        id="no-trigger-no-recharge",
    ),
    pytest.param(
        _cleared(THRESHOLD, "thresholdCredits"),
        [("VALIDATION", ["thresholdCredits"])],
        id="threshold-without-threshold",
    ),
    pytest.param(
        _cleared(SCHEDULE, "intervalDays"),
        [("VALIDATION", ["intervalDays"])],
        id="schedule-without-interval",
    ),
    pytest.param(
        {**THRESHOLD, "rechargeCredits": 99},
        [("INVALID_AMOUNT", ["rechargeCredits"])],
        id="recharge-below-min",
    ),
    pytest.param(
        {**THRESHOLD, "rechargeCredits": 1_000_001, "monthlyLimitCredits": None},
        [("INVALID_AMOUNT", ["rechargeCredits"])],
        id="recharge-above-max",
    ),
    pytest.param(
        {**THRESHOLD, "thresholdCredits": 0},
        [("VALIDATION", ["thresholdCredits"])],
        id="threshold-zero",
    ),
    pytest.param(
        {**SCHEDULE, "intervalDays": 0}, [("VALIDATION", ["intervalDays"])], id="interval-0"
    ),
    pytest.param(
        {**SCHEDULE, "intervalDays": 366}, [("VALIDATION", ["intervalDays"])], id="interval-366"
    ),
    pytest.param(
        {**THRESHOLD, "notifyEmails": ["ok@example.com", "not-an-email"]},
        [("VALIDATION", ["notifyEmails", "1"])],
        id="bad-email",
    ),
    pytest.param(  # the message's headers ended early, the subject fell into the body
        {**THRESHOLD, "notifyEmails": ["a@b.com\n", "ok@example.com", "a@b.com\r\nBcc: x@y.com"]},
        [("VALIDATION", ["notifyEmails", "0"]), ("VALIDATION", ["notifyEmails", "2"])],
        id="header-injection",
    ),
    pytest.param(  # two recipients in one
        {**THRESHOLD, "notifyEmails": ["x,y<z>@b.com", "Ann <ann@example.com>"]},
        [("VALIDATION", ["notifyEmails", "0"]), ("VALIDATION", ["notifyEmails", "1"])],
        id="several-in-one",
    ),
    pytest.param(
        {**THRESHOLD, "notifyEmails": ["two@@example.com", "ok@example.com", "a b@example.com"]},
        [("VALIDATION", ["notifyEmails", "0"]), ("VALIDATION", ["notifyEmails", "2"])],
        id="two-bad-emails",
    ),
    pytest.param(
        {**THRESHOLD, "notifyEmails": [""]},
        [("VALIDATION", ["notifyEmails", "0"])],
        id="empty-email",
    ),
    pytest.param(
        {**THRESHOLD, "notifyEmails": [f"u{i}@example.com" for i in range(11)]},
        [("VALIDATION", ["notifyEmails"])],
        id="eleven-emails",
    ),
    pytest.param(
        {**THRESHOLD, "monthlyLimitCredits": 499},
        [("VALIDATION", ["monthlyLimitCredits"])],
        id="limit-below-recharge",
    ),
    pytest.param(
        {**THRESHOLD, "usePrimaryCard": False},
        [("VALIDATION", ["cardId"])],
        id="pinned-without-card-id",
    ),
]


@pytest.mark.parametrize(("input", "expected"), INVALID)
async def test_invalid_input_keeps_previous(
    funded: Caller,
    previous: dict[str, Any],
    input: dict[str, Any],
    expected: list[tuple[str, list[str]]],
) -> None:
    payload = await update(funded, input)
    assert errors_of(payload) == sorted(expected, key=str)
    assert payload["autoRecharge"] is None
    assert await setting(funded) == previous


async def test_enable_without_card_is_no_card_on_file(admin: Caller, staff: Caller) -> None:
    await grant(staff, admin.account_id, 1000)
    before = await enable(admin, {"enabled": False, "notify": True})
    for input in (THRESHOLD, SCHEDULE):
        payload = await update(admin, input)
        assert [e["code"] for e in payload["errors"]] == ["NO_CARD_ON_FILE"]
        assert payload["autoRecharge"] is None
        assert await setting(admin) == before


@pytest.mark.parametrize(
    "card_id",
    ["nope", "Q2FyZDpub3QtYS11dWlk", "Q3JlZGl0VHJhbnNhY3Rpb246" + "A" * 20],
    ids=["garbage", "card-prefix-bad-uuid", "wrong-kind"],
)
async def test_malformed_card_id_is_not_found(
    funded: Caller, previous: dict[str, Any], card_id: str
) -> None:
    payload = await update(funded, {**THRESHOLD, "usePrimaryCard": False, "cardId": card_id})
    assert errors_of(payload) == [("NOT_FOUND", ["cardId"])]
    assert payload["autoRecharge"] is None
    assert await setting(funded) == previous


async def test_foreign_card_id_is_not_found(
    funded: Caller, previous: dict[str, Any], caller: MakeCaller
) -> None:
    other = caller(f"other-{uuid.uuid4().hex[:12]}", Role.ADMIN)
    foreign = await add_card(other, "pm_card_mastercard")
    for input in (
        {**THRESHOLD, "usePrimaryCard": False, "cardId": foreign["id"]},
        {**SCHEDULE, "usePrimaryCard": False, "cardId": foreign["id"]},
    ):
        payload = await update(funded, input)
        assert errors_of(payload) == [("NOT_FOUND", ["cardId"])]
        assert payload["autoRecharge"] is None
        assert await setting(funded) == previous
    # and the other account's setting is untouched
    assert await setting(other) == {**DEFAULTS, "card": short(foreign)}
