"""``GET /reports/transactions.csv``: the transaction history as CSV, streamed.

The filters are the ``transactions`` filters as query parameters of the same names
(``from``, ``to``, ``types``, ``processTypes``, ``userIds``, ``search``); a list may be
repeated (``types=USAGE&types=GRANT``) or comma-separated (``types=USAGE,GRANT``). The rows
are the GraphQL history's, in its order (newest first), read in keyset-paginated chunks
and written as they come, so a report of any size is held one chunk at a time.

Who may read it is who may read ``creditAccount`` (one rule:
``billing.accounts.account_to_show``): an admin (their own account), or billing staff
naming ``accountId``. The bearer token is the GraphQL one.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import unicodedata
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import TypeVar

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from api import ids, permissions
from api.auth import AuthError, Principal, authenticate, bearer_token
from api.permissions import Reach
from billing import clock, history
from billing.accounts import ACCOUNT_ID_RULE, AccountNotVisible, Unseen, account_to_show
from billing.enums import ProcessType, Role, TransactionType
from billing.errors import Validator
from billing.models import LedgerEntry

log = logging.getLogger(__name__)

CHUNK_ROWS = 500
COLUMNS = (
    "id",
    "createdAt",
    "type",
    "processType",
    "credits",
    "balanceAfter",
    "userId",
    "description",
    "reference",
    "paymentId",
)
LIST_PARAMS = ("types", "processTypes", "userIds")
SCALAR_PARAMS = ("from", "to", "search", "accountId")
MAX_ACCOUNT_ID = 64
# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection),
# also after leading blanks or invisible characters (a byte-order mark, a zero-width
# space), and in their full-width forms (U+FF1D, U+FF0B, U+FF0D, U+FF20: NFKC folds them).
FORMULA_START = ("=", "+", "-", "@")
# A cell that starts with a control character or a line break is quoted too (OWASP).
CONTROL_START = ("\t", "\r", "\n")


E = TypeVar("E", bound=StrEnum)
_UNESCAPED_PLUS = re.compile(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}(?::?\d{2})?)$")


class BadRequest(Exception):
    """A parameter the report can't use (HTTP 400, with the message)."""


