"""Isolation and roles, for every query field, mutation and subscription of
``schema.graphql``, generated from the schema itself (graphql-core's ``build_schema``): a
new field or mutation is covered the day it appears, and a mutation without an entry in
``MUTATIONS`` (its sample input and the outcome each attacker must get) fails loudly.

A victim account is set up with cards, a purchase, a payment waiting for 3-D Secure, a
spend, metered usage, an auto-recharge setting and a low-balance alert. Three attackers
go at it, each with its ids in hand:

- ``user``: a ``USER`` of the victim's own account;
- ``admin``: an ``ADMIN`` of another account;
- ``service``: a ``SERVICE`` token for another account.

Queries must answer ``FORBIDDEN`` or only the caller's own data (nothing of the victim's
anywhere in the response). Mutations aimed at the victim's objects must answer
``FORBIDDEN`` or ``NOT_FOUND`` (``OWN``: the mutation names no other account's object and
acts on the caller's own) and write nothing: every row the victim owns, in every table,
is the same afterwards, no card was charged, and reconciliation is clean.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from graphql import (
    GraphQLField,
    GraphQLObjectType,
    GraphQLSchema,
    ast_from_value,
    build_schema,
    get_named_type,
    is_leaf_type,
    is_non_null_type,
    parse,
    print_ast,
    validate,
)
from graphql.pyutils import Undefined
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection

from billing import reconcile
from billing.enums import Role
from billing.models import (
    Account,
    AutoRechargeSetting,
    Card,
    FreeQuotaUsage,
    IdempotencyRecord,
    Invoice,
    LedgerEntry,
    Member,
    MeteredUsage,
    Notification,
    Payment,
)
from runtime.queue import InProcessQueue
from tests.api.test_live_balance import open_socket, serving
from tests.conftest import ROOT, Caller, MakeCaller
from tests.support.gateways import GatewayHarness
from tests.support.ops import METERED, add_card, buy, consume, grant, key

SDL: GraphQLSchema = build_schema((ROOT / "schema.graphql").read_text())
MAX_DEPTH = 8  # the schema's deepest path is 8 (the query depth limit is 10)
ATTACKERS = ("user", "admin", "service")

FORBIDDEN, NOT_FOUND, OWN = "FORBIDDEN", "NOT_FOUND", "OWN"


# ---------------------------------------------------------------- documents from the schema


def selection(field_type: Any, args: dict[str, Any] | None = None, depth: int = 1) -> str:
    """Every field below ``field_type``, to ``MAX_DEPTH``; ``args`` fills the arguments of
    nested fields that have a sample (``None``: leave them at their defaults)."""
    named = get_named_type(field_type)
    if not isinstance(named, GraphQLObjectType):
        return ""
    parts = []
    for name, field in named.fields.items():
        inner = get_named_type(field.type)
        assert is_leaf_type(inner) or isinstance(inner, GraphQLObjectType), (
            f"{named.name}.{name} is a {type(inner).__name__}: teach selection() about it"
        )
        if isinstance(inner, GraphQLObjectType):
            if depth >= MAX_DEPTH:
                continue
            parts.append(
                f"{name}{arguments(field, args)} {{ {selection(field.type, args, depth + 1)} }}"
            )
        else:
            parts.append(f"{name}{arguments(field, args)}")
    return " ".join(parts)


# Required arguments that aim at nobody in particular (creditAccount.usage's window).
_NOW = datetime.now(UTC)
REQUIRED: dict[str, Any] = {
    "from": (_NOW - timedelta(days=300)).isoformat(),
    "to": (_NOW + timedelta(days=1)).isoformat(),
}


def arguments(field: GraphQLField, samples: dict[str, Any] | None) -> str:
    """Literal arguments from ``samples``; a required argument without one fails loudly."""
    given = []
    for name, arg in field.args.items():
        if samples is not None and name in samples:
            literal = ast_from_value(samples[name], arg.type)
            assert literal is not None, (name, samples[name])
            given.append(f"{name}: {print_ast(literal)}")
        elif is_non_null_type(arg.type) and arg.default_value is Undefined and name in REQUIRED:
            literal = ast_from_value(REQUIRED[name], arg.type)
            assert literal is not None, (name, REQUIRED[name])
            given.append(f"{name}: {print_ast(literal)}")
        elif is_non_null_type(arg.type) and arg.default_value is Undefined:
            raise AssertionError(
                f"argument {name!r} is required and has no sample in query_args(): add one"
            )
    return f"({', '.join(given)})" if given else ""


def operation(kind: str, name: str, field: GraphQLField) -> str:
    """``kind($a: T!, ...) { name(a: $a, ...) { everything } }``."""
    declared = ", ".join(f"${a}: {arg.type}" for a, arg in field.args.items())
    passed = ", ".join(f"{a}: ${a}" for a in field.args)
    head = f"{kind}({declared})" if declared else kind
    call = f"{name}({passed})" if passed else name
    inner = selection(field.type)
    return f"{head} {{ {call}{f' {{ {inner} }}' if inner else ''} }}"


def full_read() -> str:
    field = SDL.query_type.fields["creditAccount"] if SDL.query_type else None
    assert field is not None
    return operation("query", "creditAccount", field)


# ---------------------------------------------------------------- the victim and attackers


@dataclass
class Victim:
    account_id: str
    tag: str  # in every name, e-mail, reference and reason the victim has
    admin: Caller
    cards: list[str]  # visa (primary), mastercard (pinned for auto-recharge), 3-D Secure
    payment_id: str  # a succeeded purchase
    pending_payment_id: str  # 3-D Secure done at the bank, not yet confirmed here
    spend_id: str
    purchase_tx_id: str
    cursor: str
    user_id: str


@dataclass
class Attacker:
    kind: str
    who: Caller
    account_id: str
    card_id: str | None  # its own card (the admin's account has one)
    spend_id: str | None


@pytest.fixture
async def victim(
    caller: MakeCaller, staff: Caller, harness: GatewayHarness, queue: InProcessQueue
) -> Victim:
    tag = uuid.uuid4().hex[:10]
    account = f"victim-{tag}"
    admin = caller(account, Role.ADMIN, user=f"v-admin-{tag}", email=f"v-{tag}@example.com")
    service = caller(account, Role.SERVICE, user=f"v-svc-{tag}")
    await grant(staff, account, 1_000)
    visa = await add_card(admin)
    master = await add_card(admin, "pm_card_mastercard")
    secure = await add_card(admin, "pm_card_authenticationRequired")
    named = await admin.gql(
        """mutation($input: UpdateCardInput!) { updateCard(input: $input) { errors { code } } }""",
        {"input": {"cardId": master["id"], "cardholderName": f"Holder {tag}"}},
    )
    assert named["updateCard"]["errors"] == []
    bought = await buy(admin, 100, cardId=visa["id"])
    assert bought["errors"] == [] and bought["payment"]["status"] == "SUCCEEDED", bought
    pending = await buy(admin, 200, cardId=secure["id"])
    assert pending["payment"]["status"] == "REQUIRES_ACTION", pending
    row = await Payment.get(id=_uuid_of(pending["payment"]["id"]))
    assert row.gateway_payment_id and row.client_secret
    await harness.complete_3ds(row.gateway_payment_id, row.client_secret)
    spent = await consume(service, "POSTCARD", 2, reference=f"ref-{tag}", userId=f"v-user-{tag}")
    assert spent["errors"] == [], spent
    metered = await service.gql(
        METERED,
        {
            "input": {
                "accountId": account,
                "userId": f"v-user-{tag}",
                "processType": "PREMIUM_AUDIO_TRANSCRIPTION",
                "quantity": 3,
                "idempotencyKey": key(),
                "reference": f"audio-{tag}",
            }
        },
    )
    assert metered["recordMeteredUsage"]["errors"] == [], metered
    recharge = await admin.gql(
        """mutation($input: AutoRechargeInput!) {
          updateAutoRecharge(input: $input) { errors { code message } } }""",
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": 10,
                "rechargeCredits": 500,
                "usePrimaryCard": False,
                "cardId": master["id"],
                "notify": True,
                "notifyEmails": [f"v-{tag}@example.com"],
            }
        },
    )
    assert recharge["updateAutoRecharge"]["errors"] == [], recharge
    alert = await admin.gql(
        """mutation { updateLowBalanceAlert(input: {enabled: true, levelCredits: 50}) {
          errors { code } } }"""
    )
    assert alert["updateLowBalanceAlert"]["errors"] == []
    await queue.drain()
    page = await admin.gql("{ creditAccount { transactions(first: 1) { edges { cursor } } } }")
    return Victim(
        account_id=account,
        tag=tag,
        admin=admin,
        cards=[visa["id"], master["id"], secure["id"]],
        payment_id=bought["payment"]["id"],
        pending_payment_id=pending["payment"]["id"],
        spend_id=spent["transaction"]["id"],
        purchase_tx_id=bought["transaction"]["id"],
        cursor=page["creditAccount"]["transactions"]["edges"][0]["cursor"],
        user_id=f"v-user-{tag}",
    )


def _uuid_of(global_id: str) -> uuid.UUID:
    from api import ids

    for kind in ("Payment", "Card", "CreditTransaction"):
        found = ids.decode(kind, global_id)
        if found is not None:
            return found
    raise AssertionError(global_id)


async def make_attacker(kind: str, caller: MakeCaller, staff: Caller, victim: Victim) -> Attacker:
    if kind == "user":
        who = caller(victim.account_id, Role.USER, user=f"mallory-{uuid.uuid4().hex[:6]}")
        return Attacker(kind, who, victim.account_id, None, None)
    other = f"attacker-{uuid.uuid4().hex[:10]}"
    await grant(staff, other, 300)
    other_admin = caller(other, Role.ADMIN, user=f"mallory-admin-{other}")
    card = await add_card(other_admin)
    spent = await consume(caller(other, Role.SERVICE), "POSTCARD")
    who = other_admin if kind == "admin" else caller(other, Role.SERVICE, user="svc-mallory")
    return Attacker(kind, who, other, card["id"], spent["transaction"]["id"])


# ---------------------------------------------------------------- what must not change


async def rows(account_id: str, exclude_users: Iterable[str] = ()) -> dict[str, Any]:
    """Every row the account owns, table by table (its members bar the caller itself: a
    user's first call records who it is)."""
    out: dict[str, Any] = {
        "account": await Account.filter(id=account_id).values(),
        "members": [
            m
            for m in await Member.filter(account_id=account_id).order_by("user_id").values()
            if m["user_id"] not in set(exclude_users)
        ],
    }
    for name, model in (
        ("cards", Card),
        ("payments", Payment),
        ("entries", LedgerEntry),
        ("idempotency", IdempotencyRecord),
        ("free_quota", FreeQuotaUsage),
        ("metered", MeteredUsage),
        ("auto_recharge", AutoRechargeSetting),
        ("notifications", Notification),
        ("invoices", Invoice),
    ):
        pk = model._meta.pk_attr
        out[name] = await model.filter(account_id=account_id).order_by(pk).values()
    return out


async def seen_by_staff(staff: Caller, account_id: str) -> Any:
    """The account through the API, every field (staff may name any account), less the
    free quotas' periods (a test that straddles the turn of a month would see them move)."""
    return _without_periods(await staff.gql(full_read(), {"accountId": account_id}))


def _without_periods(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_periods(v)
            for k, v in value.items()
            if k not in ("periodStart", "periodEnd")
        }
    if isinstance(value, list):
        return [_without_periods(v) for v in value]
    return value


@dataclass
class Before:
    victim_rows: dict[str, Any]
    victim_api: Any
    attacker_rows: dict[str, Any] | None
    charges: int


async def before_attack(staff: Caller, victim: Victim, attacker: Attacker, gateway: Any) -> Before:
    exclude = [attacker.who.user_id]
    return Before(
        victim_rows=await rows(victim.account_id, exclude),
        victim_api=await seen_by_staff(staff, victim.account_id),
        attacker_rows=(
            await rows(attacker.account_id, exclude)
            if attacker.account_id != victim.account_id
            else None
        ),
        charges=gateway.charge_count,
    )


async def assert_untouched(
    staff: Caller,
    victim: Victim,
    attacker: Attacker,
    gateway: Any,
    queue: InProcessQueue,
    before: Before,
    *,
    attacker_too: bool,
) -> None:
    await queue.drain()
    exclude = [attacker.who.user_id]
    assert await rows(victim.account_id, exclude) == before.victim_rows
    assert await seen_by_staff(staff, victim.account_id) == before.victim_api
    assert gateway.charge_count == before.charges
    if attacker_too and before.attacker_rows is not None:
        assert await rows(attacker.account_id, exclude) == before.attacker_rows
    report = await reconcile.check_database([victim.account_id, attacker.account_id])
    assert report.ok, [d.line() for d in report.discrepancies]


def markers(victim: Victim) -> list[str]:
    """Strings that exist only in the victim's data."""
    return [
        victim.tag,
        victim.account_id,
        *victim.cards,
        victim.payment_id,
        victim.pending_payment_id,
        victim.spend_id,
        victim.purchase_tx_id,
    ]


def assert_no_trace(text: str, victim: Victim, attacker: Attacker) -> None:
    """Nothing of the victim's in ``text`` (a user of the victim's own account may see its
    own identity, account id included)."""
    text = text.replace(attacker.account_id, "").replace(attacker.who.user_id, "")
    leaked = [m for m in markers(victim) if m in text]
    assert not leaked, (leaked, text[:2000])


def top_level_code(body: dict[str, Any]) -> str | None:
    errors = body.get("errors") or []
    return errors[0].get("extensions", {}).get("code") if errors else None


# ---------------------------------------------------------------- the schema is covered


def test_the_schema_has_what_these_tests_walk() -> None:
    assert SDL.query_type is not None and SDL.mutation_type is not None
    assert set(SDL.mutation_type.fields) == set(MUTATIONS), (
        "each mutation needs an entry in MUTATIONS (its sample input aimed at the victim and "
        f"the outcome each attacker must get); missing: "
        f"{sorted(set(SDL.mutation_type.fields) - set(MUTATIONS))}, "
        f"stale: {sorted(set(MUTATIONS) - set(SDL.mutation_type.fields))}"
    )
    subscriptions = SDL.subscription_type.fields if SDL.subscription_type else {}
    assert set(subscriptions) == set(SUBSCRIPTIONS)
    # The documents generated from the schema are valid against it.
    documents = [full_read()] + [
        operation("mutation", name, field) for name, field in SDL.mutation_type.fields.items()
    ]
    for document in documents:
        assert validate(SDL, parse(document)) == [], document


# ---------------------------------------------------------------- queries


def query_args(victim: Victim) -> dict[str, Any]:
    """Arguments aimed at the victim, wherever a field takes one of these names."""
    return {
        "accountId": victim.account_id,
        "after": victim.cursor,
        "first": 100,
        "filter": {"userIds": [victim.user_id], "search": f"ref-{victim.tag}"},
    }


QUERY_FIELDS = sorted(SDL.query_type.fields) if SDL.query_type else []
VARIANTS = ("plain", "aimed", "nested-only")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("attacker_kind", ATTACKERS)
@pytest.mark.parametrize("field_name", QUERY_FIELDS)
async def test_queries_show_only_the_callers_own_data(
    field_name: str,
    attacker_kind: str,
    variant: str,
    victim: Victim,
    caller: MakeCaller,
    staff: Caller,
    gateway: Any,
    queue: InProcessQueue,
) -> None:
    """``plain``: no arguments; ``aimed``: every argument with a sample aimed at the
    victim (its account id, a cursor of its history, its user and reference in the filter);
    ``nested-only``: the same, but the root field's own arguments left out."""
    assert SDL.query_type is not None
    attacker = await make_attacker(attacker_kind, caller, staff, victim)
    field = SDL.query_type.fields[field_name]
    samples = query_args(victim)
    root = samples if variant == "aimed" else None
    nested = samples if variant != "plain" else None
    document = f"{{ {field_name}{arguments(field, root)}"
    inner = selection(field.type, nested)
    document += f" {{ {inner} }} }}" if inner else " }"
    before = await before_attack(staff, victim, attacker, gateway)

    response = await attacker.who.raw(document)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_no_trace(response.text, victim, attacker)
    if body.get("errors"):
        assert body.get("data") is None, body
        assert top_level_code(body) == FORBIDDEN, body
    else:
        data = body["data"][field_name]
        if field_name == "viewer":
            assert data["accountId"] == attacker.account_id
            assert data["userId"] == attacker.who.user_id
        if field_name == "creditAccount":
            assert attacker_kind == "admin" and variant != "aimed", body
            assert data["id"] == attacker.account_id
    # The known answers, so a regression that turns FORBIDDEN into "nothing" is caught.
    if field_name == "creditAccount":
        expect_forbidden = attacker_kind != "admin" or variant == "aimed"
        assert (top_level_code(body) == FORBIDDEN) is expect_forbidden, body
    await assert_untouched(staff, victim, attacker, gateway, queue, before, attacker_too=True)


# ---------------------------------------------------------------- mutations


@dataclass(frozen=True)
class Sample:
    """A mutation's variables aimed at the victim, and what each attacker must get."""

    variables: Callable[[Victim, Attacker], dict[str, Any]]
    expect: dict[str, str]


def _spend(account_id: str, process: str = "POSTCARD") -> dict[str, Any]:
    return {
        "accountId": account_id,
        "userId": "mallory",
        "processType": process,
        "quantity": 1,
        "idempotencyKey": key(),
    }


def _staff_input(v: Victim, credits: int) -> dict[str, Any]:
    return {
        "accountId": v.account_id,
        "credits": credits,
        "reason": "mallory",
        "idempotencyKey": key(),
    }


ROLE_ONLY = {"user": FORBIDDEN, "admin": FORBIDDEN, "service": FORBIDDEN}
ADMIN_ACTION = {"user": FORBIDDEN, "admin": NOT_FOUND, "service": FORBIDDEN}

MUTATIONS: dict[str, Sample] = {
    "addCard": Sample(
        lambda v, a: {"input": {"paymentMethodId": "pm_card_visa", "makePrimary": True}},
        {"user": FORBIDDEN, "admin": OWN, "service": FORBIDDEN},
    ),
    "updateCard": Sample(
        lambda v, a: {
            "input": {
                "cardId": v.cards[1],
                "cardholderName": "Mallory",
                "expMonth": 1,
                "expYear": 2040,
                "billingAddress": {"line1": "1 Evil Way", "country": "US"},
            }
        },
        ADMIN_ACTION,
    ),
    "setPrimaryCard": Sample(lambda v, a: {"input": {"cardId": v.cards[1]}}, ADMIN_ACTION),
    "removeCard": Sample(lambda v, a: {"input": {"cardId": v.cards[0]}}, ADMIN_ACTION),
    "purchaseCredits": Sample(
        lambda v, a: {"input": {"credits": 100, "idempotencyKey": key(), "cardId": v.cards[0]}},
        ADMIN_ACTION,
    ),
    "confirmPurchase": Sample(
        lambda v, a: {"input": {"paymentId": v.pending_payment_id}}, ADMIN_ACTION
    ),
    "updateAutoRecharge": Sample(
        lambda v, a: {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": 900,
                "rechargeCredits": 500,
                "usePrimaryCard": False,
                "cardId": v.cards[0],
            }
        },
        ADMIN_ACTION,
    ),
    "consumeCredits": Sample(lambda v, a: {"input": _spend(v.account_id)}, ROLE_ONLY),
    # One item of the attacker's own and one of the victim's: all refused, none applied.
    "consumeCreditsBatch": Sample(
        lambda v, a: {"inputs": [_spend(a.account_id), _spend(v.account_id)]}, ROLE_ONLY
    ),
    "reverseUsage": Sample(
        lambda v, a: {
            "input": {"transactionId": v.spend_id, "reason": "mallory", "idempotencyKey": key()}
        },
        {"user": FORBIDDEN, "admin": FORBIDDEN, "service": NOT_FOUND},
    ),
    "recordMeteredUsage": Sample(
        lambda v, a: {"input": _spend(v.account_id, "PREMIUM_AUDIO_TRANSCRIPTION")}, ROLE_ONLY
    ),
    "grantCredits": Sample(lambda v, a: {"input": _staff_input(v, 100)}, ROLE_ONLY),
    "adjustCredits": Sample(lambda v, a: {"input": _staff_input(v, -100)}, ROLE_ONLY),
    "updateLowBalanceAlert": Sample(
        lambda v, a: {"input": {"enabled": False}},
        {"user": FORBIDDEN, "admin": OWN, "service": FORBIDDEN},
    ),
    # A SetupIntent for the caller's own customer: nothing of the victim's is reachable.
    "startCardSetup": Sample(
        lambda v, a: {}, {"user": FORBIDDEN, "admin": OWN, "service": FORBIDDEN}
    ),
}

