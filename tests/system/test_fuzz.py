"""Bad input at scale: a schemathesis run against ``POST /graphql`` with a token of each
role, and the hand-written abuse a schema-driven generator does not make: oversized,
nested, aliased and batched requests, wrong content types, invalid UTF-8, huge numbers,
malformed cursors and malformed JWTs (more of them in test_hardening.py, test_auth.py and
test_jwks.py, which this file does not repeat).

Every answer must be a 4xx, or a 200 whose GraphQL errors are the expected, coded kind:
never a 5xx, never a masked ``Internal error.``, and nothing half written (reconciliation
clean afterwards for every account involved).

The schemathesis run generates its cases from ``schema.graphql`` and sends them through
the suite's app in process. It is bounded and deterministic (Hypothesis derandomized):
``FUZZ_EXAMPLES`` cases per role (default 100, a mix of valid and invalid documents), on
the sandbox gateway. A bigger run, or another deterministic sequence:

    FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/system/test_fuzz.py -k schemathesis
    FUZZ_SEED=7 FUZZ_EXAMPLES=500 \\
        .venv/bin/python -m pytest -q tests/system/test_fuzz.py -k schemathesis
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest
import schemathesis
from graphql import (
    ArgumentNode,
    IntValueNode,
    ListValueNode,
    ObjectFieldNode,
    ObjectValueNode,
    StringValueNode,
    Visitor,
    parse,
    print_ast,
    visit,
)
from hypothesis import HealthCheck, Phase, given, note, seed
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode
from starlette.applications import Starlette

from api.auth import issue_token
from billing import reconcile
from billing.enums import Role
from billing.models import Account, LedgerEntry
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, Caller, MakeCaller
from tests.support.gateways import GatewayHarness
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import (
    CONSUME,
    GRANT,
    HISTORY,
    PURCHASE,
    add_card,
    balance,
    buy,
    consume,
    grant,
    key,
)
from workers.jobs import all_functions

# Text that has broken services before: NUL, a lone surrogate, bidi, SQL and LIKE syntax.
NASTY: list[str | int] = [
    "a\x00b",
    "\ud800",
    "\u202e",
    "'; DROP TABLE payment; --",
    "%_\\",
    "😀" * 9,
]
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
FUZZ_SEED = os.environ.get("FUZZ_SEED")
INTERNAL = "Internal error."


def assert_handled(response: httpx.Response) -> dict[str, Any] | None:
    """A 4xx, or a 200 whose errors are not masked exceptions; returns the JSON body."""
    assert response.status_code < 500, (response.status_code, response.text[:2000])
    if response.status_code != 200:
        assert 400 <= response.status_code < 500, response.status_code
        return None
    body = response.json()
    assert isinstance(body, dict), body
    for error in body.get("errors") or []:
        assert error["message"] != INTERNAL, body
    return body


def refused(response: httpx.Response, code: str | None = None) -> None:
    """Refused as a whole: a 4xx, or a 200 with top-level errors and no data."""
    body = assert_handled(response)
    if body is None:
        return
    assert body.get("data") is None, body
    assert body.get("errors"), body
    if code is not None:
        assert body["errors"][0].get("extensions", {}).get("code") == code, body


def not_applied(response: httpx.Response, field: str) -> None:
    """Refused as a whole, or answered with the payload's errors (1e-400 is 0: a valid Int)."""
    body = assert_handled(response)
    if body is None or body.get("data") is None:
        refused(response)
    else:
        assert body["data"][field]["errors"], body


async def post_bytes(who: Caller, content: bytes, **headers: str) -> httpx.Response:
    return await who.http.post(
        "/graphql",
        content=content,
        headers={
            "Authorization": f"Bearer {who.token}",
            "Content-Type": "application/json",
            **headers,
        },
    )


def body_of(query: str, variables: dict[str, Any] | None = None, **more: Any) -> bytes:
    """A JSON body, ASCII-escaped (so lone surrogates survive the trip)."""
    return json.dumps({"query": query, "variables": variables or {}, **more}).encode()


LOW_BALANCE = """mutation($input: LowBalanceAlertInput!) {
  updateLowBalanceAlert(input: $input) { lowBalanceAlert { enabled levelCredits } errors { code } }
}"""
ALERT = "{ creditAccount { lowBalanceAlert { enabled levelCredits } } }"


