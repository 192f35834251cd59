"""The transaction history (creditAccount.transactions): order, keyset pagination, filters,
input errors and tenant isolation."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import pytest

from billing.enums import ProcessType, Role, TransactionType
from billing.models import Account, LedgerEntry
from tests.conftest import Caller, MakeCaller
from tests.support.ops import ADJUST, HISTORY, REVERSE, consume, grant, key

Node = dict[str, Any]


# ---------------------------------------------------------------- helpers


async def history(
    who: Caller,
    *,
    filter: dict[str, Any] | None = None,
    first: int | None = None,
    after: str | None = None,
    account_id: str | None = None,
) -> dict[str, Any]:
    variables: dict[str, Any] = {"filter": filter, "after": after, "accountId": account_id}
    if first is not None:
        variables["first"] = first
    data = await who.gql(HISTORY, variables)
    return cast("dict[str, Any]", data["creditAccount"]["transactions"])


async def everything(who: Caller, filter: dict[str, Any] | None = None) -> list[Node]:
    """All entries on one page (the tests keep accounts below 100 entries)."""
    conn = await history(who, filter=filter, first=100)
    assert conn["pageInfo"]["hasNextPage"] is False
    return [e["node"] for e in conn["edges"]]


async def walk(who: Caller, first: int, filter: dict[str, Any] | None = None) -> list[Node]:
    """Follow endCursor until hasNextPage is false, checking every page's pageInfo."""
    nodes: list[Node] = []
    after: str | None = None
    while True:
        conn = await history(who, filter=filter, first=first, after=after)
        nodes.extend(_check_page(conn, first, after))
        if not conn["pageInfo"]["hasNextPage"]:
            return nodes
        after = conn["pageInfo"]["endCursor"]


def _check_page(conn: dict[str, Any], first: int, after: str | None) -> list[Node]:
    edges, info = conn["edges"], conn["pageInfo"]
    assert len(edges) <= first
    if info["hasNextPage"]:
        assert len(edges) == first
    assert info["hasPreviousPage"] is (after is not None)
    if edges:
        assert info["startCursor"] == edges[0]["cursor"]
        assert info["endCursor"] == edges[-1]["cursor"]
    else:
        assert info["startCursor"] is None
        assert info["endCursor"] is None
    return [e["node"] for e in edges]


def ids_of(nodes: list[Node]) -> list[str]:
    return [n["id"] for n in nodes]


def at(node: Node) -> datetime:
    return datetime.fromisoformat(node["createdAt"])


def assert_newest_first(nodes: list[Node]) -> None:
    times = [at(n) for n in nodes]
    assert times == sorted(times, reverse=True)


async def top_level_error(who: Caller, variables: dict[str, Any]) -> dict[str, Any]:
    """Run HISTORY expecting exactly one top-level error and no data."""
    response = await who.raw(HISTORY, variables)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body.get("data") is None, body
    assert len(body["errors"]) == 1, body
    return cast("dict[str, Any]", body["errors"][0])


async def make_entries(staff: Caller, service: Caller, spends: int) -> None:
    """One grant, then ``spends`` prospect searches of 2 credits each: 1 + spends entries."""
    await grant(staff, service.account_id, 2 * spends + 10)
    for _ in range(spends):
        payload = await consume(service, "PROSPECT_SEARCH")
        assert payload["errors"] == [], payload


def cursor_of(raw: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(raw).encode()).decode().rstrip("=")


# ---------------------------------------------------------------- order and sign


async def test_newest_first_with_signed_credits(
    admin: Caller, staff: Caller, service: Caller
) -> None:
    await grant(staff, admin.account_id, 100)
    letter = await consume(service, "HANDWRITTEN_LETTER")
    postcard = await consume(service, "POSTCARD", quantity=2)
    assert letter["errors"] == [] and postcard["errors"] == []

    nodes = await everything(admin)
    assert [(n["type"], n["processType"], n["credits"], n["balanceAfter"]) for n in nodes] == [
        ("USAGE", "POSTCARD", -24, 41),
        ("USAGE", "HANDWRITTEN_LETTER", -35, 65),
        ("GRANT", "ADMINISTRATIVE", 100, 100),
    ]
    assert ids_of(nodes[:2]) == [
        postcard["transaction"]["id"],
        letter["transaction"]["id"],
    ]
    assert_newest_first(nodes)
    assert nodes[0]["user"]["userId"] == "user-1"


