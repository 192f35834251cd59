"""The one mutation runner: every mutation calls one billing function through ``run``.

``run`` checks the caller's roles (``api.permissions.TABLE``, the same rule the
``Permissions`` extension applied before the operation started) and the account it acts
for, runs the billing call in the transaction the call's kind needs, turns the domain's
expected failures (``BillingError``) into the payload's ``errors`` (one mapper:
``types.user_errors``), and once the work has committed does what follows a commit
(``after_commit``: live balance events, the notices' delivery, recharge jobs).

The transaction rule:

- a flow that calls the payment gateway (``Tx.OWN``) owns its transactions and never
  holds one across a gateway call (``billing.payments.cards``, ``purchases``): the
  gateway call comes before, between or after its short transactions;
- everything else (``Tx.EDGE``) runs in the edge's one transaction, opened here, so the
  billing function is all or nothing without knowing where it is called from.

A spend (``consumeCredits``) is ``Tx.OWN`` too: it owns its transaction to write in one
statement when it can.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from tortoise.transactions import in_transaction

from api.context import Context
from api.graphql.types import CtxInfo, UserError, user_errors
from api.permissions import Reach
from billing import changes
from billing.errors import BillingError
from runtime import effects

T = TypeVar("T")


class Tx(Enum):
    EDGE = "edge"  # run inside the one transaction the runner opens
    OWN = "own"  # the billing flow owns its transactions (it calls the gateway)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who runs the mutation, and how far its reach goes for this operation."""

    ctx: Context
    reach: Reach

    @property
    def account_id(self) -> str:
        return self.ctx.principal.account_id

    @property
    def user_id(self) -> str:
        return self.ctx.principal.user_id

    @property
    def is_staff(self) -> bool:
        """May act on any account (billing staff) for this operation."""
        return self.reach is Reach.ANY

    @property
    def scope_account_id(self) -> str | None:
        """Whose cards (or entries) the caller may touch: its own account's, or (staff)
        any (None)."""
        return None if self.is_staff else self.account_id


def operation(info: CtxInfo) -> str:
    """The operation's coordinate in ``api.permissions.TABLE``."""
    return f"{info.path.typename}.{info.field_name}"


def caller(info: CtxInfo, *, acting_for: Iterable[str] = ()) -> Caller:
    """The caller, once its roles allow the operation and (with ``OWN`` reach) every
    account in ``acting_for`` is its own (GraphQL errors otherwise)."""
    ctx = info.context
    reach = ctx.permitted(operation(info))
    for account_id in acting_for:
        ctx.own_account_or_forbidden(account_id, reach)
    return Caller(ctx, reach)


async def run(
    info: CtxInfo,
    work: Callable[[Caller], Awaitable[T]],
    *,
    tx: Tx,
    acting_for: Iterable[str] = (),
) -> T | list[UserError]:
    """Run ``work`` for the caller (see the module's docstring); an expected failure comes
    back as the payload's errors, with nothing written and nothing done after."""
    who = caller(info, acting_for=acting_for)
    with changes.collect() as changed:
        try:
            if tx is Tx.EDGE:
                async with in_transaction():
                    result = await work(who)
            else:
                result = await work(who)
        except BillingError as exc:
            return user_errors(exc.errors)
    await after_commit(who.ctx, changed)
    return result


async def after_commit(ctx: Context, changed: changes.Changes) -> None:
    """Once the work has committed, what it recorded in ``billing.changes`` is acted on by
    ``runtime.effects.after_commit``: live balance events, the notices' delivery, one
    recharge job per threshold crossing."""
    await effects.after_commit(changed, queue=ctx.queue, live=ctx.live)
