"""The GraphQL schema: queries, mutations and the live balance subscription. Resolvers
parse, call one billing function, and map the result; expected failures come back in
``errors``. Work that can move a balance runs through ``changing``: once it has committed,
live subscribers hear of it and the notices it wrote are sent."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import strawberry
from graphql import GraphQLError, ObjectValueNode, VariableNode
from graphql.validation import ASTValidationRule, NoSchemaIntrospectionCustomRule
from strawberry.extensions import SchemaExtension
from tortoise.transactions import in_transaction

from api import ids, metrics
from api.bounded import DEFAULT_OPERATION_TIMEOUT_SECONDS, BoundedSchema, Documents, all_rules
from api.context import bad_input, forbidden
from api.cost import MAX_ALIASES, MAX_FIELDS, MAX_QUERY_DEPTH, CostLimit
from api.errors import CodedMaskErrors
from api.guards import Guards
from api.metrics import MetricsExtension
from api.permissions import Reach
from api.types import (
    AutoRecharge,
    AutoRechargeTrigger,
    BillingAddressInput,
    Card,
    CreditAccount,
    CreditBalanceChange,
    CreditPricing,
    CreditTransaction,
    CtxInfo,
    LowBalanceAlert,
    MeteredUsage,
    Payment,
    ProcessType,
    Role,
    UserError,
    Viewer,
    card_or_none,
    transaction_or_none,
)
from billing import autorecharge, batch, cards, changes, ledger, lowbalance, purchases, usage
from billing.accounts import ACCOUNT_ID_RULE, get_account, valid_account_id
from billing.enums import Role as R
from billing.errors import BillingError
from billing.models import AutoRechargeSetting
from billing.settings import Settings
from workers.live import BalanceEvent, Broadcaster, Listener, LiveUnavailable, publish_changes

log = logging.getLogger(__name__)
T = TypeVar("T")


async def attempt(work: Callable[[], Awaitable[T]]) -> T | list[UserError]:
    """Run ``work``; an expected failure becomes the payload's errors (nothing written)."""
    try:
        return await work()
    except BillingError as exc:
        return [UserError.of(e) for e in exc.errors]


async def in_tx(work: Callable[[], Awaitable[T]]) -> T:
    async with in_transaction():
        return await work()


async def changing(info: CtxInfo, work: Callable[[], Awaitable[T]]) -> T | list[UserError]:
    """``attempt`` for work that may move balances: once it has committed, publish the
    balance changes (live subscriptions) and queue the notices it wrote."""
    with changes.collect() as changed:
        result = await attempt(work)
    if not isinstance(result, list):  # a refusal wrote nothing
        await _published(info, changed)
    return result


async def _published(info: CtxInfo, changed: changes.Changes) -> None:
    await publish_changes(changed, live=info.context.live, queue=info.context.queue)


# ---------------------------------------------------------------- inputs and payloads


@strawberry.input
class AddCardInput:
    payment_method_id: str
    make_primary: bool | None = False


@strawberry.input
class UpdateCardInput:
    card_id: strawberry.ID
    exp_month: int | None = None
    exp_year: int | None = None
    cardholder_name: str | None = None
    billing_address: BillingAddressInput | None = None


@strawberry.input
class CardIdInput:
    card_id: strawberry.ID


@strawberry.type
class CardPayload:
    card: Card | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.type
class CardSetupPayload:
    client_secret: str | None = strawberry.field(
        default=None, description="Pass to Stripe.js confirmCardSetup with the card Element."
    )
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.type
class RemoveCardPayload:
    removed_card_id: strawberry.ID | None = None
    primary_card: Card | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.input
class PurchaseCreditsInput:
    credits: int
    idempotency_key: str
    card_id: strawberry.ID | None = strawberry.UNSET


@strawberry.type
class PurchaseCreditsPayload:
    payment: Payment | None = None
    transaction: CreditTransaction | None = None
    balance: int | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.input
class ConfirmPurchaseInput:
    payment_id: strawberry.ID


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
    for arg in raw.field_nodes[0].arguments:
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
        card_id = _card_id(input.card_id) if card_given else None
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