MUTATION_FIELDS = sorted(SDL.mutation_type.fields) if SDL.mutation_type else []


def _empty_payload(payload: Any) -> None:
    """Nothing but the errors: every other field of the payload is null."""
    items = payload if isinstance(payload, list) else [payload]
    for item in items:
        for name, value in item.items():
            if name != "errors":
                assert value in (None, 0), (name, item)


@pytest.mark.parametrize("attacker_kind", ATTACKERS)
@pytest.mark.parametrize("mutation", MUTATION_FIELDS)
async def test_mutations_do_not_reach_another_accounts_objects(
    mutation: str,
    attacker_kind: str,
    victim: Victim,
    caller: MakeCaller,
    staff: Caller,
    gateway: Any,
    queue: InProcessQueue,
) -> None:
    assert SDL.mutation_type is not None
    sample = MUTATIONS.get(mutation)
    assert sample is not None, f"{mutation} has no entry in MUTATIONS: add its sample input"
    expected = sample.expect[attacker_kind]
    attacker = await make_attacker(attacker_kind, caller, staff, victim)
    document = operation("mutation", mutation, SDL.mutation_type.fields[mutation])
    variables = sample.variables(victim, attacker)
    before = await before_attack(staff, victim, attacker, gateway)

    response = await attacker.who.raw(document, variables)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_no_trace(_without_inputs(response.text, variables), victim, attacker)
    if expected == FORBIDDEN:
        assert body.get("data") is None, body
        assert [top_level_code({"errors": [e]}) for e in body["errors"]] == [FORBIDDEN], body
    elif expected == NOT_FOUND:
        assert "errors" not in body, body
        payload = body["data"][mutation]
        assert [e["code"] for e in payload["errors"]] == [NOT_FOUND], body
        _empty_payload(payload)
    else:
        assert expected == OWN
        assert "errors" not in body, body
        assert body["data"][mutation]["errors"] == [], body
    await assert_untouched(
        staff, victim, attacker, gateway, queue, before, attacker_too=expected != OWN
    )