async def test_empty_history(admin: Caller) -> None:
    conn = await history(admin, first=10)
    assert conn["edges"] == []
    assert conn["pageInfo"] == {
        "hasNextPage": False,
        "hasPreviousPage": False,
        "startCursor": None,
        "endCursor": None,
    }


# ---------------------------------------------------------------- pagination


@pytest.mark.parametrize("first", [1, 4, 6, 23, 24, 100])
async def test_walk_returns_every_entry_once(
    admin: Caller, staff: Caller, service: Caller, first: int
) -> None:
    await make_entries(staff, service, 23)  # 24 entries: 6 and 24 divide it, 4 leaves no rest
    full = await everything(admin)
    assert len(full) == 24
    assert_newest_first(full)

    walked = await walk(admin, first)
    assert ids_of(walked) == ids_of(full)  # same order, no duplicate, no gap
    assert len(set(ids_of(walked))) == 24


async def test_default_page_size_is_25(admin: Caller, staff: Caller, service: Caller) -> None:
    await make_entries(staff, service, 26)  # 27 entries
    full = await everything(admin)
    page = await history(admin)
    assert ids_of(_check_page(page, 25, None)) == ids_of(full[:25])
    assert page["pageInfo"]["hasNextPage"] is True
    rest = await history(admin, after=page["pageInfo"]["endCursor"])
    assert ids_of(_check_page(rest, 25, page["pageInfo"]["endCursor"])) == ids_of(full[25:])
    assert rest["pageInfo"]["hasNextPage"] is False


async def test_page_info_across_pages(admin: Caller, staff: Caller, service: Caller) -> None:
    await make_entries(staff, service, 9)  # 10 entries
    full = await everything(admin)

    one = await history(admin, first=4)
    assert ids_of([e["node"] for e in one["edges"]]) == ids_of(full[:4])
    assert one["pageInfo"]["hasNextPage"] is True
    assert one["pageInfo"]["hasPreviousPage"] is False

    two = await history(admin, first=4, after=one["pageInfo"]["endCursor"])
    assert ids_of([e["node"] for e in two["edges"]]) == ids_of(full[4:8])
    assert two["pageInfo"]["hasNextPage"] is True
    assert two["pageInfo"]["hasPreviousPage"] is True

    three = await history(admin, first=4, after=two["pageInfo"]["endCursor"])
    assert ids_of([e["node"] for e in three["edges"]]) == ids_of(full[8:])
    assert three["pageInfo"]["hasNextPage"] is False
    assert three["pageInfo"]["endCursor"] == three["edges"][-1]["cursor"]

    # any edge's cursor resumes right after that edge
    middle = one["edges"][1]["cursor"]
    resumed = await history(admin, first=3, after=middle)
    assert ids_of([e["node"] for e in resumed["edges"]]) == ids_of(full[2:5])

    # the last entry's cursor leads to an empty last page
    end = await history(admin, first=4, after=three["pageInfo"]["endCursor"])
    assert end["edges"] == []
    assert end["pageInfo"]["hasNextPage"] is False


@pytest.mark.parametrize("first", [1, 2, 4])
async def test_walk_through_entries_sharing_one_timestamp(
    admin: Caller, staff: Caller, first: int
) -> None:
    """Keyset over (created_at, id): ties on created_at are neither skipped nor repeated.

    The service's clock rarely ties, so the tied rows are written straight to the table."""
    granted = await grant(staff, admin.account_id, 10)
    tied_at = datetime.fromisoformat(granted["transaction"]["createdAt"]) + timedelta(
        milliseconds=1
    )
    balance = 10
    for i in range(7):
        balance += 1
        await LedgerEntry.create(
            id=uuid.uuid4(),
            account_id=admin.account_id,
            created_at=tied_at,
            type=TransactionType.GRANT,
            process_type=ProcessType.ADMINISTRATIVE,
            credits=1,
            balance_after=balance,
            user_id="staff-1",
            description=f"tied {i}",
        )
    await Account.filter(id=admin.account_id).update(balance=balance)

    full = await everything(admin)
    assert len(full) == 8
    assert full[-1]["id"] == granted["transaction"]["id"]
    assert ids_of(await walk(admin, first)) == ids_of(full)
    assert ids_of(await walk(admin, first, {"search": "tied"})) == ids_of(full[:7])


