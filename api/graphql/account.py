"""The queries: who is calling, the price list, and an account (the one rule of who may
see which account: ``billing.accounts.account_to_show``)."""

from __future__ import annotations

import strawberry

from api.context import bad_input, forbidden
from api.graphql.run import caller
from api.graphql.types import CtxInfo
from api.graphql.types.account import CreditAccount, CreditPricing, Viewer
from billing.accounts import (
    ACCOUNT_ID_RULE,
    AccountNotVisible,
    Unseen,
    account_to_show,
    get_account,
)
from billing.enums import Role

UNSEEN_ERRORS = {
    Unseen.INVALID_ID: lambda: bad_input(ACCOUNT_ID_RULE),
    Unseen.UNNAMED: lambda: bad_input("Billing staff must name an accountId."),
    Unseen.NOT_YOURS: lambda: forbidden("You may see only your own account."),
}


@strawberry.field
def viewer(info: CtxInfo) -> Viewer:
    p = info.context.principal
    return Viewer(
        user_id=strawberry.ID(p.user_id),
        account_id=strawberry.ID(p.account_id),
        roles=sorted(p.roles, key=lambda r: list(Role).index(r)),
        email=p.email,
        name=p.name,
    )


@strawberry.field
def credit_pricing(info: CtxInfo) -> CreditPricing:
    return CreditPricing.of(info.context.book)


@strawberry.field
async def credit_account(info: CtxInfo, account_id: strawberry.ID | None = None) -> CreditAccount:
    who = caller(info)
    try:
        target = account_to_show(
            who.account_id,
            str(account_id) if account_id is not None else None,
            is_admin=who.ctx.principal.has(Role.ADMIN),
            sees_any=who.is_staff,
        )
    except AccountNotVisible as exc:
        raise UNSEEN_ERRORS[exc.reason]() from None
    return CreditAccount(model=await get_account(target))