def _without_inputs(text: str, variables: dict[str, Any]) -> str:
    """The response, less anything the attacker sent itself (an echo is no leak)."""
    for value in json.dumps(variables).split('"'):
        if len(value) > 8:
            text = text.replace(value, "")
    return text


async def test_the_victims_own_calls_still_work(
    victim: Victim, caller: MakeCaller, staff: Caller, queue: InProcessQueue
) -> None:
    """The counterpart: what the attackers were refused, the victim's admin may do (so the
    samples above aim at live objects)."""
    admin = victim.admin
    confirmed = await admin.gql(
        """mutation($id: ID!) { confirmPurchase(input: {paymentId: $id}) {
          payment { status } errors { code } } }""",
        {"id": victim.pending_payment_id},
    )
    assert confirmed["confirmPurchase"] == {"payment": {"status": "SUCCEEDED"}, "errors": []}
    for mutation in ("updateCard", "setPrimaryCard", "purchaseCredits", "removeCard"):
        assert SDL.mutation_type is not None
        document = operation("mutation", mutation, SDL.mutation_type.fields[mutation])
        attacker = Attacker("self", admin, victim.account_id, None, None)
        variables = MUTATIONS[mutation].variables(victim, attacker)
        data = await admin.gql(document, variables)
        assert data[mutation]["errors"] == [], (mutation, data)
    service = caller(victim.account_id, Role.SERVICE)
    reversed_ = await service.gql(
        """mutation($input: ReverseUsageInput!) { reverseUsage(input: $input) {
          errors { code } } }""",
        {"input": {"transactionId": victim.spend_id, "reason": "ok", "idempotencyKey": key()}},
    )
    assert reversed_["reverseUsage"]["errors"] == []
    await queue.drain()
    report = await reconcile.check_database([victim.account_id])
    assert report.ok, [d.line() for d in report.discrepancies]