async def test_walk_is_stable_while_entries_are_added(
    admin: Caller, staff: Caller, service: Caller
) -> None:
    await make_entries(staff, service, 13)  # 14 entries
    await grant(staff, admin.account_id, 100)  # 15 entries, room for the spends below
    snapshot = await everything(admin)
    assert len(snapshot) == 15

    async def add_two() -> list[str]:
        first, second = await asyncio.gather(
            consume(service, "PROSPECT_SEARCH"), consume(service, "POSTCARD")
        )
        assert first["errors"] == [] and second["errors"] == []
        return [first["transaction"]["id"], second["transaction"]["id"]]

    added: list[str] = []
    walked: list[Node] = []
    conn = await history(admin, first=4)
    walked.extend(_check_page(conn, 4, None))
    while conn["pageInfo"]["hasNextPage"]:
        after = conn["pageInfo"]["endCursor"]
        added.extend(await add_two())  # between two page fetches
        conn, more = await asyncio.gather(history(admin, first=4, after=after), add_two())
        added.extend(more)  # and while a page is being fetched
        walked.extend(_check_page(conn, 4, after))

    assert ids_of(walked) == ids_of(snapshot)
    assert not set(added) & set(ids_of(walked))

    now = await everything(admin)
    assert len(now) == len(snapshot) + len(added)
    assert set(ids_of(now[: len(added)])) == set(added)  # the new ones come first
    assert ids_of(now[len(added) :]) == ids_of(snapshot)
    assert_newest_first(now)


# ---------------------------------------------------------------- filters


async def _mixed_history(admin: Caller, staff: Caller, service: Caller) -> list[Node]:
    """GRANT, ADJUSTMENT, USAGE by three users with references, and a REVERSAL."""
    await grant(staff, admin.account_id, 1000)
    spends = [
        ("HANDWRITTEN_LETTER", "user-a", "Campaign Spring-Alpha"),
        ("POSTCARD", "user-b", "order 50% off"),
        ("POSTCARD", "user-a", "order 500 off"),
        ("PROSPECT_SEARCH", "user-c", "batch_7"),
        ("PROSPECT_SEARCH", "user-b", "batchX7"),
        ("ADVANCED_EMAIL_TEST", "user-c", None),
    ]
    done = []
    for process, user_id, reference in spends:
        payload = await consume(service, process, userId=user_id, reference=reference)
        assert payload["errors"] == [], payload
        done.append(payload["transaction"])
    adjusted = await staff.gql(
        ADJUST,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": -5,
                "reason": "Goodwill correction",
                "idempotencyKey": key(),
            }
        },
    )
    assert adjusted["adjustCredits"]["errors"] == []
    reversed_ = await service.gql(
        REVERSE,
        {
            "input": {
                "transactionId": done[1]["id"],
                "reason": "printer jam",
                "idempotencyKey": key(),
            }
        },
    )
    assert reversed_["reverseUsage"]["errors"] == []
    nodes = await everything(admin)
    assert len(nodes) == 9
    return nodes


def _user(node: Node) -> str | None:
    return node["user"]["userId"] if node["user"] else None


def _ref(node: Node) -> str:
    return node["reference"] or ""