def _error(status: int, message: str, **headers: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def safe_text(value: str | None) -> str:
    """User-written text as a cell a spreadsheet shows rather than runs."""
    if not value:
        return ""
    return "'" + value if _runs_as_formula(value) else value


def _runs_as_formula(value: str) -> bool:
    if value.startswith(CONTROL_START):
        return True
    visible = value.lstrip()
    while visible and unicodedata.category(visible[0]) == "Cf":  # BOM, zero-width
        visible = visible[1:].lstrip()
    return unicodedata.normalize("NFKC", visible[:1]).startswith(FORMULA_START)


def _utc_text(value: datetime) -> str:
    """RFC 3339 in UTC, exactly as the GraphQL API writes it."""
    return value.astimezone(UTC).isoformat()


def row_of(entry: LedgerEntry) -> list[str]:
    """One entry as its report row (the GraphQL history's fields, in COLUMNS order)."""
    return [
        ids.encode("CreditTransaction", entry.id),
        _utc_text(entry.created_at),
        entry.type.value,
        entry.process_type.value,
        str(entry.credits),
        str(entry.balance_after),
        safe_text(entry.user_id),
        safe_text(entry.description),
        safe_text(entry.reference),
        ids.encode("Payment", entry.payment_id) if entry.payment_id else "",
    ]


def _csv(rows: Iterable[Iterable[str]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n").writerows(rows)
    return buffer.getvalue().encode("utf-8")


# ---------------------------------------------------------------- parameters


def _text(params: QueryParams, name: str) -> list[str]:
    values = params.getlist(name)
    if any("\x00" in value for value in values):  # PostgreSQL can't compare text with NUL
        raise BadRequest(f"{name} must not contain NUL characters")
    return values


def _one(params: QueryParams, name: str) -> str | None:
    values = _text(params, name)
    if len(values) > 1:
        raise BadRequest(f"{name} may be given once")
    return values[0] if values else None


def _items(params: QueryParams, name: str) -> list[str]:
    """A list parameter, repeated and/or comma-separated; empty items are ignored."""
    return [item.strip() for raw in _text(params, name) for item in raw.split(",") if item.strip()]


def _enums(params: QueryParams, name: str, enum: type[E]) -> list[E]:
    out = []
    for item in _items(params, name):
        try:
            out.append(enum(item))
        except ValueError:
            allowed = ", ".join(e.value for e in enum)
            raise BadRequest(f"{name}: {item!r} is not one of {allowed}") from None
    return out


def _time(params: QueryParams, name: str) -> datetime | None:
    raw = _one(params, name)
    if raw is None or raw == "":
        return None
    try:
        # "+02:00" sent unescaped in a URL arrives as " 02:00"
        value = datetime.fromisoformat(_UNESCAPED_PLUS.sub(r"\1+\2", raw.strip()))
    except ValueError:
        raise BadRequest(
            f"{name} must be an RFC 3339 date-time such as 2026-03-01T00:00:00Z, not {raw!r}"
        ) from None
    try:
        return clock.utc(value)
    except ValueError:  # near year 1 or 9999, the offset takes it out of range
        raise BadRequest(f"{name} is out of range in UTC: {raw!r}") from None


def parse_filter(params: QueryParams) -> history.HistoryFilter:
    """The ``transactions`` filter from query parameters; raises ``BadRequest``."""
    unknown = sorted(set(params.keys()) - set(LIST_PARAMS) - set(SCALAR_PARAMS))
    if unknown:
        accepted = ", ".join((*SCALAR_PARAMS, *LIST_PARAMS))
        raise BadRequest(f"unknown parameter {unknown[0]!r} (accepted: {accepted})")
    flt = history.HistoryFilter(
        from_=_time(params, "from"),
        to=_time(params, "to"),
        types=_enums(params, "types", TransactionType),
        process_types=_enums(params, "processTypes", ProcessType),
        user_ids=_items(params, "userIds"),
        search=_one(params, "search") or None,
    )
    v = Validator()
    history.validate(v, flt, history.MAX_PAGE)
    if v.errors:
        raise BadRequest("; ".join(e.message for e in v.errors))
    return flt


REPORT = "GET /reports/transactions.csv"  # its row in api.permissions.TABLE


def target_account(principal: Principal, requested: str | None) -> str:
    """Whose history the caller may export (``PermissionError``: 403)."""
    scope = permissions.reach(principal, REPORT)
    if scope is None:
        raise PermissionError("Only account admins may export the account's transactions.")
    try:
        return account_to_show(
            principal.account_id,
            requested,
            is_admin=principal.has(Role.ADMIN),
            sees_any=scope is Reach.ANY,
        )
    except AccountNotVisible as exc:
        if exc.reason is Unseen.INVALID_ID:
            raise BadRequest(ACCOUNT_ID_RULE) from None
        if exc.reason is Unseen.UNNAMED:
            raise BadRequest("billing staff must name an accountId") from None
        raise PermissionError("You may export only your own account's transactions.") from None


# ---------------------------------------------------------------- the endpoint


async def rows(account_id: str, flt: history.HistoryFilter) -> AsyncIterator[bytes]:
    """The header, then one piece of CSV per chunk of entries."""
    yield _csv([COLUMNS])
    count = 0
    try:
        async for chunk in history.chunks(account_id, flt, CHUNK_ROWS):
            count += len(chunk)
            yield _csv(row_of(entry) for entry in chunk)
    except Exception:
        # The status line is gone already: the client sees a cut-off body (no final
        # chunk), which is the best an HTTP/1.1 stream can say.
        log.exception("transaction report for %s failed after %d rows", account_id, count)
        raise
    log.info("transaction report for %s: %d rows", account_id, count)


def _filename(account_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", account_id)[:MAX_ACCOUNT_ID] or "account"
    return f"transactions-{safe}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.csv"


async def transactions_csv(request: Request) -> Response:
    settings = request.app.state.services.settings
    try:
        principal = await authenticate(bearer_token(request.headers.get("authorization")), settings)
    except AuthError as exc:
        return _error(
            401, f"Unauthenticated: {exc}", **{"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )
    try:
        account_id = target_account(principal, _one(request.query_params, "accountId"))
        flt = parse_filter(request.query_params)
    except PermissionError as exc:
        return _error(403, str(exc))
    except BadRequest as exc:
        return _error(400, str(exc))
    return StreamingResponse(
        rows(account_id, flt),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{_filename(account_id)}"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