async def state(admin: Caller) -> dict[str, Any]:
    """What a stray write would change: the balance, the entries, the alert setting."""
    entries = await LedgerEntry.filter(account_id=admin.account_id).count()
    alert = (await admin.gql(ALERT))["creditAccount"]["lowBalanceAlert"]
    return {"balance": await balance(admin), "entries": entries, "alert": alert}


# ================================================================ the schemathesis run

SCHEMA = schemathesis.graphql.from_path(ROOT / "schema.graphql")


@dataclass
class World:
    """The fuzzed account (its own card, payment, entries) and a bystander account whose
    ids the generator may also pick."""

    tokens: dict[Role, str]
    accounts: set[str]
    pool: dict[str, list[str | int]]


class _Substitute(Visitor):
    """Swap some generated argument values for real ones (ids that exist, keys that repeat,
    amounts that succeed), so the run also reaches past "no such card" and "bad amount"."""

    def __init__(self, pool: dict[str, list[str | int]], draw: Callable[..., Any]) -> None:
        super().__init__()
        self.pool = pool
        self.draw = draw

    def _swap(self, node: Any, cls: type[Any]) -> Any:
        options = self.pool.get(node.name.value)
        if not options or isinstance(node.value, ListValueNode | ObjectValueNode):
            return None
        if not self.draw(st.booleans()):
            return None
        value = self.draw(st.sampled_from(options))
        literal = (
            IntValueNode(value=str(value))
            if isinstance(value, int)
            else StringValueNode(value=value)
        )
        return cls(name=node.name, value=literal)

    def enter_argument(self, node: ArgumentNode, *_: Any) -> Any:
        return self._swap(node, ArgumentNode)

    def enter_object_field(self, node: ObjectFieldNode, *_: Any) -> Any:
        return self._swap(node, ObjectFieldNode)


@st.composite
def fuzz_cases(draw: Callable[..., Any], pool: dict[str, list[str | int]]) -> tuple[Any, str]:
    mode = draw(st.sampled_from([GenerationMode.POSITIVE, GenerationMode.NEGATIVE]))
    case = draw(SCHEMA.as_strategy(generation_mode=mode))
    body = str(case.body)
    if mode is GenerationMode.POSITIVE:  # a negative case keeps the mistake it was made with
        body = print_ast(visit(parse(body), _Substitute(pool, draw)))
    return case, body


@pytest.fixture
async def world(caller: MakeCaller, staff: Caller, account_id: str, settings: Settings) -> World:
    admin = caller(account_id, Role.ADMIN, user="fuzz-admin", email="fuzz@example.com")
    service = caller(account_id, Role.SERVICE, user="svc-fuzz")
    await grant(staff, account_id, 5_000)
    first = await add_card(admin)
    second = await add_card(admin, "pm_card_mastercard")
    bought = await buy(admin, 100)
    assert bought["errors"] == [], bought
    spent = await consume(service, "POSTCARD")
    assert spent["errors"] == [], spent
    page = (await admin.gql(HISTORY, {"first": 2}))["creditAccount"]["transactions"]

    other = f"bystander-{uuid.uuid4().hex[:10]}"
    other_admin = caller(other, Role.ADMIN)
    await grant(staff, other, 500)
    other_card = await add_card(other_admin)
    other_spent = await consume(caller(other, Role.SERVICE), "POSTCARD")
    other_page = (await other_admin.gql(HISTORY, {"first": 1}))["creditAccount"]["transactions"]

    tokens = {
        role: issue_token(
            settings, account_id=account_id, user_id=f"fuzz-{role.value}", roles=[role]
        )
        for role in (Role.ADMIN, Role.USER, Role.SERVICE)
    }
    tokens[Role.BILLING_STAFF] = staff.token
    pool: dict[str, list[str | int]] = {
        "accountId": [account_id, other, "", "x" * 65],
        "cardId": [first["id"], second["id"], other_card["id"], "nope"],
        "paymentId": [bought["payment"]["id"], "nope"],
        "transactionId": [
            spent["transaction"]["id"],
            bought["transaction"]["id"],
            other_spent["transaction"]["id"],
        ],
        "after": [page["edges"][-1]["cursor"], other_page["edges"][0]["cursor"], "nope"],
        "userId": ["user-1", "fuzz-ADMIN"],
        "paymentMethodId": [
            "pm_card_visa",
            "pm_card_chargeDeclined",
            "pm_card_chargeCustomerFail",
            "pm_card_authenticationRequired",
        ],
        "idempotencyKey": ["fuzz-key-1", "fuzz-key-2", *NASTY],
        "credits": [1, 25, 100, 5_000, 0, -3],
        "quantity": [1, 2, 10_000, 10_001, 0],
        "thresholdCredits": [50, 10_000],
        "rechargeCredits": [100, 500],
        "intervalDays": [1, 30],
        "levelCredits": [10, 100_000],
        "reason": ["fuzz", *NASTY],
        "reference": NASTY,
        "search": NASTY,
        "cardholderName": NASTY,
        "line1": NASTY,
    }
    return World(tokens=tokens, accounts={account_id, other}, pool=pool)