# The mixed history, oldest first: GRANT (staff-1), HANDWRITTEN_LETTER user-a "Campaign
# Spring-Alpha", POSTCARD user-b "order 50% off", POSTCARD user-a "order 500 off",
# PROSPECT_SEARCH user-c "batch_7", PROSPECT_SEARCH user-b "batchX7", ADVANCED_EMAIL_TEST
# user-c, ADJUSTMENT (staff-1) "Goodwill correction", REVERSAL (svc-letters) of the 50% postcard.
FILTER_CASES = [
    pytest.param({"types": ["USAGE"]}, lambda n: n["type"] == "USAGE", 6, id="types"),
    pytest.param(
        {"types": ["GRANT", "ADJUSTMENT"]},
        lambda n: n["type"] in ("GRANT", "ADJUSTMENT"),
        2,
        id="types-two",
    ),
    pytest.param({"types": ["REVERSAL"]}, lambda n: n["type"] == "REVERSAL", 1, id="reversal"),
    pytest.param({"types": ["PURCHASE"]}, lambda n: False, 0, id="types-none"),
    pytest.param(
        {"processTypes": ["POSTCARD"]},
        lambda n: n["processType"] == "POSTCARD",
        3,
        id="process-types",
    ),
    pytest.param(
        {"processTypes": ["PROSPECT_SEARCH", "ADMINISTRATIVE"]},
        lambda n: n["processType"] in ("PROSPECT_SEARCH", "ADMINISTRATIVE"),
        4,
        id="process-types-two",
    ),
    pytest.param({"userIds": ["user-a"]}, lambda n: _user(n) == "user-a", 2, id="user"),
    pytest.param(
        {"userIds": ["user-b", "user-c"]},
        lambda n: _user(n) in ("user-b", "user-c"),
        4,
        id="users-two",
    ),
    pytest.param({"userIds": ["nobody"]}, lambda n: False, 0, id="user-none"),
    pytest.param(
        {"search": "postcard"},
        lambda n: n["processType"] == "POSTCARD",
        3,
        id="search-description",
    ),
    pytest.param(
        {"search": "TEST FUNDS"}, lambda n: n["type"] == "GRANT", 1, id="search-description-case"
    ),
    pytest.param(
        {"search": "SPRING-alpha"},
        lambda n: _ref(n) == "Campaign Spring-Alpha",
        1,
        id="search-reference",
    ),
    pytest.param(
        {"search": "goodwill"}, lambda n: n["type"] == "ADJUSTMENT", 1, id="search-reason"
    ),
    pytest.param({"search": "50%"}, lambda n: _ref(n) == "order 50% off", 2, id="search-percent"),
    pytest.param({"search": "h_7"}, lambda n: _ref(n) == "batch_7", 1, id="search-underscore"),
    pytest.param({"search": "%"}, lambda n: "%" in _ref(n), 2, id="search-only-percent"),
    pytest.param({"search": "_"}, lambda n: "_" in _ref(n), 1, id="search-only-underscore"),
    pytest.param({"search": "no such text"}, lambda n: False, 0, id="search-none"),
    pytest.param(
        {"types": ["USAGE"], "userIds": ["user-a"]},
        lambda n: n["type"] == "USAGE" and _user(n) == "user-a",
        2,
        id="types-and-user",
    ),
    pytest.param(
        {"types": ["USAGE"], "processTypes": ["POSTCARD"], "search": "order"},
        lambda n: n["type"] == "USAGE" and n["processType"] == "POSTCARD",
        2,
        id="types-process-search",
    ),
    pytest.param(
        {"processTypes": ["POSTCARD"], "userIds": ["svc-letters"], "types": ["REVERSAL"]},
        lambda n: n["type"] == "REVERSAL",
        1,
        id="three-filters",
    ),
    pytest.param(
        {"processTypes": ["POSTCARD"], "userIds": ["user-b"], "types": ["REVERSAL"]},
        lambda n: False,  # the reversal was made by the service, not by user-b
        0,
        id="three-filters-none",
    ),
    pytest.param(
        {"types": ["GRANT"], "search": "postcard"}, lambda n: False, 0, id="type-and-search"
    ),
    pytest.param(
        {"types": [], "processTypes": [], "userIds": []},
        lambda n: True,
        9,
        id="empty-lists",
    ),
    pytest.param({"search": ""}, lambda n: True, 9, id="empty-search"),
]


