"""Accounts are provisioned lazily: the first token or call that names one creates it."""

from __future__ import annotations

from collections import OrderedDict
from enum import Enum

from tortoise.backends.base.client import TransactionalDBClient

from billing import sql
from billing.errors import Validator
from billing.models import Account, Member

MAX_ACCOUNT_ID = 64
MAX_USER_ID = 128

_known_accounts: OrderedDict[str, None] = OrderedDict()
_KNOWN_LIMIT = 50_000


def _id_ok(value: str, limit: int) -> bool:
    return 0 < len(value) <= limit and value.isprintable() and value.strip() == value


ACCOUNT_ID_RULE = f"accountId must be 1 to {MAX_ACCOUNT_ID} printable characters"


def valid_account_id(account_id: str) -> bool:
    """The one rule for an account id, on every path (tokens, queries, reports, spends)."""
    return _id_ok(account_id, MAX_ACCOUNT_ID)


class Unseen(Enum):
    """Why a caller may not see the account it asked for (each edge words it its own way)."""

    INVALID_ID = "invalid id"  # not an account id at all (bad input)
    UNNAMED = "unnamed"  # billing staff have no account of their own: they must name one
    NOT_YOURS = "not yours"  # another account, and the caller may see only its own


class AccountNotVisible(Exception):
    def __init__(self, reason: Unseen) -> None:
        super().__init__(reason.value)
        self.reason = reason


def account_to_show(
    own_account_id: str, requested: str | None, *, is_admin: bool, sees_any: bool
) -> str:
    """The one rule of who may see an account (``creditAccount``, the CSV report): an
    admin sees its own account (named or not), a caller that may see any account (billing
    staff) sees the one it names. ``AccountNotVisible`` says why not."""
    if requested is None or (requested == own_account_id and is_admin):
        if not is_admin:
            raise AccountNotVisible(Unseen.UNNAMED)
        return own_account_id
    if not sees_any:
        raise AccountNotVisible(Unseen.NOT_YOURS)
    if not valid_account_id(requested):
        raise AccountNotVisible(Unseen.INVALID_ID)
    return requested


def validate_account_id(v: Validator, account_id: str, *field: str) -> None:
    if not valid_account_id(account_id):
        v.add(ACCOUNT_ID_RULE, *field)


def validate_user_id(v: Validator, user_id: str, *field: str) -> None:
    if not _id_ok(user_id, MAX_USER_ID):
        v.add(f"userId must be 1 to {MAX_USER_ID} printable characters", *field)


async def ensure_account(account_id: str) -> None:
    """Create the account at a zero balance unless it exists (cached per process)."""
    if account_id in _known_accounts:
        _known_accounts.move_to_end(account_id)
        return
    conn = sql.connection()
    await sql.execute(
        "INSERT INTO credit_account (id, balance, timezone, recharge_seq, created_at) "
        "VALUES (?, 0, 'UTC', 0, ?) "
        "ON CONFLICT (id) DO NOTHING",
        account_id,
        sql.now(),
    )
    if not isinstance(conn, TransactionalDBClient):
        # Inside a transaction the row may still roll back: only cache committed ones.
        _remember(account_id)


def _remember(account_id: str) -> None:
    _known_accounts[account_id] = None
    if len(_known_accounts) > _KNOWN_LIMIT:
        _known_accounts.popitem(last=False)


def forget_cached_accounts() -> None:
    """For tests that drop and recreate databases."""
    _known_accounts.clear()


async def get_account(account_id: str) -> Account:
    """The account, for reading: one never seen is shown at a zero balance, and a read
    creates nothing (the first token, spend or grant that names it does)."""
    found = await Account.get_or_none(id=account_id)
    return found if found is not None else Account(id=account_id)


async def record_member(
    account_id: str, user_id: str, email: str | None, name: str | None, *, is_admin: bool
) -> None:
    """Remember who a user is (for history and notices); one upsert per change."""
    await ensure_account(account_id)
    member, created = await Member.get_or_create(
        account_id=account_id,
        user_id=user_id,
        defaults={"email": email, "name": name, "is_admin": is_admin},
    )
    if not created and (member.email, member.name, member.is_admin) != (email, name, is_admin):
        member.email, member.name, member.is_admin = email, name, is_admin
        await member.save(update_fields=["email", "name", "is_admin", "updated_at"])


async def admin_emails(account_id: str) -> list[str]:
    rows = await Member.filter(account_id=account_id, is_admin=True).exclude(email=None)
    return [m.email for m in rows if m.email]