def _run_settings() -> Any:
    return hypothesis_settings(
        max_examples=FUZZ_EXAMPLES,
        derandomize=FUZZ_SEED is None,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )


@pytest.mark.parametrize(
    "role",
    [Role.ADMIN, Role.USER, Role.SERVICE, Role.BILLING_STAFF],
    ids=lambda r: r.value.lower(),
)
async def test_schemathesis_fuzz(
    role: Role,
    world: World,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    gateway_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if gateway_name != "sandbox":
        pytest.skip("the fuzz runs on the sandbox gateway (localstripe adds time, not cases)")
    loop = asyncio.get_running_loop()
    headers = {"Authorization": f"Bearer {world.tokens[role]}"}
    before = set(cast("list[str]", await Account.all().values_list("id", flat=True)))
    outcomes: Counter[str] = Counter()

    async def send(body: str) -> httpx.Response:
        content = json.dumps({"query": body}).encode()  # ASCII: lone surrogates survive
        response = await http.post(
            "/graphql", content=content, headers={**headers, "Content-Type": "application/json"}
        )
        await queue.drain()  # recharges and notices a call queued run before the next
        return response

    def check(generated: tuple[Any, str]) -> None:
        case, body = generated
        note(f"{case.operation.label} as {role.value}:\n{body}")
        response = asyncio.run_coroutine_threadsafe(send(body), loop).result(timeout=60)
        note(f"-> {response.status_code} {response.text[:1000]}")
        payload = assert_handled(response)
        case.operation.validate_response(response, case=case)  # schemathesis' own checks
        if payload is not None and payload.get("data"):
            outcomes[f"{case.operation.label}: data"] += 1
        else:
            outcomes[f"{case.operation.label}: refused"] += 1

    run = _run_settings()(given(fuzz_cases(world.pool))(check))
    if FUZZ_SEED is not None:
        run = seed(int(FUZZ_SEED))(run)
    with caplog.at_level(logging.ERROR):
        await asyncio.to_thread(run)
    await queue.drain()

    # Nothing went wrong quietly: no failed job, no error logged by our code (Strawberry
    # logs every GraphQL error, expected ones too; the masked ones were checked above).
    assert [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name != "strawberry.execution"
    ] == []
    # The run reached the resolvers, not only the validator, across the schema.
    assert sum(outcomes.values()) >= min(FUZZ_EXAMPLES, 50), outcomes
    labels = {k.split(":")[0] for k in outcomes}
    assert len(labels) >= 10, outcomes
    assert any(k.endswith(": data") for k in outcomes), outcomes
    # No partial writes: every account touched (the generator invents account ids for
    # staff) reconciles, and its ledger chains without going below zero.
    ids = cast("list[str]", await Account.all().values_list("id", flat=True))
    involved = set(ids) - before | world.accounts
    report = await reconcile.check_database(sorted(involved))
    assert report.ok, [d.line() for d in report.discrepancies]
    for account in involved:
        await assert_ledger_consistent(account)


# ================================================================ oversized bodies


@pytest.fixture
def make_app(app: Starlette, settings: Settings, harness: GatewayHarness) -> Callable[..., Any]:
    """An app with other settings, on the session's database (``app`` holds it open)."""
    from api.asgi import create_app

    def make(**update: Any) -> Starlette:
        changed = settings.model_copy(update=update)
        return create_app(changed, gateway=harness.gateway, queue=InProcessQueue(all_functions()))

    return make


@asynccontextmanager
async def client(application: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=application)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


FIVE_MB = 5 * 1024 * 1024


def padded(size: int) -> bytes:
    """A valid request of about ``size`` bytes (the padding is an unused variable)."""
    head = b'{"query": "{ viewer { userId } }", "variables": {"pad": "'
    tail = b'"}}'
    return head + b"a" * max(0, size - len(head) - len(tail)) + tail


def _too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text[:300]
    (error,) = response.json()["errors"]
    assert error["extensions"]["code"] == "PAYLOAD_TOO_LARGE"


async def test_a_5_mb_body_is_413(admin: Caller) -> None:
    _too_large(await post_bytes(admin, padded(FIVE_MB)))
    # Without a token too: the declared length is checked before anything else.
    response = await admin.http.post(
        "/graphql", content=padded(FIVE_MB), headers={"Content-Type": "application/json"}
    )
    _too_large(response)


async def test_a_chunked_body_is_not_read_past_the_limit(admin: Caller) -> None:
    """No Content-Length: the body is read up to the limit, then refused; the rest of it
    is never asked for."""
    chunk = 64 * 1024
    pulled = 0

    async def stream() -> AsyncIterator[bytes]:
        nonlocal pulled
        body = padded(FIVE_MB)
        for start in range(0, len(body), chunk):
            pulled += 1
            yield body[start : start + chunk]

    response = await admin.http.post(
        "/graphql",
        content=stream(),
        headers={"Authorization": f"Bearer {admin.token}", "Content-Type": "application/json"},
    )
    _too_large(response)
    limit = Settings(_env_file=None).max_body_bytes
    assert pulled <= limit // chunk + 2, pulled
    assert pulled * chunk < FIVE_MB // 2


async def test_a_body_under_the_limit_is_served(admin: Caller) -> None:
    response = await post_bytes(admin, padded(900_000))
    assert response.status_code == 200, response.text[:300]
    assert response.json() == {"data": {"viewer": {"userId": admin.user_id}}}


async def test_the_body_limit_is_a_setting(
    make_app: Callable[..., Starlette], settings: Settings
) -> None:
    application = make_app(max_body_bytes=4_096)
    token = issue_token(settings, account_id="acct-limit", user_id="u", roles=[Role.ADMIN])
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with client(application) as c:
        _too_large(await c.post("/graphql", content=padded(5_000), headers=headers))
        served = await c.post("/graphql", content=padded(4_000), headers=headers)
        assert served.json() == {"data": {"viewer": {"userId": "u"}}}


# ================================================================ bodies the JSON parser chokes on


@pytest.mark.parametrize(
    "content",
    [
        b'{"query": "\xff\xfe{ viewer { userId } }"}',
        b"\xff\xfe\x00\x00",
        b'{"query": "{ viewer { userId } }", "variables": {"a": "\xc3\x28"}}',
        b'{"query": "{ viewer { userId } }", "variables": {"a": ' + b"[" * 100_000 + b"]" * 100_000
        + b"}}",
        b'{"query": "{ viewer { userId } }", "variables": {"a": ' + b"9" * 5_000 + b"}}",
        b'{"query": "{ viewer { userId } }", "extensions": ' + b'{"a":' * 50_000 + b"1"
        + b"}" * 50_000 + b"}",
    ],
    ids=["utf8-query", "utf8-bom-garbage", "utf8-variable", "deep-arrays", "5000-digits",
         "deep-objects"],
)  # fmt: skip
async def test_json_the_parser_chokes_on_is_400(admin: Caller, content: bytes) -> None:
    """Invalid UTF-8, nesting past the recursion limit, a number too long to convert: each
    raised something other than JSONDecodeError, which Strawberry answered with a 500."""
    response = await post_bytes(admin, content)
    assert response.status_code == 400, response.text[:300]
    assert response.text == "Unable to parse request body as JSON"


async def test_deep_variables_in_a_get_are_400(admin: Caller) -> None:
    response = await admin.http.get(
        "/graphql",
        params={"query": "{ viewer { userId } }", "variables": "[" * 5_000},
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert response.status_code == 400, response.text[:300]


# ================================================================ nested, aliased, batched


async def test_deeply_nested_values_are_graphql_errors(admin: Caller) -> None:
    literal = "{ creditAccount { transactions(filter: {types: %s}) { edges { cursor } } } }" % (
        "[" * 3_000 + "]" * 3_000
    )
    refused(await admin.raw(literal))
    # Variables nested as deep as the JSON parser allows: coerced, and refused, in order.
    deep: Any = "USAGE"
    for _ in range(900):
        deep = [deep]
    query = "query($f: TransactionFilter) { creditAccount { transactions(filter: $f) { edges { cursor } } } }"  # noqa: E501
    refused(await post_bytes(admin, body_of(query, {"f": {"types": deep}})))
    refused(await post_bytes(admin, body_of(query, {"f": {"search": deep}})))


async def test_fragment_cycles_and_spreads_are_validation_errors(admin: Caller) -> None:
    cycle = "query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }"
    refused(await admin.raw(cycle))
    # The same fragment spread many times is merged, not multiplied.
    spread = "fragment F on Query { viewer { userId } } query { " + "...F " * 300 + "}"
    body = assert_handled(await admin.raw(spread))
    assert body == {"data": {"viewer": {"userId": admin.user_id}}}


async def test_aliased_spends_with_one_key_spend_once(
    service: Caller, staff: Caller, admin: Caller
) -> None:
    await grant(staff, service.account_id, 1_000)
    spend = (
        '{alias}: consumeCredits(input: {{accountId: "{account}", userId: "u1", '
        'processType: POSTCARD, quantity: 1, idempotencyKey: "one-key"}}) '
        "{{ transaction {{ id }} balance errors {{ code }} }}"
    )
    spends = " ".join(spend.format(alias=f"s{i}", account=service.account_id) for i in range(15))
    document = f"mutation {{ {spends} }}"
    data = await service.gql(document)
    ids = {payload["transaction"]["id"] for payload in data.values()}
    assert len(ids) == 1 and all(p["errors"] == [] for p in data.values()), data
    assert await balance(admin) == 1_000 - 12
    await assert_ledger_consistent(service.account_id)


async def test_too_many_aliased_mutations_write_nothing(staff: Caller, admin: Caller) -> None:
    await grant(staff, admin.account_id, 10)
    before = await state(admin)
    grants = " ".join(
        f'g{i}: grantCredits(input: {{accountId: "{admin.account_id}", credits: 5, '
        f'reason: "alias", idempotencyKey: "alias-{i}"}}) {{ balance }}'
        for i in range(16)
    )
    refused(await staff.raw(f"mutation {{ {grants} }}"))
    assert await state(admin) == before


async def test_batched_and_multi_operation_requests(staff: Caller, admin: Caller) -> None:
    await grant(staff, admin.account_id, 10)
    before = await state(admin)
    mutation = body_of(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 5,
                "reason": "batched",
                "idempotencyKey": key(),
            }
        },
    )
    # A JSON list of mutations is no batch here: refused, nothing run.
    response = await post_bytes(staff, b"[" + mutation + b"," + mutation + b"]")
    assert response.status_code == 400
    assert await state(admin) == before
    # One document, two operations: only the one named runs.
    grant_op = (
        f'mutation Give {{ grantCredits(input: {{accountId: "{admin.account_id}", credits: 5, '
        f'reason: "named", idempotencyKey: "{key()}"}}) {{ balance }} }}'
    )
    document = f"query Look {{ viewer {{ userId }} }} {grant_op}"
    looked = await post_bytes(staff, body_of(document, operationName="Look"))
    assert assert_handled(looked) == {"data": {"viewer": {"userId": staff.user_id}}}
    assert await state(admin) == before
    unknown = await post_bytes(staff, body_of(document, operationName="Nope"))
    assert unknown.status_code == 400
    for name in (42, ["Give"], {"a": 1}):
        refused(await post_bytes(staff, body_of(document, operationName=name)))
    assert await state(admin) == before
    gave = await post_bytes(staff, body_of(document, operationName="Give"))
    assert assert_handled(gave) == {"data": {"grantCredits": {"balance": 15}}}