@pytest.mark.parametrize(("flt", "keep", "count"), FILTER_CASES)
async def test_filters(
    admin: Caller,
    staff: Caller,
    service: Caller,
    flt: dict[str, Any],
    keep: Callable[[Node], bool],
    count: int,
) -> None:
    nodes = await _mixed_history(admin, staff, service)
    expected = [n["id"] for n in nodes if keep(n)]
    assert len(expected) == count  # the case means what it says
    got = await everything(admin, flt)
    assert ids_of(got) == expected
    # and a filtered walk, page by page, gives the same
    assert ids_of(await walk(admin, 2, flt)) == expected


async def test_time_window(admin: Caller, staff: Caller, service: Caller) -> None:
    await make_entries(staff, service, 7)  # 8 entries
    nodes = await everything(admin)
    oldest_first = list(reversed(nodes))

    def between(lo: datetime | None, hi: datetime | None) -> list[str]:
        return [
            n["id"] for n in nodes if (lo is None or at(n) >= lo) and (hi is None or at(n) < hi)
        ]

    lo_node, hi_node = oldest_first[2], oldest_first[6]
    lo, hi = lo_node["createdAt"], hi_node["createdAt"]

    got = ids_of(await everything(admin, {"from": lo}))
    assert got == between(at(lo_node), None)
    assert lo_node["id"] in got  # from is inclusive

    got = ids_of(await everything(admin, {"to": hi}))
    assert got == between(None, at(hi_node))
    assert hi_node["id"] not in got  # to is exclusive

    got = ids_of(await everything(admin, {"from": lo, "to": hi}))
    assert got == between(at(lo_node), at(hi_node))
    assert len(got) >= 1

    # the same instants written with another offset mean the same thing
    shifted_lo = at(lo_node).astimezone(_plus(2)).isoformat()
    shifted_hi = at(hi_node).astimezone(_plus(-5)).isoformat()
    got = ids_of(await everything(admin, {"from": shifted_lo, "to": shifted_hi}))
    assert got == between(at(lo_node), at(hi_node))

    # a window before everything, and one after everything
    first_at, last_at = at(oldest_first[0]), at(oldest_first[-1])
    before = {"to": first_at.isoformat()}
    after = {"from": (last_at + timedelta(seconds=1)).isoformat()}
    assert await everything(admin, before) == []
    assert await everything(admin, after) == []

    # paged through the window
    assert ids_of(await walk(admin, 1, {"from": lo, "to": hi})) == between(at(lo_node), at(hi_node))


def _plus(hours: int) -> timezone:
    return timezone(timedelta(hours=hours))


async def test_time_window_combined_with_other_filters(
    admin: Caller, staff: Caller, service: Caller
) -> None:
    nodes = await _mixed_history(admin, staff, service)
    oldest_first = list(reversed(nodes))
    lo_node, hi_node = oldest_first[2], oldest_first[7]
    flt = {
        "from": lo_node["createdAt"],
        "to": hi_node["createdAt"],
        "types": ["USAGE"],
        "userIds": ["user-b", "user-c"],
    }
    expected = [
        n["id"]
        for n in nodes
        if at(lo_node) <= at(n) < at(hi_node)
        and n["type"] == "USAGE"
        and n["user"]["userId"] in ("user-b", "user-c")
    ]
    assert len(expected) >= 2
    assert ids_of(await everything(admin, flt)) == expected


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("first", [0, 101, -1])
async def test_bad_first(admin: Caller, first: int) -> None:
    error = await top_level_error(admin, {"first": first})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_first_bounds_are_inclusive(admin: Caller, staff: Caller) -> None:
    await grant(staff, admin.account_id, 10)
    assert len((await history(admin, first=1))["edges"]) == 1
    assert len((await history(admin, first=100))["edges"]) == 1


