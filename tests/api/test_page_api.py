"""What the billing page needs from the API, over GraphQL HTTP: autoRecharge.status,
updateAutoRecharge keeping omitted fields, creditAccount.payments and creditAccount.usage,
and the sandbox's 3-D Secure challenge."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import pytest

from billing.enums import Role
from runtime.queue import InProcessQueue
from tests.conftest import Caller, MakeCaller
from tests.support.ops import AUTO_RECHARGE, METERED, REVERSE, add_card, buy, consume, grant, key

STATUS = "{ creditAccount { autoRecharge { status enabled trigger thresholdCredits "
STATUS += "rechargeCredits usePrimaryCard card { id } notify notifyEmails monthlyLimitCredits } } }"

PAYMENTS = """query($statuses: [PaymentStatus!], $first: Int, $after: String) {
  creditAccount { payments(statuses: $statuses, first: $first, after: $after) {
    edges { cursor node { id status credits amountCents clientSecret } }
    pageInfo { hasNextPage endCursor }
  } }
}"""

USAGE = """query($from: DateTime!, $to: DateTime!, $interval: UsageInterval) {
  creditAccount { usage(from: $from, to: $to, interval: $interval) {
    start processType units freeUnits credits meteredCents
  } }
}"""

CONFIRM = """mutation($id: ID!) { confirmPurchase(input: {paymentId: $id}) {
  payment { id status failureMessage } balance errors { code message } } }"""


async def _setting(admin: Caller) -> dict[str, Any]:
    return cast("dict[str, Any]", (await admin.gql(STATUS))["creditAccount"]["autoRecharge"])


async def _update(admin: Caller, input: dict[str, Any]) -> dict[str, Any]:
    payload = (await admin.gql(AUTO_RECHARGE, {"input": input}))["updateAutoRecharge"]
    assert payload["errors"] == [], payload
    return cast("dict[str, Any]", payload)


# ---------------------------------------------------------------- auto-recharge


async def test_status_off_active_paused_and_off_keeps_the_configuration(
    admin: Caller, staff: Caller
) -> None:
    assert (await _setting(admin))["status"] == "OFF"
    await grant(staff, admin.account_id, 1000)
    await add_card(admin)
    second = await add_card(admin, "pm_card_mastercard")
    full = {
        "enabled": True,
        "trigger": "THRESHOLD",
        "thresholdCredits": 25,
        "rechargeCredits": 500,
        "usePrimaryCard": False,
        "cardId": second["id"],
        "notify": True,
        "notifyEmails": ["ops@example.com"],
        "monthlyLimitCredits": 5000,
    }
    await _update(admin, full)
    on = await _setting(admin)
    assert on["status"] == "ACTIVE"
    assert on["card"] == {"id": second["id"]}

    # {enabled: false} alone: off, everything else kept (the fields with declared
    # defaults, usePrimaryCard and notify, included)
    await _update(admin, {"enabled": False})
    off = await _setting(admin)
    assert off == {**on, "enabled": False, "status": "OFF"}
    await _update(admin, {"enabled": True})
    assert await _setting(admin) == on


async def test_explicit_null_clears_and_literal_inputs_merge_too(
    admin: Caller, staff: Caller
) -> None:
    await grant(staff, admin.account_id, 1000)
    await add_card(admin)
    await _update(
        admin,
        {
            "enabled": True,
            "trigger": "THRESHOLD",
            "thresholdCredits": 25,
            "rechargeCredits": 500,
            "monthlyLimitCredits": 5000,
            "notify": True,
            "notifyEmails": ["ops@example.com"],
        },
    )
    await _update(admin, {"enabled": True, "monthlyLimitCredits": None, "notifyEmails": None})
    shown = await _setting(admin)
    assert shown["monthlyLimitCredits"] is None
    assert shown["notifyEmails"] == []
    assert shown["notify"] is True  # omitted: kept
    assert shown["thresholdCredits"] == 25

    # An inline object (no variables) merges the same way.
    payload = (
        await admin.gql(
            "mutation { updateAutoRecharge(input: {enabled: true, thresholdCredits: 40}) "
            "{ autoRecharge { thresholdCredits rechargeCredits notify status } "
            "errors { code } } }"
        )
    )["updateAutoRecharge"]
    assert payload == {
        "autoRecharge": {
            "thresholdCredits": 40,
            "rechargeCredits": 500,
            "notify": True,
            "status": "ACTIVE",
        },
        "errors": [],
    }


async def test_paused_when_the_card_needs_authentication_off_session(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 100)
    await add_card(admin, "pm_card_authenticationRequired")
    await _update(
        admin,
        {"enabled": True, "trigger": "THRESHOLD", "thresholdCredits": 50, "rechargeCredits": 500},
    )
    await consume(service, "POSTCARD", 5)  # 100 -> 40: crosses the threshold
    await queue.drain()
    shown = (await admin.gql("{ creditAccount { autoRecharge { status enabled pausedReason } } }"))[
        "creditAccount"
    ]["autoRecharge"]
    assert shown["status"] == "PAUSED" and shown["enabled"] is True
    assert shown["pausedReason"]


# ---------------------------------------------------------------- payments


async def test_payments_newest_first_filtered_and_paged(admin: Caller) -> None:
    card = await add_card(admin)
    assert card["isPrimary"]
    bought = [await buy(admin, 100 + i) for i in range(3)]
    assert all(b["errors"] == [] for b in bought)
    data = (await admin.gql(PAYMENTS, {"first": 2}))["creditAccount"]["payments"]
    assert [e["node"]["credits"] for e in data["edges"]] == [102, 101]
    assert data["pageInfo"]["hasNextPage"] is True
    rest = (await admin.gql(PAYMENTS, {"first": 2, "after": data["pageInfo"]["endCursor"]}))[
        "creditAccount"
    ]["payments"]
    assert [e["node"]["credits"] for e in rest["edges"]] == [100]
    assert rest["pageInfo"]["hasNextPage"] is False
    waiting = (await admin.gql(PAYMENTS, {"statuses": ["REQUIRES_ACTION"]}))["creditAccount"]
    assert waiting["payments"]["edges"] == []
    error = await admin.gql_error(PAYMENTS, {"first": 0})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


@pytest.fixture
def sandbox_only(gateway_name: str) -> None:
    if gateway_name != "sandbox":
        pytest.skip("the sandbox gateway's own 3-D Secure challenge")


async def test_3ds_purchase_is_listed_then_approved_in_the_sandbox_challenge(
    admin: Caller, http: httpx.AsyncClient, sandbox_only: None
) -> None:
    await add_card(admin, "pm_card_authenticationRequired")
    started = await buy(admin, 300)
    payment = started["payment"]
    assert payment["status"] == "REQUIRES_ACTION"
    waiting = (await admin.gql(PAYMENTS, {"statuses": ["REQUIRES_ACTION"]}))["creditAccount"]
    [edge] = waiting["payments"]["edges"]
    assert edge["node"]["id"] == payment["id"]
    secret = edge["node"]["clientSecret"]

    wrong = await http.post(
        "/sandbox/authenticate", json={"clientSecret": secret + "x", "approve": True}
    )
    assert wrong.status_code == 404
    answer = await http.post(
        "/sandbox/authenticate", json={"clientSecret": secret, "approve": True}
    )
    assert answer.status_code == 200
    done = (await admin.gql(CONFIRM, {"id": payment["id"]}))["confirmPurchase"]
    assert done["payment"]["status"] == "SUCCEEDED" and done["balance"] == 300
    assert done["errors"] == []


async def test_3ds_failed_in_the_sandbox_challenge_is_a_decline(
    admin: Caller, http: httpx.AsyncClient, sandbox_only: None
) -> None:
    await add_card(admin, "pm_card_authenticationRequired")
    payment = (await buy(admin, 300))["payment"]
    answer = await http.post(
        "/sandbox/authenticate",
        json={"clientSecret": payment["clientSecret"], "approve": False},
    )
    assert answer.status_code == 200
    done = (await admin.gql(CONFIRM, {"id": payment["id"]}))["confirmPurchase"]
    assert done["payment"]["status"] == "FAILED"
    assert [e["code"] for e in done["errors"]] == ["CARD_DECLINED"]
    assert done["balance"] == 0
    bad = await http.post("/sandbox/authenticate", json={"clientSecret": 5})
    assert bad.status_code == 400


# ---------------------------------------------------------------- usage


async def test_usage_by_day_and_month_with_free_and_metered_units(
    admin: Caller, service: Caller, staff: Caller
) -> None:
    await grant(staff, admin.account_id, 5000)
    await add_card(admin)  # metered usage needs a card on file
    await consume(service, "POSTCARD", 2)  # 24 credits
    spent = await consume(service, "POSTCARD", 1)  # 12 credits, reversed below
    reversed_ = await staff.gql(
        REVERSE,
        {
            "input": {
                "transactionId": spent["transaction"]["id"],
                "reason": "test",
                "idempotencyKey": key(),
            }
        },
    )
    assert reversed_["reverseUsage"]["errors"] == []
    await consume(service, "SMART_MATCH", 300)  # wholly free: no ledger entry
    part = await consume(service, "SMART_MATCH", 250)  # 200 free, 50 paid
    assert part["freeUnitsApplied"] == 200
    metered = await service.gql(
        METERED,
        {
            "input": {
                "accountId": service.account_id,
                "userId": "user-1",
                "processType": "PREMIUM_AUDIO_TRANSCRIPTION",
                "quantity": 4,
                "idempotencyKey": key(),
            }
        },
    )
    assert metered["recordMeteredUsage"]["errors"] == []

    now = datetime.now(UTC)
    window = {
        "from": (now - timedelta(days=40)).isoformat(),
        "to": (now + timedelta(days=1)).isoformat(),
    }
    days = (await admin.gql(USAGE, window))["creditAccount"]["usage"]
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    by_type = {b["processType"]: b for b in days}
    assert set(by_type) == {"POSTCARD", "SMART_MATCH", "PREMIUM_AUDIO_TRANSCRIPTION"}
    assert all(datetime.fromisoformat(b["start"]) == today for b in days)
    assert by_type["POSTCARD"] == {**by_type["POSTCARD"], "units": 2, "credits": 24}
    assert by_type["PREMIUM_AUDIO_TRANSCRIPTION"]["units"] == 4
    assert by_type["PREMIUM_AUDIO_TRANSCRIPTION"]["meteredCents"] == 100
    # free units too, the wholly free use's included (it wrote no ledger entry)
    assert by_type["SMART_MATCH"] == {
        **by_type["SMART_MATCH"],
        "units": 550,
        "freeUnits": 500,
        "credits": 50,
        "meteredCents": 0,
    }

    months = (await admin.gql(USAGE, {**window, "interval": "MONTH"}))["creditAccount"]["usage"]
    smart = next(b for b in months if b["processType"] == "SMART_MATCH")
    assert (smart["freeUnits"], smart["units"], smart["credits"]) == (500, 550, 50)
    assert datetime.fromisoformat(smart["start"]) == today.replace(day=1)


async def test_usage_window_is_validated(admin: Caller) -> None:
    now = datetime.now(UTC)
    too_long = {"from": (now - timedelta(days=401)).isoformat(), "to": now.isoformat()}
    assert (await admin.gql_error(USAGE, too_long))["extensions"]["code"] == "BAD_USER_INPUT"
    backwards = {"from": now.isoformat(), "to": (now - timedelta(days=1)).isoformat()}
    assert (await admin.gql_error(USAGE, backwards))["extensions"]["code"] == "BAD_USER_INPUT"


async def test_usage_and_payments_need_the_admin(caller: MakeCaller, account_id: str) -> None:
    user = caller(account_id, Role.USER)
    now = datetime.now(UTC)
    error = await user.gql_error(
        USAGE, {"from": (now - timedelta(days=1)).isoformat(), "to": now.isoformat()}
    )
    assert error["extensions"]["code"] == "FORBIDDEN"


async def test_start_card_setup_gives_a_setup_intent_secret(
    admin: Caller, caller: MakeCaller, account_id: str
) -> None:
    setup = (await admin.gql("mutation { startCardSetup { clientSecret errors { code } } }"))[
        "startCardSetup"
    ]
    assert setup["errors"] == []
    assert setup["clientSecret"].startswith("seti_") and "_secret_" in setup["clientSecret"]
    user = caller(account_id, Role.USER)
    error = await user.gql_error("mutation { startCardSetup { clientSecret } }")
    assert error["extensions"]["code"] == "FORBIDDEN"


async def test_usage_counts_free_units_spent_in_a_batch(admin: Caller, service: Caller) -> None:
    batch = """mutation($inputs: [ConsumeCreditsInput!]!) {
      consumeCreditsBatch(inputs: $inputs) { freeUnitsApplied errors { code } } }"""
    inputs = [
        {
            "accountId": service.account_id,
            "userId": "user-1",
            "processType": "SOCIAL_MEDIA_APPEND",
            "quantity": 40,
            "idempotencyKey": key(),
        }
        for _ in range(3)
    ]
    done = (await service.gql(batch, {"inputs": inputs}))["consumeCreditsBatch"]
    assert [d["freeUnitsApplied"] for d in done] == [40, 40, 40]
    now = datetime.now(UTC)
    window = {
        "from": (now - timedelta(days=1)).isoformat(),
        "to": (now + timedelta(days=1)).isoformat(),
    }
    buckets = (await admin.gql(USAGE, window))["creditAccount"]["usage"]
    assert [(b["processType"], b["units"], b["freeUnits"], b["credits"]) for b in buckets] == [
        ("SOCIAL_MEDIA_APPEND", 120, 120, 0)
    ]
