"""Buying credits with a card over GraphQL (DESIGN.md sections 2 and 3)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from billing.enums import Role
from billing.payments.gateways.sandbox import SandboxGateway
from tests.conftest import Caller, MakeCaller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import HISTORY, PURCHASE, add_card, balance, codes, key

PRICING = "{ creditPricing { centsPerCredit currency minPurchaseCredits maxPurchaseCredits } }"


async def pricing(who: Caller) -> dict[str, Any]:
    return cast("dict[str, Any]", (await who.gql(PRICING))["creditPricing"])


async def purchase(admin: Caller, **fields: Any) -> dict[str, Any]:
    data = await admin.gql(PURCHASE, {"input": fields})
    return cast("dict[str, Any]", data["purchaseCredits"])


async def history(admin: Caller) -> list[dict[str, Any]]:
    data = await admin.gql(HISTORY, {"first": 100})
    return [e["node"] for e in data["creditAccount"]["transactions"]["edges"]]


def only_error(payload: dict[str, Any], code: str, field: list[str] | None) -> None:
    assert [(e["code"], e["field"]) for e in payload["errors"]] == [(code, field)], payload
    assert payload["errors"][0]["message"]


def refused(payload: dict[str, Any]) -> None:
    """A refusal writes nothing and returns no payment."""
    assert (payload["payment"], payload["transaction"]) == (None, None), payload


@pytest.fixture
def other_admin(caller: MakeCaller, account_id: str) -> Caller:
    return caller(f"{account_id}-other", Role.ADMIN)


# ---------------------------------------------------------------- success


async def test_purchase_with_the_primary_card(admin: Caller, gateway: SandboxGateway) -> None:
    prices = await pricing(admin)
    card = await add_card(admin)
    await add_card(admin, "pm_card_mastercard")
    credits = prices["minPurchaseCredits"] * 3
    charges = gateway.charge_count

    payload = await purchase(admin, credits=credits, idempotencyKey=key())

    assert payload["errors"] == []
    payment = payload["payment"]
    assert payment["status"] == "SUCCEEDED"
    assert payment["credits"] == credits
    assert payment["amountCents"] == credits * prices["centsPerCredit"]
    assert payment["currency"] == prices["currency"]
    assert payment["clientSecret"] is None
    assert payment["failureMessage"] is None
    assert payment["card"] == {"id": card["id"], "last4": card["last4"]}

    tx = payload["transaction"]
    assert (tx["type"], tx["processType"]) == ("PURCHASE", "MANUAL_PURCHASE")
    assert (tx["credits"], tx["balanceAfter"]) == (credits, credits)
    assert tx["payment"]["id"] == payment["id"]
    assert tx["payment"]["status"] == "SUCCEEDED"
    assert tx["user"]["userId"] == admin.user_id
    assert payload["balance"] == credits

    assert gateway.charge_count == charges + 1
    assert await balance(admin) == credits
    assert await assert_ledger_consistent(admin.account_id) == credits
    assert [t["id"] for t in await history(admin)] == [tx["id"]]


async def test_balance_grows_with_each_purchase(admin: Caller) -> None:
    await add_card(admin)
    first = await purchase(admin, credits=100, idempotencyKey=key())
    second = await purchase(admin, credits=250, idempotencyKey=key())
    assert first["errors"] == second["errors"] == []
    assert first["payment"]["id"] != second["payment"]["id"]
    assert (first["balance"], second["balance"]) == (100, 350)
    assert second["transaction"]["balanceAfter"] == 350
    assert await balance(admin) == 350
    assert await assert_ledger_consistent(admin.account_id) == 350


async def test_purchase_with_an_explicit_card(admin: Caller) -> None:
    await add_card(admin)
    amex = await add_card(admin, "pm_card_amex")
    payload = await purchase(admin, credits=200, cardId=amex["id"], idempotencyKey=key())
    assert payload["errors"] == []
    assert payload["payment"]["status"] == "SUCCEEDED"
    assert payload["payment"]["card"] == {"id": amex["id"], "last4": "8431"}
    assert payload["balance"] == 200
    assert await assert_ledger_consistent(admin.account_id) == 200


async def test_purchase_at_the_bounds(admin: Caller) -> None:
    prices = await pricing(admin)
    await add_card(admin)
    low = await purchase(admin, credits=prices["minPurchaseCredits"], idempotencyKey=key())
    high = await purchase(admin, credits=prices["maxPurchaseCredits"], idempotencyKey=key())
    assert low["errors"] == high["errors"] == []
    assert low["payment"]["status"] == high["payment"]["status"] == "SUCCEEDED"
    assert high["payment"]["amountCents"] == prices["maxPurchaseCredits"] * prices["centsPerCredit"]
    total = prices["minPurchaseCredits"] + prices["maxPurchaseCredits"]
    assert await balance(admin) == total
    assert await assert_ledger_consistent(admin.account_id) == total


async def test_idempotency_key_of_255_characters_is_accepted(admin: Caller) -> None:
    await add_card(admin)
    payload = await purchase(admin, credits=100, idempotencyKey="k" * 255)
    assert payload["errors"] == []
    assert payload["payment"]["status"] == "SUCCEEDED"


# ---------------------------------------------------------------- refusals


async def test_no_card_on_file_is_not_remembered(admin: Caller, gateway: SandboxGateway) -> None:
    the_key = key()
    charges = gateway.charge_count
    payload = await purchase(admin, credits=100, idempotencyKey=the_key)
    refused(payload)
    assert codes(payload) == ["NO_CARD_ON_FILE"]
    assert gateway.charge_count == charges
    assert await balance(admin) == 0

    await add_card(admin)
    payload = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert payload["errors"] == []
    assert payload["payment"]["status"] == "SUCCEEDED"
    assert payload["balance"] == 100
    assert await assert_ledger_consistent(admin.account_id) == 100


@pytest.mark.parametrize("credits", ["below_min", "above_max", 0, -1, -100, -(2**31)])
async def test_invalid_amount(admin: Caller, gateway: SandboxGateway, credits: int | str) -> None:
    prices = await pricing(admin)
    await add_card(admin)
    amount = {
        "below_min": prices["minPurchaseCredits"] - 1,
        "above_max": prices["maxPurchaseCredits"] + 1,
    }.get(str(credits), credits)
    charges = gateway.charge_count
    payload = await purchase(admin, credits=amount, idempotencyKey=key())
    refused(payload)
    only_error(payload, "INVALID_AMOUNT", ["credits"])
    assert gateway.charge_count == charges
    assert await balance(admin) == 0
    assert await history(admin) == []


async def test_invalid_amount_is_not_remembered(admin: Caller) -> None:
    await add_card(admin)
    the_key = key()
    payload = await purchase(admin, credits=1, idempotencyKey=the_key)
    only_error(payload, "INVALID_AMOUNT", ["credits"])
    payload = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert payload["errors"] == []
    assert payload["balance"] == 100


@pytest.mark.parametrize("bad_key", ["", "k" * 256, "k" * 5000])
async def test_idempotency_key_length(admin: Caller, gateway: SandboxGateway, bad_key: str) -> None:
    await add_card(admin)
    charges = gateway.charge_count
    payload = await purchase(admin, credits=100, idempotencyKey=bad_key)
    refused(payload)
    only_error(payload, "VALIDATION", ["idempotencyKey"])
    assert gateway.charge_count == charges
    assert await balance(admin) == 0


async def test_another_accounts_card_is_not_found(
    admin: Caller, other_admin: Caller, gateway: SandboxGateway
) -> None:
    await add_card(admin)
    theirs = await add_card(other_admin)
    charges = gateway.charge_count
    payload = await purchase(admin, credits=100, cardId=theirs["id"], idempotencyKey=key())
    refused(payload)
    only_error(payload, "NOT_FOUND", ["cardId"])
    assert "4242" not in str(payload)
    assert gateway.charge_count == charges
    assert await balance(admin) == 0
    assert await balance(other_admin) == 0


@pytest.mark.parametrize(
    "card_id", ["nope", "", "Q2FyZDowMDAwMDAwMC0wMDAwLTAwMDAtMDAwMC0wMDAwMDAwMDAwMDA"]
)
async def test_malformed_or_unknown_card_id_is_not_found(admin: Caller, card_id: str) -> None:
    await add_card(admin)
    payload = await purchase(admin, credits=100, cardId=card_id, idempotencyKey=key())
    refused(payload)
    only_error(payload, "NOT_FOUND", ["cardId"])
    assert await balance(admin) == 0


@pytest.mark.parametrize("role", [Role.USER, Role.SERVICE, Role.BILLING_STAFF])
async def test_purchase_needs_admin(
    admin: Caller, caller: MakeCaller, account_id: str, role: Role
) -> None:
    await add_card(admin)
    who = caller(account_id, role)
    response = await who.raw(PURCHASE, {"input": {"credits": 100, "idempotencyKey": key()}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"] is None, body
    assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"], body
    assert await balance(admin) == 0


# ---------------------------------------------------------------- idempotency


async def test_same_key_same_params_replays_the_payment(
    admin: Caller, gateway: SandboxGateway
) -> None:
    await add_card(admin)
    the_key = key()
    charges = gateway.charge_count
    first = await purchase(admin, credits=300, idempotencyKey=the_key)
    again = await purchase(admin, credits=300, idempotencyKey=the_key)
    assert first["errors"] == again["errors"] == []
    assert again["payment"]["id"] == first["payment"]["id"]
    assert again["payment"]["status"] == "SUCCEEDED"
    assert again["transaction"]["id"] == first["transaction"]["id"]
    assert again["balance"] == 300
    assert gateway.charge_count == charges + 1
    assert await balance(admin) == 300
    assert await assert_ledger_consistent(admin.account_id) == 300
    assert len(await history(admin)) == 1


async def test_same_key_with_explicit_card_replays(admin: Caller) -> None:
    await add_card(admin)
    master = await add_card(admin, "pm_card_mastercard")
    the_key = key()
    first = await purchase(admin, credits=100, cardId=master["id"], idempotencyKey=the_key)
    again = await purchase(admin, credits=100, cardId=master["id"], idempotencyKey=the_key)
    assert first["errors"] == again["errors"] == []
    assert again["payment"]["id"] == first["payment"]["id"]
    assert await assert_ledger_consistent(admin.account_id) == 100


async def test_same_key_other_credits_is_reused(admin: Caller, gateway: SandboxGateway) -> None:
    await add_card(admin)
    the_key = key()
    first = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert first["errors"] == []
    charges = gateway.charge_count
    payload = await purchase(admin, credits=200, idempotencyKey=the_key)
    refused(payload)
    only_error(payload, "IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])
    assert gateway.charge_count == charges
    assert await balance(admin) == 100
    assert await assert_ledger_consistent(admin.account_id) == 100


async def test_same_key_other_card_is_reused(admin: Caller) -> None:
    await add_card(admin)
    master = await add_card(admin, "pm_card_mastercard")
    amex = await add_card(admin, "pm_card_amex")
    the_key = key()
    first = await purchase(admin, credits=100, cardId=master["id"], idempotencyKey=the_key)
    assert first["errors"] == []
    payload = await purchase(admin, credits=100, cardId=amex["id"], idempotencyKey=the_key)
    refused(payload)
    only_error(payload, "IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])
    assert await balance(admin) == 100


async def test_keys_are_per_account(admin: Caller, other_admin: Caller) -> None:
    await add_card(admin)
    await add_card(other_admin)
    the_key = key()
    mine = await purchase(admin, credits=100, idempotencyKey=the_key)
    theirs = await purchase(other_admin, credits=200, idempotencyKey=the_key)
    assert mine["errors"] == theirs["errors"] == []
    assert mine["payment"]["id"] != theirs["payment"]["id"]
    assert (await balance(admin), await balance(other_admin)) == (100, 200)


async def test_concurrent_purchases_with_one_key_charge_once(
    admin: Caller, gateway: SandboxGateway
) -> None:
    await add_card(admin)
    variables = {"input": {"credits": 400, "idempotencyKey": key()}}
    charges = gateway.charge_count
    results = await asyncio.gather(*(admin.gql(PURCHASE, variables) for _ in range(10)))
    payloads = [r["purchaseCredits"] for r in results]
    assert [p["errors"] for p in payloads] == [[]] * 10
    assert {p["payment"]["id"] for p in payloads} == {payloads[0]["payment"]["id"]}
    assert gateway.charge_count == charges + 1
    assert await balance(admin) == 400
    assert await assert_ledger_consistent(admin.account_id) == 400
    assert len(await history(admin)) == 1


async def test_concurrent_purchases_with_distinct_keys_all_land(
    admin: Caller, gateway: SandboxGateway
) -> None:
    await add_card(admin)
    charges = gateway.charge_count
    results = await asyncio.gather(
        *(
            admin.gql(PURCHASE, {"input": {"credits": 100 + i, "idempotencyKey": key()}})
            for i in range(10)
        )
    )
    payloads = [r["purchaseCredits"] for r in results]
    assert [p["errors"] for p in payloads] == [[]] * 10
    assert len({p["payment"]["id"] for p in payloads}) == 10
    total = sum(100 + i for i in range(10))
    assert gateway.charge_count == charges + 10
    assert sorted(p["transaction"]["balanceAfter"] for p in payloads)[-1] == total
    assert await balance(admin) == total
    assert await assert_ledger_consistent(admin.account_id) == total
    assert len(await history(admin)) == 10


# ---------------------------------------------------------------- declines and 3-D Secure


async def test_declined_charge_fails_and_replays(admin: Caller, gateway: SandboxGateway) -> None:
    card = await add_card(admin, "pm_card_chargeCustomerFail")
    the_key = key()
    charges = gateway.charge_count

    payload = await purchase(admin, credits=100, idempotencyKey=the_key)
    payment = payload["payment"]
    assert payment["status"] == "FAILED"
    assert payment["failureMessage"]
    assert payment["clientSecret"] is None
    assert payment["card"]["id"] == card["id"]
    assert payload["transaction"] is None
    assert codes(payload) == ["CARD_DECLINED"]
    assert payload["errors"][0]["message"]
    assert payload["balance"] == 0
    assert gateway.charge_count == charges + 1
    assert await balance(admin) == 0
    assert await assert_ledger_consistent(admin.account_id) == 0
    assert await history(admin) == []

    again = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert again["payment"]["id"] == payment["id"]
    assert again["payment"]["status"] == "FAILED"
    assert again["payment"]["failureMessage"] == payment["failureMessage"]
    assert again["transaction"] is None
    assert codes(again) == ["CARD_DECLINED"]
    assert gateway.charge_count == charges + 1  # the bank is not asked again
    assert await balance(admin) == 0

    # Other parameters under the declined key are still a reuse.
    reused = await purchase(admin, credits=150, idempotencyKey=the_key)
    refused(reused)
    only_error(reused, "IDEMPOTENCY_KEY_REUSED", ["idempotencyKey"])


async def test_after_a_decline_a_new_key_tries_again(
    admin: Caller, gateway: SandboxGateway
) -> None:
    failing = await add_card(admin, "pm_card_chargeCustomerFail")
    first = await purchase(admin, credits=100, idempotencyKey=key())
    assert codes(first) == ["CARD_DECLINED"]

    visa = await add_card(admin, "pm_card_visa", primary=True)
    charges = gateway.charge_count
    second = await purchase(admin, credits=100, idempotencyKey=key())
    assert second["errors"] == []
    assert second["payment"]["id"] != first["payment"]["id"]
    assert second["payment"]["card"]["id"] == visa["id"] != failing["id"]
    assert gateway.charge_count == charges + 1
    assert await assert_ledger_consistent(admin.account_id) == 100


async def test_authentication_required_needs_action(admin: Caller, gateway: SandboxGateway) -> None:
    await add_card(admin, "pm_card_authenticationRequired")
    the_key = key()
    charges = gateway.charge_count
    payload = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert payload["errors"] == []
    payment = payload["payment"]
    assert payment["status"] == "REQUIRES_ACTION"
    assert payment["clientSecret"]
    assert payment["failureMessage"] is None
    assert payload["transaction"] is None
    assert payload["balance"] == 0
    assert gateway.charge_count == charges + 1
    assert await balance(admin) == 0
    assert await assert_ledger_consistent(admin.account_id) == 0
    assert await history(admin) == []

    again = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert again["errors"] == []
    assert again["payment"]["id"] == payment["id"]
    assert again["payment"]["status"] == "REQUIRES_ACTION"
    assert gateway.charge_count == charges + 1
    assert await balance(admin) == 0


async def test_replay_survives_the_card_being_removed(
    admin: Caller, gateway: SandboxGateway
) -> None:
    await add_card(admin)
    master = await add_card(admin, "pm_card_mastercard")
    the_key = key()
    first = await purchase(admin, credits=100, cardId=master["id"], idempotencyKey=the_key)
    assert first["errors"] == []
    removed = await admin.gql(
        "mutation($id: ID!) { removeCard(input: {cardId: $id}) { errors { code } } }",
        {"id": master["id"]},
    )
    assert removed["removeCard"]["errors"] == []

    charges = gateway.charge_count
    again = await purchase(admin, credits=100, cardId=master["id"], idempotencyKey=the_key)
    assert again["errors"] == []
    assert again["payment"]["id"] == first["payment"]["id"]
    assert again["payment"]["status"] == "SUCCEEDED"
    assert gateway.charge_count == charges
    assert await assert_ledger_consistent(admin.account_id) == 100


async def test_replay_of_a_decline_survives_the_card_being_removed(
    admin: Caller, caller: MakeCaller, account_id: str
) -> None:
    await add_card(admin, "pm_card_chargeCustomerFail")
    the_key = key()
    first = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert codes(first) == ["CARD_DECLINED"]
    accounting = caller(f"{account_id}-vendor", Role.BILLING_STAFF)
    card_id = first["payment"]["card"]["id"]
    removed = await accounting.gql(
        "mutation($id: ID!) { removeCard(input: {cardId: $id}) { errors { code } } }",
        {"id": card_id},
    )
    assert removed["removeCard"]["errors"] == []

    again = await purchase(admin, credits=100, idempotencyKey=the_key)
    assert codes(again) == ["CARD_DECLINED"]
    assert again["payment"]["id"] == first["payment"]["id"]
    assert again["payment"]["status"] == "FAILED"