@pytest.mark.parametrize(
    "cursor",
    [
        "abc",
        base64.urlsafe_b64encode(b"\xff\xfe\x00garbage\x81").decode(),
        cursor_of(["2026-01-01T00:00:00", str(uuid.uuid4())]),  # naive timestamp
        cursor_of(["2026-01-01T00:00:00+00:00", "not-a-uuid"]),
        cursor_of(["yesterday", str(uuid.uuid4())]),
        cursor_of(["2026-01-01T00:00:00+00:00"]),
        cursor_of({"created": "2026-01-01T00:00:00+00:00"}),
        cursor_of(42),
        "",
        "x" * 300,
    ],
    ids=[
        "abc",
        "b64-garbage",
        "naive-timestamp",
        "bad-uuid",
        "bad-time",
        "one-part",
        "object",
        "number",
        "empty",
        "long",
    ],
)
async def test_malformed_cursor(admin: Caller, staff: Caller, cursor: str) -> None:
    await grant(staff, admin.account_id, 10)
    error = await top_level_error(admin, {"first": 5, "after": cursor})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


@pytest.mark.parametrize(
    "flt",
    [
        {"from": "2026-03-01T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
        {"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
        {"from": "2026-03-01T02:00:00+02:00", "to": "2026-03-01T00:00:00Z"},  # same instant
        {"search": "s" * 201},
    ],
    ids=["from-equals-to", "from-after-to", "same-instant-other-offset", "long-search"],
)
async def test_bad_filter(admin: Caller, flt: dict[str, Any]) -> None:
    error = await top_level_error(admin, {"filter": flt, "first": 5})
    assert error["extensions"]["code"] == "BAD_USER_INPUT"


async def test_search_of_200_characters_is_fine(admin: Caller, staff: Caller) -> None:
    await grant(staff, admin.account_id, 10)
    assert await everything(admin, {"search": "s" * 200}) == []


async def test_cursor_from_another_filter_is_harmless(
    admin: Caller, staff: Caller, service: Caller
) -> None:
    nodes = await _mixed_history(admin, staff, service)
    usage = await history(admin, filter={"types": ["USAGE"]}, first=2)
    cursor = usage["pageInfo"]["endCursor"]
    position = at(usage["edges"][-1]["node"])

    for other in ({"types": ["GRANT"]}, {"userIds": ["user-c"]}, None, {"search": "batch"}):
        conn = await history(admin, filter=other, first=100, after=cursor)
        got = [e["node"] for e in conn["edges"]]
        ids = set(ids_of(nodes))
        for node in got:
            assert node["id"] in ids
            assert at(node) <= position
        assert len(set(ids_of(got))) == len(got)
        assert conn["pageInfo"]["hasNextPage"] is False


# ---------------------------------------------------------------- tenant isolation


async def test_other_accounts_entries_never_appear(
    admin: Caller, staff: Caller, service: Caller, caller: MakeCaller
) -> None:
    other_id = f"other-{uuid.uuid4().hex[:12]}"
    other_admin = caller(other_id, Role.ADMIN)
    other_service = caller(other_id, Role.SERVICE)
    await make_entries(staff, service, 5)
    await make_entries(staff, other_service, 5)
    for reference in ("shared-ref", "shared-ref"):
        spent = await consume(service, "PROSPECT_SEARCH", reference=reference)
        assert spent["errors"] == []
        spent = await consume(other_service, "PROSPECT_SEARCH", reference=reference)
        assert spent["errors"] == []

    mine = await everything(admin)
    theirs = await everything(other_admin)
    assert len(mine) == len(theirs) == 8
    assert not set(ids_of(mine)) & set(ids_of(theirs))

    assert ids_of(await walk(admin, 3)) == ids_of(mine)
    assert ids_of(await everything(admin, {"search": "shared-ref"})) == ids_of(mine[:2])
    assert ids_of(await everything(admin, {"userIds": ["user-1"]})) == ids_of(mine[:-1])

    # a cursor from the other account does not reveal its entries
    foreign_cursor = (await history(other_admin, first=1))["pageInfo"]["endCursor"]
    conn = await history(admin, first=100, after=foreign_cursor)
    assert set(ids_of([e["node"] for e in conn["edges"]])) <= set(ids_of(mine))

    # billing staff naming an account sees that account only
    seen = await history(staff, first=100, account_id=other_id)
    assert ids_of([e["node"] for e in seen["edges"]]) == ids_of(theirs)
