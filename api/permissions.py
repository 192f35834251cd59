"""Who may do what: one table, one rule per operation.

Each row names, for each role that may run the operation, which account it may act on:
``OWN`` (the account its token names) or ``ANY`` (billing staff). A caller holding
several roles gets the widest reach any of its roles has *for that operation*: roles never
combine into a power neither has alone (billing staff don't spend, and a service spends
only for its own account, so a token with both still spends only for its own account).

``api.guards.Guards`` enforces the table for every operation before anything runs: a root field
without a row is refused (a new operation is closed until it has one; a test walks the
schema for rows). Resolvers ask ``reach`` for the account scope they then apply.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from graphql import (
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    SelectionSetNode,
)

from api.auth import Principal
from billing.enums import Role


class Reach(Enum):
    OWN = "own"  # the account the caller's token names
    ANY = "any"  # any account


@dataclass(frozen=True)
class Rule:
    grants: Mapping[Role, Reach] = field(default_factory=dict)
    #: Any signed-in caller, whatever its roles (on its own account).
    signed_in: bool = False


OWN, ANY = Reach.OWN, Reach.ANY
ADMIN, USER, SERVICE, STAFF = Role.ADMIN, Role.USER, Role.SERVICE, Role.BILLING_STAFF

#: Every operation, by GraphQL coordinate (and the one REST read, by route).
TABLE: dict[str, Rule] = {
    "Query.viewer": Rule(signed_in=True),
    "Query.creditPricing": Rule(signed_in=True),
    "Query.creditAccount": Rule({ADMIN: OWN, STAFF: ANY}),
    "Mutation.addCard": Rule({ADMIN: OWN}),
    "Mutation.updateCard": Rule({ADMIN: OWN, STAFF: ANY}),
    "Mutation.setPrimaryCard": Rule({ADMIN: OWN, STAFF: ANY}),
    "Mutation.removeCard": Rule({ADMIN: OWN, STAFF: ANY}),
    "Mutation.purchaseCredits": Rule({ADMIN: OWN}),
    "Mutation.confirmPurchase": Rule({ADMIN: OWN}),
    "Mutation.startCardSetup": Rule({ADMIN: OWN}),
    "Mutation.updateAutoRecharge": Rule({ADMIN: OWN}),
    "Mutation.updateLowBalanceAlert": Rule({ADMIN: OWN}),
    "Mutation.consumeCredits": Rule({SERVICE: OWN}),
    "Mutation.consumeCreditsBatch": Rule({SERVICE: OWN}),
    "Mutation.recordMeteredUsage": Rule({SERVICE: OWN}),
    "Mutation.reverseUsage": Rule({SERVICE: OWN, STAFF: ANY}),
    "Mutation.grantCredits": Rule({STAFF: ANY}),
    "Mutation.adjustCredits": Rule({STAFF: ANY}),
    "Subscription.creditBalanceChanged": Rule({ADMIN: OWN}),
    "GET /reports/transactions.csv": Rule({ADMIN: OWN, STAFF: ANY}),
}


def reach(principal: Principal, operation: str) -> Reach | None:
    """The widest account scope ``principal`` has for ``operation`` (None: forbidden)."""
    rule = TABLE.get(operation)
    if rule is None:
        return None
    scopes = {rule.grants[r] for r in principal.roles if r in rule.grants}
    if ANY in scopes:
        return ANY
    if OWN in scopes or rule.signed_in:
        return OWN
    return None


def needed_roles(operation: str) -> str:
    rule = TABLE.get(operation)
    if rule is None or not rule.grants:
        return "a permission rule"
    return " or ".join(f"the {r.value} role" for r in rule.grants)


def forbidden(operation: str) -> GraphQLError:
    return GraphQLError(
        f"{operation.split('.')[-1]} needs {needed_roles(operation)}.",
        extensions={"code": "FORBIDDEN"},
    )


def root_fields(
    selection_set: SelectionSetNode, fragments: Mapping[str, FragmentDefinitionNode]
) -> Iterable[str]:
    seen: set[str] = set()
    stack = [selection_set]
    while stack:
        for selection in stack.pop().selections:
            if isinstance(selection, FieldNode):
                yield selection.name.value
            elif isinstance(selection, InlineFragmentNode):
                stack.append(selection.selection_set)
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                if name not in seen and name in fragments:
                    seen.add(name)
                    stack.append(fragments[name].selection_set)
