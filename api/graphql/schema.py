"""The schema: assembles the domains' queries, mutations and the live subscription (in
the contract's order), with the extensions that harden it. Each domain's resolvers are in
its module (account, cards, purchases, spending, staff, settings, live); every mutation
runs through ``api.graphql.run``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import strawberry
from graphql import GraphQLError
from graphql.validation import ASTValidationRule, NoSchemaIntrospectionCustomRule
from strawberry.extensions import (
    AddValidationRules,
    MaxTokensLimiter,
    ParserCache,
    SchemaExtension,
)

from api.bounded import DEFAULT_OPERATION_TIMEOUT_SECONDS, BoundedSchema, CachedValidation
from api.context import Context
from api.cost import MAX_ALIASES, MAX_FIELDS, MAX_QUERY_DEPTH, CostLimit
from api.errors import CodedMaskErrors
from api.graphql import account, cards, live, purchases, spending, staff
from api.graphql import settings as account_settings
from api.graphql.types import Role
from api.guards import FreshToken, OperationNameRequired, SubscriptionsOverWebsocket, TextGuard
from api.metrics import MetricsExtension
from api.permissions import Permissions
from runtime.settings import Settings


@strawberry.type
class Query:
    viewer = account.viewer
    credit_pricing = account.credit_pricing
    credit_account = account.credit_account


@strawberry.type
class Mutation:
    add_card = cards.add_card
    start_card_setup = cards.start_card_setup
    update_card = cards.update_card
    set_primary_card = cards.set_primary_card
    remove_card = cards.remove_card
    purchase_credits = purchases.purchase_credits
    confirm_purchase = purchases.confirm_purchase
    update_auto_recharge = account_settings.update_auto_recharge
    consume_credits = spending.consume_credits
    consume_credits_batch = spending.consume_credits_batch
    reverse_usage = spending.reverse_usage
    record_metered_usage = spending.record_metered_usage
    grant_credits = staff.grant_credits
    adjust_credits = staff.adjust_credits
    update_low_balance_alert = account_settings.update_low_balance_alert


@strawberry.type
class Subscription:
    credit_balance_changed = live.credit_balance_changed


class RawVariables(SchemaExtension):
    """Keeps the request's variables as sent (before GraphQL fills in defaults)."""

    def on_execute(self) -> Iterator[None]:
        ctx = self.execution_context.context
        if isinstance(ctx, Context):
            ctx.raw_variables = dict(self.execution_context.variables or {})
        yield


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
    rules = hardening_rules(settings)  # made once per schema, so the validation cache hits
    hide = settings is not None and not settings.suggestions_enabled
    extensions: list[Callable[[], SchemaExtension]] = [
        MetricsExtension,  # first: it times everything the others do
        lambda: MaxTokensLimiter(max_token_count=MAX_TOKENS),
        ParserCache,
        lambda: AddValidationRules(rules),
        lambda: CachedValidation(hide_suggestions=hide),
        FreshToken,  # a websocket's token is checked again for each operation
        OperationNameRequired,  # several operations need an operationName
        Permissions,  # api/permissions.py's table, for every operation, before it runs
        TextGuard,  # no lone surrogate or NUL reaches the database
        SubscriptionsOverWebsocket,  # a subscription POSTed is refused, not a null
        RawVariables,  # given_fields reads what the request itself sent
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