@strawberry.input
class ConsumeCreditsInput:
    account_id: strawberry.ID
    user_id: strawberry.ID
    process_type: ProcessType
    quantity: int
    idempotency_key: str
    reference: str | None = None


@strawberry.type
class ConsumeCreditsPayload:
    transaction: CreditTransaction | None = None
    balance: int | None = None
    free_units_applied: int = 0
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.input
class ReverseUsageInput:
    transaction_id: strawberry.ID
    reason: str
    idempotency_key: str


@strawberry.type
class CreditTransactionPayload:
    transaction: CreditTransaction | None = None
    balance: int | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.input
class RecordMeteredUsageInput:
    account_id: strawberry.ID
    user_id: strawberry.ID
    process_type: ProcessType
    quantity: int
    idempotency_key: str
    reference: str | None = None


@strawberry.type
class MeteredUsagePayload:
    usage: MeteredUsage | None = None
    errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.input
class GrantCreditsInput:
    account_id: strawberry.ID
    credits: int
    reason: str
    idempotency_key: str


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


# ---------------------------------------------------------------- queries


@strawberry.type
class Query:
    @strawberry.field
    def viewer(self, info: CtxInfo) -> Viewer:
        p = info.context.principal
        return Viewer(
            user_id=strawberry.ID(p.user_id),
            account_id=strawberry.ID(p.account_id),
            roles=sorted(p.roles, key=lambda r: list(R).index(r)),
            email=p.email,
            name=p.name,
        )

    @strawberry.field
    def credit_pricing(self, info: CtxInfo) -> CreditPricing:
        return CreditPricing.of(info.context.book)

    @strawberry.field
    async def credit_account(
        self, info: CtxInfo, account_id: strawberry.ID | None = None
    ) -> CreditAccount:
        ctx = info.context
        p = ctx.principal
        scope = ctx.permitted(_op(info))
        if account_id is None or (account_id == p.account_id and p.has(R.ADMIN)):
            if account_id is None and not p.has(R.ADMIN):
                raise bad_input("Billing staff must name an accountId.")
            target = p.account_id
        elif scope is Reach.ANY:
            target = str(account_id)
            if not valid_account_id(target):
                raise bad_input(ACCOUNT_ID_RULE)
        else:
            raise forbidden("You may see only your own account.")
        return CreditAccount(model=await get_account(target))


# ---------------------------------------------------------------- mutations


def _card_id(raw: strawberry.ID | None) -> uuid.UUID | None:
    return ids.decode("Card", str(raw)) if raw else None


def _op(info: CtxInfo) -> str:
    """The operation's coordinate in ``api.permissions.TABLE``."""
    return f"{info.path.typename}.{info.field_name}"


def _scope(info: CtxInfo, scope: Reach) -> str | None:
    """Whose cards (or entries) the caller may touch: its own account's, or (staff) any."""
    return None if scope is Reach.ANY else info.context.principal.account_id


