"""The permission table, walked: every Query, Mutation and Subscription field of
schema.graphql x every single role, no role, and the combinations ADMIN+SERVICE,
STAFF+SERVICE, STAFF+ADMIN and USER+SERVICE, over HTTP, on the caller's own account and on
another's. Roles never add up to a power neither has alone: a token with BILLING_STAFF and
SERVICE spent any tenant's credits (and invoiced metered usage to the victim's card)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from graphql import GraphQLObjectType, build_schema

from api import ids
from api.permissions import TABLE
from billing.enums import Role
from billing.models import LedgerEntry, MeteredUsage
from tests.conftest import ROOT, Caller, MakeCaller
from tests.support.ops import add_card, consume, grant, key

ADMIN, USER, SERVICE, STAFF = Role.ADMIN, Role.USER, Role.SERVICE, Role.BILLING_STAFF
OWN, ANY = "own", "any"
SIGNED_IN = "signed-in"
NOBODY = uuid.UUID(int=0)  # an id no object has

#: What the design says each role may do, written out here independently of the table.
SPEC: dict[str, dict[Role, str] | str] = {
    "Query.viewer": SIGNED_IN,
    "Query.creditPricing": SIGNED_IN,
    "Query.creditAccount": {ADMIN: OWN, STAFF: ANY},
    "Mutation.addCard": {ADMIN: OWN},
    "Mutation.updateCard": {ADMIN: OWN, STAFF: ANY},
    "Mutation.setPrimaryCard": {ADMIN: OWN, STAFF: ANY},
    "Mutation.removeCard": {ADMIN: OWN, STAFF: ANY},
    "Mutation.purchaseCredits": {ADMIN: OWN},
    "Mutation.confirmPurchase": {ADMIN: OWN},
    "Mutation.startCardSetup": {ADMIN: OWN},
    "Mutation.updateAutoRecharge": {ADMIN: OWN},
    "Mutation.updateLowBalanceAlert": {ADMIN: OWN},
    "Mutation.consumeCredits": {SERVICE: OWN},
    "Mutation.consumeCreditsBatch": {SERVICE: OWN},
    "Mutation.recordMeteredUsage": {SERVICE: OWN},
    "Mutation.reverseUsage": {SERVICE: OWN, STAFF: ANY},
    "Mutation.grantCredits": {STAFF: ANY},
    "Mutation.adjustCredits": {STAFF: ANY},
    "Subscription.creditBalanceChanged": {ADMIN: OWN},
}

ROLE_SETS: list[tuple[Role, ...]] = [
    (),
    (ADMIN,),
    (USER,),
    (SERVICE,),
    (STAFF,),
    (ADMIN, SERVICE),
    (STAFF, SERVICE),
    (STAFF, ADMIN),
    (USER, SERVICE),
]


def schema_operations() -> list[str]:
    schema = build_schema((ROOT / "schema.graphql").read_text())
    found = []
    for root in (schema.query_type, schema.mutation_type, schema.subscription_type):
        assert isinstance(root, GraphQLObjectType)
        found += [f"{root.name}.{name}" for name in root.fields]
    return found


def test_every_operation_has_a_row() -> None:
    """A new operation without a row in api.permissions.TABLE (or in this walk) fails."""
    operations = schema_operations()
    assert [op for op in operations if op not in TABLE] == []
    assert [op for op in operations if op not in SPEC] == []


def expected(operation: str, roles: tuple[Role, ...]) -> str | None:
    rule = SPEC[operation]
    if rule == SIGNED_IN:
        return OWN
    assert isinstance(rule, dict)
    reaches = {rule[r] for r in roles if r in rule}
    return ANY if ANY in reaches else OWN if OWN in reaches else None


@dataclass
class Victim:
    account_id: str
    admin: Caller
    usage_entry: str


Request = tuple[str, dict[str, Any]]


def _consume_input(account: str) -> dict[str, Any]:
    return {
        "accountId": account,
        "userId": "u-1",
        "processType": "POSTCARD",
        "quantity": 1,
        "idempotencyKey": key(),
    }


async def requests(
    operation: str, own: str, victim: Victim, fresh_victim_card: Callable[[], Awaitable[str]]
) -> tuple[Request, Request | None]:
    """The operation aimed at the caller's own account, and (when it can name one)
    aimed at the victim's."""
    errors = "errors { code }"
    card_ops = {
        "Mutation.updateCard": f"mutation($id: ID!) {{ updateCard(input: {{cardId: $id, "
        f'cardholderName: "X"}}) {{ {errors} }} }}',
        "Mutation.setPrimaryCard": f"mutation($id: ID!) {{ setPrimaryCard(input: "
        f"{{cardId: $id}}) {{ {errors} }} }}",
        "Mutation.removeCard": f"mutation($id: ID!) {{ removeCard(input: {{cardId: $id}}) "
        f"{{ {errors} }} }}",
    }
    if operation in card_ops:
        query = card_ops[operation]
        return (query, {"id": ids.encode("Card", NOBODY)}), (
            query,
            {"id": await fresh_victim_card()},
        )
    spend = f"mutation($i: ConsumeCreditsInput!) {{ consumeCredits(input: $i) {{ {errors} }} }}"
    metered = (
        f"mutation($i: RecordMeteredUsageInput!) {{ recordMeteredUsage(input: $i) {{ {errors} }} }}"
    )
    batch = (
        "mutation($i: [ConsumeCreditsInput!]!) { consumeCreditsBatch(inputs: $i) "
        f"{{ {errors} }} }}"
    )
    money = "mutation($i: GrantCreditsInput!) { %s(input: $i) { " + errors + " } }"  # grant, adjust

    def money_input(account: str) -> dict[str, Any]:
        return {"i": {"accountId": account, "credits": 1, "reason": "t", "idempotencyKey": key()}}

    def metered_input(account: str) -> dict[str, Any]:
        return {"i": {**_consume_input(account), "processType": "PREMIUM_AUDIO_TRANSCRIPTION"}}

    table: dict[str, tuple[Request, Request | None]] = {
        "Query.viewer": (("{ viewer { userId } }", {}), None),
        "Query.creditPricing": (("{ creditPricing { currency } }", {}), None),
        "Query.creditAccount": (
            ("query($a: ID) { creditAccount(accountId: $a) { id } }", {"a": own}),
            ("query($a: ID) { creditAccount(accountId: $a) { id } }", {"a": victim.account_id}),
        ),
        "Mutation.addCard": (
            (
                'mutation { addCard(input: {paymentMethodId: "pm_card_visa"}) '
                f"{{ {errors} }} }}",
                {},
            ),
            None,
        ),
        "Mutation.purchaseCredits": (
            (
                "mutation($i: PurchaseCreditsInput!) { purchaseCredits(input: $i) "
                f"{{ {errors} }} }}",
                {"i": {"credits": 100, "idempotencyKey": key()}},
            ),
            None,
        ),
        "Mutation.confirmPurchase": (
            (
                "mutation($id: ID!) { confirmPurchase(input: {paymentId: $id}) "
                f"{{ {errors} }} }}",
                {"id": ids.encode("Payment", NOBODY)},
            ),
            None,
        ),
        "Mutation.startCardSetup": (
            (f"mutation {{ startCardSetup {{ {errors} }} }}", {}),
            None,
        ),
        "Mutation.updateAutoRecharge": (
            (f"mutation {{ updateAutoRecharge(input: {{enabled: false}}) {{ {errors} }} }}", {}),
            None,
        ),
        "Mutation.updateLowBalanceAlert": (
            (f"mutation {{ updateLowBalanceAlert(input: {{enabled: false}}) {{ {errors} }} }}", {}),
            None,
        ),
        "Mutation.consumeCredits": (
            (spend, {"i": _consume_input(own)}),
            (spend, {"i": _consume_input(victim.account_id)}),
        ),
        "Mutation.consumeCreditsBatch": (
            (batch, {"i": [_consume_input(own)]}),
            (batch, {"i": [_consume_input(victim.account_id)]}),
        ),
        "Mutation.recordMeteredUsage": (
            (metered, metered_input(own)),
            (metered, metered_input(victim.account_id)),
        ),
        "Mutation.reverseUsage": (
            (
                f"mutation($i: ReverseUsageInput!) {{ reverseUsage(input: $i) {{ {errors} }} }}",
                {
                    "i": {
                        "transactionId": ids.encode("CreditTransaction", NOBODY),
                        "reason": "t",
                        "idempotencyKey": key(),
                    }
                },
            ),
            (
                f"mutation($i: ReverseUsageInput!) {{ reverseUsage(input: $i) {{ {errors} }} }}",
                {
                    "i": {
                        "transactionId": victim.usage_entry,
                        "reason": "t",
                        "idempotencyKey": key(),
                    }
                },
            ),
        ),
        "Mutation.grantCredits": (
            (money % "grantCredits", money_input(own)),
            (money % "grantCredits", money_input(victim.account_id)),
        ),
        "Mutation.adjustCredits": (
            (money % "adjustCredits", money_input(own)),
            (money % "adjustCredits", money_input(victim.account_id)),
        ),
        "Subscription.creditBalanceChanged": (
            ("subscription { creditBalanceChanged { balance } }", {}),
            None,
        ),
    }
    return table[operation]


