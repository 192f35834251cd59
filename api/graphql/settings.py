"""The account's settings: auto-recharge and the low-balance e-mail (in the edge's one
transaction)."""

from __future__ import annotations

import uuid
from typing import TypeVar

import strawberry
from graphql import ObjectValueNode, VariableNode

from api.graphql.run import Tx, run
from api.graphql.types import AutoRechargeTrigger, CtxInfo, UserError
from api.graphql.types.account import AutoRecharge, LowBalanceAlert
from api.graphql.types.cards import card_id as card_ids
from billing.models import AutoRechargeSetting
from billing.notifications import lowbalance
from billing.recharge import autorecharge

T = TypeVar("T")


@strawberry.input(
    description="The fields to change (see updateAutoRecharge): omitted ones keep their value."
)
class AutoRechargeInput:
    enabled: bool
    trigger: AutoRechargeTrigger | None = None
    interval_days: int | None = None
    threshold_credits: int | None = None
    recharge_credits: int | None = None
    # The contract declares these two defaults, so GraphQL fills them in when they are
    # omitted; ``given_fields`` reads the request to tell omitted from given.
    use_primary_card: bool | None = True
    card_id: strawberry.ID | None = strawberry.UNSET
    notify: bool | None = False
    notify_emails: list[str] | None = None
    monthly_limit_credits: int | None = None


def given_fields(info: CtxInfo, argument: str) -> set[str]:
    """The names of the fields the request itself gave in input object ``argument``
    (GraphQL fills in declared defaults, so the parsed input can't tell)."""
    raw = info._raw_info
    variables = info.context.raw_variables or {}
    for arg in raw.field_nodes[0].arguments or ():
        if arg.name.value != argument:
            continue
        value = arg.value
        if isinstance(value, VariableNode):
            given = variables.get(value.name.value)
            return set(given) if isinstance(given, dict) else set()
        if isinstance(value, ObjectValueNode):
            return {
                f.name.value
                for f in value.fields
                if not isinstance(f.value, VariableNode) or f.value.name.value in variables
            }
    return set()


def _merged_auto_recharge(
    stored: AutoRechargeSetting, input: AutoRechargeInput, given: set[str]
) -> autorecharge.AutoRechargeInput:
    """The whole setting to save: the stored one with the given fields put over it."""

    def pick(name: str, new: T, old: T) -> T:
        return new if name in given else old

    card_given = "cardId" in given and input.card_id not in (None, strawberry.UNSET)
    if "usePrimaryCard" in given:
        use_primary = input.use_primary_card is not False
    elif card_given:
        use_primary = False  # a card named on its own pins it
    else:
        use_primary = stored.use_primary_card
    card_id: uuid.UUID | None
    if "cardId" in given:
        card_id = card_ids(input.card_id) if card_given else None
        has_card = card_given
    else:
        card_id = uuid.UUID(str(stored.card_id)) if stored.card_id is not None else None
        has_card = card_id is not None and not use_primary
    return autorecharge.AutoRechargeInput(
        enabled=input.enabled,
        trigger=pick("trigger", input.trigger, stored.trigger),
        interval_days=pick("intervalDays", input.interval_days, stored.interval_days),
        threshold_credits=pick(
            "thresholdCredits", input.threshold_credits, _int(stored.threshold_credits)
        ),
        recharge_credits=pick(
            "rechargeCredits", input.recharge_credits, _int(stored.recharge_credits)
        ),
        use_primary_card=use_primary,
        card_id=card_id if has_card else None,
        card_id_given=has_card,
        notify=bool(pick("notify", input.notify, stored.notify)),
        notify_emails=pick("notifyEmails", input.notify_emails, list(stored.notify_emails or [])),
        monthly_limit_credits=pick(
            "monthlyLimitCredits", input.monthly_limit_credits, _int(stored.monthly_limit_credits)
        ),
    )


def _int(value: int | None) -> int | None:
    return int(value) if value is not None else None


@strawberry.type
class AutoRechargePayload:
    auto_recharge: AutoRecharge | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.input(description="The low-balance e-mail: replaces the whole setting.")
class LowBalanceAlertInput:
    enabled: bool
    level_credits: int | None = strawberry.field(
        default=None,
        description="Required to turn it on: 1 to the largest purchase (ignored when off).",
    )


@strawberry.type
class LowBalanceAlertPayload:
    low_balance_alert: LowBalanceAlert | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.mutation(
    description="Change the fields given: an omitted field keeps its stored value, an "
    "explicit null clears it, so {enabled: false} turns auto-recharge off and keeps its "
    "configuration for the next {enabled: true}. A cardId given without usePrimaryCard "
    "pins that card."
)
async def update_auto_recharge(info: CtxInfo, input: AutoRechargeInput) -> AutoRechargePayload:
    given = given_fields(info, "input")

    async def save(account_id: str) -> AutoRechargeSetting:
        stored = await autorecharge.get_setting(account_id)
        data = _merged_auto_recharge(stored, input, given)
        return await autorecharge.update_auto_recharge(info.context.book, account_id, data)

    result = await run(
        info,
        lambda who: save(who.account_id),
        tx=Tx.EDGE,
    )
    if isinstance(result, list):
        return AutoRechargePayload(errors=result)
    return AutoRechargePayload(auto_recharge=AutoRecharge(model=result))


@strawberry.mutation(
    description="Set or turn off the admins' low-balance e-mail (sent once each time "
    "the balance falls below the level)."
)
async def update_low_balance_alert(
    info: CtxInfo, input: LowBalanceAlertInput
) -> LowBalanceAlertPayload:
    result = await run(
        info,
        lambda who: lowbalance.update_alert(
            who.ctx.book,
            who.account_id,
            enabled=input.enabled,
            level_credits=input.level_credits,
        ),
        tx=Tx.EDGE,
    )
    if isinstance(result, list):
        return LowBalanceAlertPayload(errors=result)
    return LowBalanceAlertPayload(low_balance_alert=LowBalanceAlert.of(result))