@strawberry.type
class Mutation:
    @strawberry.mutation
    async def add_card(self, info: CtxInfo, input: AddCardInput) -> CardPayload:
        ctx = info.context
        ctx.permitted(_op(info))
        result = await attempt(
            lambda: cards.add_card(
                ctx.gateway,
                account_id=ctx.principal.account_id,
                payment_method_id=input.payment_method_id,
                make_primary=bool(input.make_primary),
            )
        )
        if isinstance(result, list):
            return CardPayload(errors=result)
        return CardPayload(card=Card(model=result))

    @strawberry.mutation(
        description="Start saving a card in the browser (Stripe's SetupIntent): pass the "
        "clientSecret to Stripe.js confirmCardSetup with the card Element, then addCard with "
        "the PaymentMethod id it returns. The bank can ask for 3-D Secure while the "
        "cardholder is there, so later off-session charges (auto-recharge, invoices) succeed."
    )
    async def start_card_setup(self, info: CtxInfo) -> CardSetupPayload:
        ctx = info.context
        ctx.permitted(_op(info))
        result = await attempt(lambda: cards.start_setup(ctx.gateway, ctx.principal.account_id))
        if isinstance(result, list):
            return CardSetupPayload(errors=result)
        return CardSetupPayload(client_secret=result)

    @strawberry.mutation
    async def update_card(self, info: CtxInfo, input: UpdateCardInput) -> CardPayload:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        address = input.billing_address
        result = await attempt(
            lambda: in_tx(
                lambda: cards.update(
                    ctx.gateway,
                    card_id=_card_id(input.card_id),
                    scope_account_id=_scope(info, scope),
                    exp_month=input.exp_month,
                    exp_year=input.exp_year,
                    cardholder_name=input.cardholder_name,
                    address=cards.AddressInput(
                        address.line1,
                        address.line2,
                        address.city,
                        address.state,
                        address.postal_code,
                        address.country,
                    )
                    if address is not None
                    else None,
                )
            )
        )
        if isinstance(result, list):
            return CardPayload(errors=result)
        return CardPayload(card=Card(model=result))

    @strawberry.mutation
    async def set_primary_card(self, info: CtxInfo, input: CardIdInput) -> CardPayload:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        result = await attempt(
            lambda: in_tx(
                lambda: cards.set_primary(
                    ctx.gateway,
                    card_id=_card_id(input.card_id),
                    scope_account_id=_scope(info, scope),
                )
            )
        )
        if isinstance(result, list):
            return CardPayload(errors=result)
        return CardPayload(card=Card(model=result))

    @strawberry.mutation
    async def remove_card(self, info: CtxInfo, input: CardIdInput) -> RemoveCardPayload:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        result = await attempt(
            lambda: cards.remove_card(
                ctx.gateway,
                card_id=_card_id(input.card_id),
                scope_account_id=_scope(info, scope),
                is_staff=scope is Reach.ANY,
            )
        )
        if isinstance(result, list):
            return RemoveCardPayload(errors=result)
        return RemoveCardPayload(
            removed_card_id=strawberry.ID(ids.encode("Card", result.card.id)),
            primary_card=card_or_none(result.primary),
        )

    @strawberry.mutation(extensions=[metrics.purchases()])
    async def purchase_credits(
        self,
        info: CtxInfo,
        input: PurchaseCreditsInput,
    ) -> PurchaseCreditsPayload:
        ctx = info.context
        ctx.permitted(_op(info))
        given = input.card_id is not strawberry.UNSET and input.card_id is not None
        result = await changing(
            info,
            lambda: purchases.purchase_credits(
                ctx.gateway,
                ctx.book,
                account_id=ctx.principal.account_id,
                user_id=ctx.principal.user_id,
                credits=input.credits,
                card_id=_card_id(input.card_id) if given else None,
                card_id_given=given,
                idempotency_key=input.idempotency_key,
            ),
        )
        return _purchase_payload(result)

    @strawberry.mutation(
        description="Re-read a purchase that needed 3-D Secure (or is still pending) at the "
        "gateway and apply its outcome; credits land once, whether this or the webhook "
        "comes first."
    )
    async def confirm_purchase(
        self,
        info: CtxInfo,
        input: ConfirmPurchaseInput,
    ) -> PurchaseCreditsPayload:
        ctx = info.context
        ctx.permitted(_op(info))
        result = await changing(
            info,
            lambda: purchases.confirm_purchase(
                ctx.gateway,
                account_id=ctx.principal.account_id,
                payment_id=ids.decode("Payment", str(input.payment_id)),
            ),
        )
        return _purchase_payload(result)

    @strawberry.mutation(
        description="Change the fields given: an omitted field keeps its stored value, an "
        "explicit null clears it, so {enabled: false} turns auto-recharge off and keeps its "
        "configuration for the next {enabled: true}. A cardId given without usePrimaryCard "
        "pins that card."
    )
    async def update_auto_recharge(
        self,
        info: CtxInfo,
        input: AutoRechargeInput,
    ) -> AutoRechargePayload:
        ctx = info.context
        ctx.permitted(_op(info))
        account_id = ctx.principal.account_id
        data = _merged_auto_recharge(
            await autorecharge.get_setting(account_id), input, given_fields(info, "input")
        )
        result = await attempt(
            lambda: in_tx(lambda: autorecharge.update_auto_recharge(ctx.book, account_id, data))
        )
        if isinstance(result, list):
            return AutoRechargePayload(errors=result)
        await _after_debit(info, account_id, result.recharge_seq)
        return AutoRechargePayload(auto_recharge=AutoRecharge(model=result.setting))

    @strawberry.mutation(extensions=[metrics.spends()])
    async def consume_credits(
        self,
        info: CtxInfo,
        input: ConsumeCreditsInput,
    ) -> ConsumeCreditsPayload:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        ctx.own_account_or_forbidden(str(input.account_id), scope)
        result = await changing(
            info,
            lambda: usage.consume(  # owns its transaction (one statement when it can)
                ctx.book,
                account_id=str(input.account_id),
                user_id=str(input.user_id),
                process_type=input.process_type,
                quantity=input.quantity,
                reference=input.reference,
                idempotency_key=input.idempotency_key,
            ),
        )
        if isinstance(result, list):
            return ConsumeCreditsPayload(errors=result)
        await _after_debit(info, str(input.account_id), result.recharge_seq)
        return ConsumeCreditsPayload(
            transaction=transaction_or_none(result.entry),
            balance=result.balance,
            free_units_applied=result.free_units_applied,
        )

    @strawberry.mutation(
        description="Spend for up to 1,000 uses at once (a list import's appends, say): one "
        "result per item, in order, each with its own errors and idempotency key, as if "
        "consumeCredits were called for each in turn; applied in one transaction with one "
        "balance update per account."
    )
    async def consume_credits_batch(
        self,
        info: CtxInfo,
        inputs: list[ConsumeCreditsInput],
    ) -> list[ConsumeCreditsPayload]:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        if not 1 <= len(inputs) <= batch.MAX_BATCH:
            raise bad_input(f"inputs must hold 1 to {batch.MAX_BATCH:,} items")
        for item in inputs:
            ctx.own_account_or_forbidden(str(item.account_id), scope)
        items = [
            batch.SpendItem(
                account_id=str(i.account_id),
                user_id=str(i.user_id),
                process_type=i.process_type,
                quantity=i.quantity,
                reference=i.reference,
                idempotency_key=i.idempotency_key,
            )
            for i in inputs
        ]
        with changes.collect() as changed:
            result = await in_tx(lambda: batch.consume_batch(ctx.book, items))
        await _published(info, changed)
        for account_id, seq in result.recharges.items():
            await _after_debit(info, account_id, seq)
        return [
            ConsumeCreditsPayload(errors=[UserError.of(e) for e in o.errors])
            if isinstance(o, BillingError)
            else ConsumeCreditsPayload(
                transaction=transaction_or_none(o.entry),
                balance=o.balance,
                free_units_applied=o.free_units_applied,
            )
            for o in result.outcomes
        ]

    @strawberry.mutation
    async def reverse_usage(
        self,
        info: CtxInfo,
        input: ReverseUsageInput,
    ) -> CreditTransactionPayload:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        result = await changing(
            info,
            lambda: in_tx(
                lambda: usage.reverse_usage(
                    entry_id=ids.decode("CreditTransaction", str(input.transaction_id)),
                    reason=input.reason,
                    idempotency_key=input.idempotency_key,
                    user_id=ctx.principal.user_id,
                    scope_account_id=_scope(info, scope),
                )
            ),
        )
        if isinstance(result, list):
            return CreditTransactionPayload(errors=result)
        return CreditTransactionPayload(
            transaction=CreditTransaction(model=result.entry), balance=result.balance
        )

    @strawberry.mutation
    async def record_metered_usage(
        self,
        info: CtxInfo,
        input: RecordMeteredUsageInput,
    ) -> MeteredUsagePayload:
        ctx = info.context
        scope = ctx.permitted(_op(info))
        ctx.own_account_or_forbidden(str(input.account_id), scope)
        result = await attempt(
            lambda: in_tx(
                lambda: usage.record_metered(
                    ctx.book,
                    account_id=str(input.account_id),
                    user_id=str(input.user_id),
                    process_type=input.process_type,
                    quantity=input.quantity,
                    reference=input.reference,
                    idempotency_key=input.idempotency_key,
                )
            )
        )
        if isinstance(result, list):
            return MeteredUsagePayload(errors=result)
        return MeteredUsagePayload(usage=MeteredUsage(model=result))

    @strawberry.mutation
    async def grant_credits(
        self,
        info: CtxInfo,
        input: GrantCreditsInput,
    ) -> CreditTransactionPayload:
        return await _staff_credits(info, input, adjust=False)

    @strawberry.mutation
    async def adjust_credits(
        self,
        info: CtxInfo,
        input: GrantCreditsInput,
    ) -> CreditTransactionPayload:
        return await _staff_credits(info, input, adjust=True)

    @strawberry.mutation(
        description="Set or turn off the admins' low-balance e-mail (sent once each time "
        "the balance falls below the level)."
    )
    async def update_low_balance_alert(
        self,
        info: CtxInfo,
        input: LowBalanceAlertInput,
    ) -> LowBalanceAlertPayload:
        ctx = info.context
        ctx.permitted(_op(info))
        result = await changing(
            info,
            lambda: in_tx(
                lambda: lowbalance.update_alert(
                    ctx.book,
                    ctx.principal.account_id,
                    enabled=input.enabled,
                    level_credits=input.level_credits,
                )
            ),
        )
        if isinstance(result, list):
            return LowBalanceAlertPayload(errors=result)
        return LowBalanceAlertPayload(low_balance_alert=LowBalanceAlert.of(result))


