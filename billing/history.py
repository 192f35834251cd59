"""The transaction history: newest first, keyset-paginated over ``(created_at, id)``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime

from tortoise.expressions import Q

from billing.enums import ProcessType, TransactionType
from billing.errors import Validator
from billing.models import LedgerEntry

MAX_PAGE = 100
MAX_SEARCH = 200
MAX_FILTER_ITEMS = 100


@dataclass(frozen=True, slots=True)
class HistoryFilter:
    from_: datetime | None = None
    to: datetime | None = None
    types: list[TransactionType] = field(default_factory=list)
    process_types: list[ProcessType] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    search: str | None = None


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ends: the last entry's sort key."""

    created_at: datetime
    id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[LedgerEntry]
    has_next: bool


def validate(v: Validator, flt: HistoryFilter, first: int) -> None:
    if not 1 <= first <= MAX_PAGE:
        v.add(f"first must be 1 to {MAX_PAGE}", "first")
    if flt.from_ and flt.to and flt.from_ >= flt.to:
        v.add("from must be before to", "filter", "from")
    if flt.search is not None and len(flt.search) > MAX_SEARCH:
        v.add(f"search must be at most {MAX_SEARCH} characters", "filter", "search")
    for name, items in (
        ("types", flt.types),
        ("processTypes", flt.process_types),
        ("userIds", flt.user_ids),
    ):
        if len(items) > MAX_FILTER_ITEMS:
            v.add(f"{name} may list at most {MAX_FILTER_ITEMS} values", "filter", name)


def filtered(account_id: str, flt: HistoryFilter) -> object:
    query = LedgerEntry.filter(account_id=account_id)
    if flt.from_ is not None:
        query = query.filter(created_at__gte=flt.from_)
    if flt.to is not None:
        query = query.filter(created_at__lt=flt.to)
    if flt.types:
        query = query.filter(type__in=list(dict.fromkeys(flt.types)))
    if flt.process_types:
        query = query.filter(process_type__in=list(dict.fromkeys(flt.process_types)))
    if flt.user_ids:
        query = query.filter(user_id__in=list(dict.fromkeys(flt.user_ids)))
    if flt.search:
        query = query.filter(
            Q(description__icontains=flt.search) | Q(reference__icontains=flt.search)
        )
    return query


async def page(account_id: str, flt: HistoryFilter, first: int, after: Position | None) -> Page:
    """One page of history (inputs already validated)."""
    query = filtered(account_id, flt)
    if after is not None:
        # (created_at, id) < (c, i), written so that the planner gets an index range on
        # created_at (the OR alone is not sargable and scanned the account's entries).
        query = query.filter(created_at__lte=after.created_at).filter(  # type: ignore[attr-defined]
            Q(created_at__lt=after.created_at) | Q(id__lt=after.id)
        )
    rows: list[LedgerEntry] = await query.order_by(  # type: ignore[attr-defined]
        "-created_at", "-id"
    ).limit(first + 1)
    return Page(rows[:first], len(rows) > first)


async def chunks(
    account_id: str, flt: HistoryFilter, size: int = 500
) -> AsyncIterator[list[LedgerEntry]]:
    """The whole filtered history, newest first, ``size`` entries a query (keyset, so each
    query costs the same however deep it goes, and only one chunk is held at a time)."""
    after: Position | None = None
    while True:
        result = await page(account_id, flt, size, after)
        if result.entries:
            yield result.entries
        if not result.has_next:
            return
        last = result.entries[-1]
        after = Position(last.created_at, last.id)