async def test_a_subscription_over_http_is_refused(admin: Caller) -> None:
    """It used to run the subscription's field as a query's and answer a masked
    ``Internal error.`` (the resolver returned nothing for a non-null field)."""
    query = "subscription { creditBalanceChanged { balance } }"
    refused(await admin.raw(query), "BAD_REQUEST")
    streamed = await post_bytes(
        admin, body_of(query), Accept="multipart/mixed;subscriptionSpec=1.0,application/json"
    )
    refused(streamed, "BAD_REQUEST")


# ================================================================ content types


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/graphql",
        "application/xml",
        None,
    ],
    ids=["text", "text-charset", "form", "multipart", "graphql", "xml", "missing"],
)
async def test_wrong_content_types_run_nothing(admin: Caller, content_type: str | None) -> None:
    before = await state(admin)
    mutation = body_of(LOW_BALANCE, {"input": {"enabled": True, "levelCredits": 50}})
    bodies: dict[str | None, bytes] = {
        "application/x-www-form-urlencoded": b"query=" + mutation,
        "multipart/form-data; boundary=x": (
            b'--x\r\nContent-Disposition: form-data; name="operations"\r\n\r\n'
            + mutation
            + b"\r\n--x--\r\n"
        ),
        "application/graphql": LOW_BALANCE.encode(),
    }
    headers = {"Authorization": f"Bearer {admin.token}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await admin.http.post(
        "/graphql", content=bodies.get(content_type, mutation), headers=headers
    )
    assert 400 <= response.status_code < 500, response.text[:300]
    assert await state(admin) == before