# ---------------------------------------------------------------- subscriptions


@strawberry.type
class Subscription:
    @strawberry.subscription(
        description="The caller's account balance as it changes (admins; over "
        "graphql-transport-ws, the token in connection_init's payload as "
        '{"authorization": "Bearer <token>"}). The first event is the balance when the '
        "subscription starts (transaction null); then one per ledger entry: spends, "
        "purchases, recharges, grants, corrections, refunds. Ends with an UNAUTHENTICATED "
        "error when the token expires."
    )
    async def credit_balance_changed(
        self, info: CtxInfo
    ) -> AsyncGenerator[CreditBalanceChange, None]:
        ctx = info.context
        ctx.permitted(_op(info))
        return _balance_changes(info)


async def _balance_changes(info: CtxInfo) -> AsyncGenerator[CreditBalanceChange, None]:
    ctx = info.context
    account_id = ctx.principal.account_id
    async with _listening(ctx.live, account_id) as events:  # listening before the first read
        yield CreditBalanceChange(balance=await ledger.balance_of(account_id), transaction=None)
        while True:
            event = await _next_event(info, events)
            ctx.fresh_loaders()  # the socket's context lives on: don't serve stale rows
            entry = event.entry
            # The last event of a burst reads the balance again, so the newest figure shown
            # is right even if events from several processes arrived out of order.
            balance = (
                entry.balance_after
                if entry is not None and events.pending()
                else await ledger.balance_of(account_id)
            )
            yield CreditBalanceChange(balance=balance, transaction=transaction_or_none(entry))