def _outcome(body: dict[str, Any]) -> str:
    """FORBIDDEN (top level), NOT_FOUND (the payload's: another account's object), or ok."""
    top = [e.get("extensions", {}).get("code") for e in body.get("errors") or []]
    if "FORBIDDEN" in top:
        assert body.get("data") is None, body
        return "FORBIDDEN"
    payloads = body.get("data") or {}
    for payload in payloads.values():
        for item in payload if isinstance(payload, list) else [payload]:
            if isinstance(item, dict) and any(
                e["code"] == "NOT_FOUND" for e in item.get("errors") or []
            ):
                return "NOT_FOUND"
    return "ok"


@pytest.fixture
async def victim(caller: MakeCaller, staff: Caller, gateway_name: str) -> Victim:
    if gateway_name != "sandbox":
        pytest.skip("roles do not depend on the gateway: walked once, on the sandbox")
    account = f"victim-{key()[:10]}"
    admin = caller(account, ADMIN)
    await add_card(admin)
    await grant(staff, account, 1_000)
    spent = await consume(caller(account, SERVICE))
    return Victim(account, admin, spent["transaction"]["id"])


@pytest.mark.parametrize("roles", ROLE_SETS, ids=lambda rs: "+".join(r.value for r in rs) or "none")
async def test_the_table_holds_for_every_operation(
    caller: MakeCaller, account_id: str, victim: Victim, roles: tuple[Role, ...]
) -> None:
    who = caller(account_id, *roles)

    async def fresh_victim_card() -> str:
        return str((await add_card(victim.admin))["id"])

    seen: dict[str, tuple[str, str | None]] = {}
    for operation in schema_operations():
        reach = expected(operation, roles)
        own, other = await requests(operation, account_id, victim, fresh_victim_card)
        got_own = _outcome((await who.raw(*own)).json())
        got_other = _outcome((await who.raw(*other)).json()) if other else None
        seen[operation] = (got_own, got_other)
        if reach is None:
            assert got_own == "FORBIDDEN", (operation, roles)
            assert got_other in (None, "FORBIDDEN"), (operation, roles)
            continue
        assert got_own != "FORBIDDEN", (operation, roles)
        if other is not None:
            if reach == OWN:
                assert got_other in ("FORBIDDEN", "NOT_FOUND"), (operation, roles, got_other)
            else:
                assert got_other == "ok", (operation, roles, got_other)
    assert set(seen) == set(SPEC)
    # Whatever the roles, nobody but the victim's own service spent its credits or
    # recorded metered usage on its card.
    usage = await LedgerEntry.filter(account_id=victim.account_id, type="USAGE").count()
    assert usage == 1
    assert await MeteredUsage.filter(account_id=victim.account_id).count() == 0