# ================================================================ huge numbers and unstorable text


NUMBERS = [
    b"9007199254740992",  # 2**53
    b"9223372036854775808",  # 2**63
    b"-9223372036854775809",
    b"2147483648",  # 2**31
    b"1e309",  # parsed as infinity
    b"-1e309",
    b"1e-400",
    b"NaN",
    b"Infinity",
    b"1.5",
    b'"100"',
    b"true",
]


@pytest.mark.parametrize("number", NUMBERS, ids=[n.decode() for n in NUMBERS])
async def test_huge_and_odd_numbers_in_variables(
    admin: Caller, staff: Caller, number: bytes
) -> None:
    await add_card(admin)
    await grant(staff, admin.account_id, 10)
    before = await state(admin)
    purchase = body_of(PURCHASE, {"input": {"credits": 0, "idempotencyKey": key()}})
    level = body_of(LOW_BALANCE, {"input": {"enabled": True, "levelCredits": 0}})
    for template, name, field in (
        (purchase, b"credits", "purchaseCredits"),
        (level, b"levelCredits", "updateLowBalanceAlert"),
    ):
        content = template.replace(b'"%s": 0' % name, b'"%s": %s' % (name, number))
        not_applied(await post_bytes(admin, content), field)
    assert await state(admin) == before