@asynccontextmanager
async def _listening(live: Broadcaster, account_id: str) -> AsyncIterator[Listener]:
    try:
        async with live.listen(account_id) as events:
            yield events
    except LiveUnavailable:
        raise GraphQLError(
            "Live updates are unavailable right now: try again shortly.",
            extensions={"code": "SERVICE_UNAVAILABLE"},
        ) from None


async def _next_event(info: CtxInfo, events: Listener) -> BalanceEvent:
    expires_at = info.context.token_expires_at
    if expires_at is None:
        return await events.get()
    try:
        async with asyncio.timeout(max(0.0, expires_at - time.time())):
            return await events.get()
    except TimeoutError:
        raise GraphQLError(
            "The token has expired: subscribe again with a new one.",
            extensions={"code": "UNAUTHENTICATED"},
        ) from None


async def _after_debit(info: CtxInfo, account_id: str, recharge_seq: int | None) -> None:
    """After commit: a balance left below its threshold gets its recharge job. One job id
    per crossing, so concurrent spends across one threshold queue one job."""
    if recharge_seq is not None:
        await info.context.queue.enqueue(
            "threshold_recharge", account_id, job_id=f"recharge:{account_id}:{recharge_seq}"
        )


def _purchase_payload(
    result: purchases.PaymentOutcome | list[UserError],
) -> PurchaseCreditsPayload:
    if isinstance(result, list):
        return PurchaseCreditsPayload(errors=result)
    return PurchaseCreditsPayload(
        payment=Payment(model=result.payment),
        transaction=transaction_or_none(result.entry),
        balance=result.balance,
        errors=[UserError.of(e) for e in result.errors],
    )


