"""The schema: assembles the domains' queries, mutations and the live subscription (in
the contract's order), with the extensions that harden it. Each domain's resolvers are in
its module (account, cards, purchases, spending, staff, settings, live); every mutation
runs through ``api.graphql.run``."""

from __future__ import annotations

from collections.abc import Callable

import strawberry
from graphql import GraphQLError
from graphql.validation import ASTValidationRule, NoSchemaIntrospectionCustomRule
from strawberry.extensions import SchemaExtension

from api.bounded import DEFAULT_OPERATION_TIMEOUT_SECONDS, BoundedSchema, Documents, all_rules
from api.cost import MAX_ALIASES, MAX_FIELDS, MAX_QUERY_DEPTH, CostLimit
from api.errors import CodedMaskErrors
from api.graphql import account, cards, live, purchases, spending, staff
from api.graphql import settings as account_settings
from api.graphql.types import Role
from api.guards import Guards
from api.metrics import MetricsExtension
from api.trusted import Registry
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


def should_mask_error(error: GraphQLError) -> bool:
    """Mask unexpected exceptions; keep GraphQL's own errors and our coded ones."""
    original = error.original_error
    return original is not None and not isinstance(original, GraphQLError)


# Room to spare for the billing page, the platform services and GraphiQL's introspection
# query (tests/api/test_hardening.py checks them); abusive documents are refused before they run.
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


def build_schema(settings: Settings | None = None) -> BoundedSchema:
    """The schema with its hardening. Introspection follows ``settings`` (on without them:
    ``make schema`` exports the default ``schema`` below)."""
    # Made once per schema, so the validation cache hits.
    rules = all_rules(hardening_rules(settings))
    hide = settings is not None and not settings.suggestions_enabled
    trusted = Registry()  # filled (and checked) once the schema exists, below
    extensions: list[Callable[[], SchemaExtension]] = [
        MetricsExtension,  # first: it times everything the others do
        # Parsed (at most MAX_TOKENS tokens) and validated once per distinct document.
        # Trusted documents (api/trusted.py) were checked at start-up: neither.
        lambda: Documents(
            rules, hide_suggestions=hide, max_tokens=MAX_TOKENS, trusted=trusted.by_text
        ),
        # Refusals before anything runs: a websocket's expired token, a missing
        # operationName, api/permissions.py's table, unstorable text, a POSTed
        # subscription; and the variables as sent, for given_fields.
        Guards,
        lambda: CodedMaskErrors(should_mask_error=should_mask_error),
    ]
    schema = BoundedSchema(
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
    # Validated against this schema with the same rules; one that fails stops the start-up.
    schema.trusted = trusted.load(schema._schema, rules.rules, hide_suggestions=hide)
    return schema


schema = build_schema()