@pytest.mark.parametrize(
    "literal", ["9223372036854775808", "1e309", "99999999999999999999999999999999", "-0x10"]
)
async def test_huge_integer_literals(service: Caller, staff: Caller, literal: str) -> None:
    await grant(staff, service.account_id, 10)
    document = (
        f'mutation {{ consumeCredits(input: {{accountId: "{service.account_id}", userId: "u", '
        f'processType: POSTCARD, quantity: {literal}, idempotencyKey: "{key()}"}}) {{ balance }} }}'
    )
    refused(await service.raw(document))
    entries = await LedgerEntry.filter(account_id=service.account_id).count()
    assert entries == 1


BAD_TEXT = {"lone-surrogate": "\ud800", "low-surrogate": "x\udfffy", "nul": "a\x00b"}


@pytest.mark.parametrize("text", BAD_TEXT.values(), ids=BAD_TEXT.keys())
async def test_unstorable_text_is_bad_user_input(
    admin: Caller, service: Caller, staff: Caller, text: str
) -> None:
    """A lone surrogate made the database driver raise (both backends) and a NUL made
    PostgreSQL raise: a masked ``Internal error.``. Now refused before anything runs."""
    await grant(staff, admin.account_id, 100)
    before = await state(admin)
    spend = {
        "accountId": admin.account_id,
        "userId": "u1",
        "processType": "POSTCARD",
        "quantity": 1,
        "idempotencyKey": key(),
    }
    staff_input = {"accountId": admin.account_id, "credits": 5, "reason": "r"}
    calls: list[tuple[Caller, str, dict[str, Any]]] = [
        (service, CONSUME, {"input": {**spend, "reference": text}}),
        (service, CONSUME, {"input": {**spend, "idempotencyKey": text}}),
        (staff, GRANT, {"input": {**staff_input, "reason": text, "idempotencyKey": key()}}),
        (staff, GRANT, {"input": {**staff_input, "idempotencyKey": text}}),
        (admin, HISTORY, {"filter": {"search": text}}),
        (admin, HISTORY, {"filter": {"userIds": [text]}}),
        (admin, HISTORY, {"after": text}),
    ]
    for who, query, variables in calls:
        refused(await post_bytes(who, body_of(query, variables)), "BAD_USER_INPUT")
    # ... and the same text written as a GraphQL string literal (\u escapes in the document)
    escaped = json.dumps(text)  # "\ud800", "a\u0000b"
    literal = (
        f'mutation {{ grantCredits(input: {{accountId: "{admin.account_id}", credits: 5, '
        f'reason: {escaped}, idempotencyKey: "{key()}"}}) {{ balance }} }}'
    )
    refused(await post_bytes(staff, body_of(literal)))
    assert await state(admin) == before