async def _staff_credits(
    info: CtxInfo,
    input: GrantCreditsInput,
    *,
    adjust: bool,
) -> CreditTransactionPayload:
    ctx = info.context
    ctx.permitted(_op(info))
    result = await changing(
        info,
        lambda: in_tx(
            lambda: usage.grant_or_adjust(
                account_id=str(input.account_id),
                credits=input.credits,
                reason=input.reason,
                idempotency_key=input.idempotency_key,
                user_id=ctx.principal.user_id,
                adjust=adjust,
            )
        ),
    )
    if isinstance(result, list):
        return CreditTransactionPayload(errors=result)
    await _after_debit(info, str(input.account_id), result.recharge_seq)
    return CreditTransactionPayload(
        transaction=CreditTransaction(model=result.entry), balance=result.balance
    )


def should_mask_error(error: GraphQLError) -> bool:
    """Mask unexpected exceptions; keep GraphQL's own errors and our coded ones."""
    original = error.original_error
    return original is not None and not isinstance(original, GraphQLError)


# Room to spare for the billing page, the platform services and GraphiQL's introspection
# query (tests/test_hardening.py checks them); abusive documents are refused before they run.
# The depth, alias and field budgets are api/cost.py's.
MAX_TOKENS = 2_000
__all__ = ["MAX_ALIASES", "MAX_FIELDS", "MAX_QUERY_DEPTH", "MAX_TOKENS", "build_schema", "schema"]


def hardening_rules(settings: Settings | None = None) -> list[type[ASTValidationRule]]:
    """The document's cost (depth, aliases, fields: one linear walk), and no
    introspection when ``settings`` turn it off."""
    rules: list[type[ASTValidationRule]] = [CostLimit]
    if settings is not None and not settings.introspection_enabled:
        rules.append(NoSchemaIntrospectionCustomRule)
    return rules


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    """The schema with its hardening. Introspection follows ``settings`` (on without them:
    ``make schema`` exports the default ``schema`` below)."""
    # Made once per schema, so the validation cache hits.
    rules = all_rules(hardening_rules(settings))
    hide = settings is not None and not settings.suggestions_enabled
    extensions: list[Callable[[], SchemaExtension]] = [
        MetricsExtension,  # first: it times everything the others do
        # Parsed (at most MAX_TOKENS tokens) and validated once per distinct document.
        lambda: Documents(rules, hide_suggestions=hide, max_tokens=MAX_TOKENS),
        # Refusals before anything runs: a websocket's expired token, a missing
        # operationName, api/permissions.py's table, unstorable text, a POSTed
        # subscription; and the variables as sent, for given_fields.
        Guards,
        lambda: CodedMaskErrors(should_mask_error=should_mask_error),
    ]
    return BoundedSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[Role],
        extensions=extensions,
        operation_timeout_seconds=settings.operation_timeout_seconds
        if settings is not None
        else DEFAULT_OPERATION_TIMEOUT_SECONDS,
        hide_suggestions=hide,
    )


schema = build_schema()