# ---------------------------------------------------------------- subscriptions

SUBSCRIPTIONS: dict[str, dict[str, str]] = {
    "creditBalanceChanged": {"user": FORBIDDEN, "admin": OWN, "service": FORBIDDEN},
}
SUBSCRIPTION_FIELDS = sorted(SDL.subscription_type.fields) if SDL.subscription_type else []
WAIT = 15.0


async def _message(ws: ClientConnection) -> dict[str, Any]:
    async with asyncio.timeout(WAIT):
        message: dict[str, Any] = json.loads(await ws.recv())
    return message


@pytest.mark.parametrize("attacker_kind", ATTACKERS)
@pytest.mark.parametrize("field_name", SUBSCRIPTION_FIELDS)
async def test_subscriptions_carry_only_the_callers_own_account(
    field_name: str,
    attacker_kind: str,
    app: Starlette,
    victim: Victim,
    caller: MakeCaller,
    staff: Caller,
) -> None:
    assert SDL.subscription_type is not None
    expected = SUBSCRIPTIONS[field_name][attacker_kind]
    attacker = await make_attacker(attacker_kind, caller, staff, victim)
    field = SDL.subscription_type.fields[field_name]
    document = f"subscription {{ {field_name}{arguments(field, query_args(victim))}"
    document += f" {{ {selection(field.type)} }} }}"
    async with serving(app) as server:
        ws = await open_socket(server.ws, {"authorization": f"Bearer {attacker.who.token}"})
        try:
            assert (await _message(ws))["type"] == "connection_ack"
            await ws.send(
                json.dumps({"id": "1", "type": "subscribe", "payload": {"query": document}})
            )
            first = await _message(ws)
            assert_no_trace(json.dumps(first), victim, attacker)
            if expected == FORBIDDEN:
                assert first["type"] == "error", first
                assert first["payload"][0]["extensions"]["code"] == FORBIDDEN, first
                return
            assert first["type"] == "next", first
            # The victim's balance moves, then the attacker's: the next event is the
            # attacker's own (the victim's was never delivered).
            victim_service = caller(victim.account_id, Role.SERVICE)
            assert (await consume(victim_service, "POSTCARD"))["errors"] == []
            own = await consume(caller(attacker.account_id, Role.SERVICE), "PROSPECT_SEARCH")
            assert own["errors"] == [], own
            event = await _message(ws)
            assert_no_trace(json.dumps(event), victim, attacker)
            assert event["type"] == "next", event
            change = event["payload"]["data"][field_name]
            assert change["transaction"]["id"] == own["transaction"]["id"], event
            await ws.send(json.dumps({"id": "1", "type": "complete"}))
        finally:
            await ws.close()