async def test_other_control_characters_are_still_text(service: Caller, staff: Caller) -> None:
    await grant(staff, service.account_id, 100)
    spent = await consume(service, reference="tab\there \u202e bell\x07")
    assert spent["errors"] == [], spent
    assert spent["transaction"]["reference"] == "tab\there \u202e bell\x07"


# ================================================================ time and cursors


@pytest.mark.parametrize(
    "moment",
    ["9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00+01:00"],
    ids=["past-9999", "before-year-1"],
)
async def test_times_out_of_range_in_utc_are_bad_input(
    admin: Caller, staff: Caller, moment: str
) -> None:
    """Valid RFC 3339, but outside what UTC can hold: the conversion raised OverflowError
    (a masked ``Internal error.`` in GraphQL, a 500 from the CSV report)."""
    await grant(staff, admin.account_id, 10)
    for name in ("from", "to"):
        refused(await admin.raw(HISTORY, {"filter": {name: moment}}), "BAD_USER_INPUT")
        response = await admin.http.get(
            "/reports/transactions.csv",
            params={name: moment},
            headers={"Authorization": f"Bearer {admin.token}"},
        )
        assert response.status_code == 400, response.text[:300]


@pytest.mark.parametrize("name", ["search", "userIds", "accountId"])
async def test_nul_in_a_csv_report_filter_is_400(admin: Caller, staff: Caller, name: str) -> None:
    """PostgreSQL refuses text with NUL: the report had sent its 200 and header row, then
    broke off mid-stream (SQLite filtered on it). Now it is refused up front, on both."""
    await grant(staff, admin.account_id, 10)
    response = await admin.http.get(
        "/reports/transactions.csv",
        params={name: "a\x00b"},
        headers={"Authorization": f"Bearer {admin.token}"},
    )
    assert response.status_code == 400, response.text[:300]
    assert "NUL" in response.json()["error"]


def cursor_of(raw: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        cursor_of(["2026-01-01T00:00:00+00:00", 5]),
        cursor_of(["2026-01-01T00:00:00+00:00", [1]]),
        cursor_of(["2026-01-01T00:00:00+00:00", {"a": 1}]),
        cursor_of([1767225600, str(uuid.uuid4())]),
        cursor_of([None, None]),
        cursor_of(["9999-12-31T23:59:59-01:00", str(uuid.uuid4())]),
        cursor_of(["0001-01-01T00:00:00+01:00", str(uuid.uuid4())]),
        cursor_of([[[[[[[[[[[]]]]]]]]]], "x"]),
        "é" * 20,
        "=" * 8,
    ],
    ids=[
        "uuid-number",
        "uuid-list",
        "uuid-object",
        "time-number",
        "nulls",
        "past-9999",
        "before-year-1",
        "nested",
        "non-ascii",
        "padding",
    ],
)
async def test_more_malformed_cursors(admin: Caller, staff: Caller, cursor: str) -> None:
    """Beyond test_history's: parts of the wrong JSON type, and times that overflow."""
    await grant(staff, admin.account_id, 10)
    refused(await admin.raw(HISTORY, {"first": 5, "after": cursor}), "BAD_USER_INPUT")


# ================================================================ malformed JWTs


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hand_signed(header: Any, claims: Any, secret: bytes = TEST_SECRET.encode()) -> str:
    import hashlib
    import hmac

    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    return head + "." + _b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())


def _claims(**over: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "sub": "mallory",
        "account_id": "acct-jwt",
        "roles": ["BILLING_STAFF"],
        "exp": int(time.time()) + 600,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


HS = {"alg": "HS256", "typ": "JWT"}
UNSIGNED = _b64(json.dumps(_claims()).encode())

BAD_JWTS: dict[str, Callable[[], str]] = {
    # alg none, in the spellings libraries have been fooled by (test_auth.py has "none")
    "alg-None": lambda: _b64(b'{"alg":"None"}') + "." + UNSIGNED + ".",
    "alg-NONE-signed": lambda: _hand_signed({"alg": "NONE"}, _claims()),
    "alg-empty": lambda: _hand_signed({"alg": ""}, _claims()),
    "alg-missing": lambda: _hand_signed({"typ": "JWT"}, _claims()),
    "alg-list": lambda: _hand_signed({"alg": ["HS256"]}, _claims()),
    "alg-hs512": lambda: _hand_signed({"alg": "HS512", "typ": "JWT"}, _claims()),
    "wrong-key": lambda: _hand_signed(HS, _claims(), b"an-entirely-different-secret-0123456789"),
    "expired-long-ago": lambda: _hand_signed(HS, _claims(exp=1)),
    "exp-not-a-number": lambda: _hand_signed(HS, _claims(exp="soon")),
    "exp-null": lambda: _hand_signed(HS, {**_claims(), "exp": None}),
    "nbf-future": lambda: _hand_signed(HS, _claims(nbf=int(time.time()) + 3600)),
    "iat-string": lambda: _hand_signed(HS, _claims(iat="yesterday")),
    "sub-number": lambda: _hand_signed(HS, _claims(sub=42)),
    "account-too-long": lambda: _hand_signed(HS, _claims(account_id="a" * 65)),
    "account-nul": lambda: _hand_signed(HS, _claims(account_id="a\x00b")),
    "roles-mixed": lambda: _hand_signed(HS, _claims(roles=["ADMIN", 7])),
    "claims-list": lambda: _hand_signed(HS, [_claims()]),
    "claims-string": lambda: _hand_signed(HS, "staff"),
    "header-list": lambda: _hand_signed([HS], _claims()),
    "header-not-json": lambda: _b64(b"{alg: HS256") + "." + UNSIGNED + ".c2ln",
    "kid-10kb": lambda: _hand_signed({**HS, "kid": "k" * 10_000}, _claims()),
    "crit-unknown": lambda: _hand_signed({**HS, "crit": ["exp-ext"], "exp-ext": 1}, _claims()),
    "garbage-segments": lambda: "a.b.c",
    "dots-only": lambda: "...",
    "two-segments": lambda: "eyJhbGciOiJIUzI1NiJ9." + UNSIGNED,
    "four-segments": lambda: _hand_signed(HS, _claims()) + ".extra",
    "not-base64": lambda: "@@@.###.$$$",
    "padding": lambda: "====.====.====",
    "100kb-unsigned": lambda: _b64(b'{"alg":"HS256"}') + "." + "A" * 100_000 + ".sig",
    "100kb-signed": lambda: _hand_signed(HS, _claims(name="n" * 100_000)),
}


@pytest.mark.parametrize("make_token", BAD_JWTS.values(), ids=BAD_JWTS.keys())
async def test_malformed_jwts_are_401(
    http: httpx.AsyncClient, admin: Caller, make_token: Callable[[], str]
) -> None:
    token = make_token()
    response = await http.post(
        "/graphql",
        content=body_of("{ viewer { userId } }"),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert response.status_code == 401, response.text[:300]
    assert response.json()["errors"][0]["extensions"]["code"] == "UNAUTHENTICATED"


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer    ", "Bearer a b c", "Token abc", "bearer", "Bearer " + "x" * 100_000],
    ids=["no-token", "spaces", "spaced-token", "other-scheme", "lowercase-alone", "100kb"],
)
async def test_malformed_authorization_headers_are_401(
    http: httpx.AsyncClient, header: str
) -> None:
    response = await http.post(
        "/graphql",
        content=body_of("{ viewer { userId } }"),
        headers={"Authorization": header, "Content-Type": "application/json"},
    )
    assert response.status_code == 401, response.text[:300]


async def test_latin1_bytes_in_the_authorization_header_are_401(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/graphql",
        content=body_of("{ viewer { userId } }"),
        headers=[
            (b"Authorization", b"Bearer \xe9\xff.\xfe.\x80"),
            (b"Content-Type", b"application/json"),
        ],
    )
    assert response.status_code == 401, response.text[:300]


async def test_wrong_audience_with_hs256(make_app: Callable[..., Starlette]) -> None:
    """An audience configured: a token for another service, or naming none, is refused."""
    application = make_app(credits_jwt_audience="purchase-credits")
    good = _hand_signed(HS, _claims(aud="purchase-credits"))
    async with client(application) as c:
        for token, status in (
            (good, 200),
            (_hand_signed(HS, _claims(aud="another-service")), 401),
            (_hand_signed(HS, _claims(aud=["another-service", "third"])), 401),
            (_hand_signed(HS, _claims(aud=42)), 401),
            (_hand_signed(HS, _claims()), 401),
        ):
            response = await c.post(
                "/graphql",
                content=body_of("{ viewer { userId } }"),
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            assert response.status_code == status, (token, response.text[:300])
