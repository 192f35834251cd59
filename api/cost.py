"""What a GraphQL document costs, computed once, in time linear in the document.

A document's cost is, per operation: its depth (fields nested in fields, introspection
fields not counted), its aliases, and the number of fields it selects once every fragment
spread is expanded. Each fragment's cost is computed once and remembered, so
``fragment F1 { ...F0 ...F0 } … fragment F20 { ...F19 ...F19 }`` costs 21 small
computations, not 2^20 walks (Strawberry's depth and alias limiters walk every spread again
and froze the process on such a document). ``CostLimit`` is a validation rule, so
``ValidationCache`` keeps its verdict with the document's other validation results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    SelectionSetNode,
    ValidationContext,
    ValidationRule,
)

MAX_QUERY_DEPTH = 10
MAX_ALIASES = 15
#: Fields selected once fragments are expanded. GraphiQL's introspection query selects
#: about 200; the billing page's largest operation about 60.
MAX_FIELDS = 1_000


@dataclass(frozen=True)
class Cost:
    depth: int = 0
    aliases: int = 0
    fields: int = 0


class _Costing:
    def __init__(self, fragments: dict[str, FragmentDefinitionNode]) -> None:
        self.fragments = fragments
        self.memo: dict[str, Cost] = {}
        self.open: set[str] = set()  # a cycle is NoFragmentCyclesRule's to report

    def fragment(self, name: str) -> Cost:
        known = self.memo.get(name)
        if known is not None:
            return known
        definition = self.fragments.get(name)
        if definition is None or name in self.open:
            return Cost()
        self.open.add(name)
        cost = self.selections(definition.selection_set)
        self.open.discard(name)
        self.memo[name] = cost
        return cost

    def selections(self, selection_set: SelectionSetNode | None) -> Cost:
        depth = aliases = fields = 0
        for selection in selection_set.selections if selection_set else ():
            if isinstance(selection, FieldNode):
                inner = self.selections(selection.selection_set)
                fields += 1 + inner.fields
                aliases += inner.aliases + (1 if selection.alias else 0)
                if selection.selection_set and not selection.name.value.startswith("__"):
                    depth = max(depth, 1 + inner.depth)
            else:
                if isinstance(selection, FragmentSpreadNode):
                    inner = self.fragment(selection.name.value)
                elif isinstance(selection, InlineFragmentNode):
                    inner = self.selections(selection.selection_set)
                else:  # pragma: no cover - no other selection kind exists
                    continue
                fields += inner.fields
                aliases += inner.aliases
                depth = max(depth, inner.depth)
        return Cost(depth, aliases, fields)


def document_costs(document: DocumentNode) -> dict[str, Cost]:
    """Each operation's cost, by name (``anonymous`` for an unnamed one)."""
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    costing = _Costing(fragments)
    return {
        (d.name.value if d.name else "anonymous"): costing.selections(d.selection_set)
        for d in document.definitions
        if isinstance(d, OperationDefinitionNode)
    }


def _too_costly(name: str, cost: Cost) -> str | None:
    if cost.depth > MAX_QUERY_DEPTH:
        return f"'{name}' exceeds maximum operation depth of {MAX_QUERY_DEPTH}"
    if cost.aliases > MAX_ALIASES:
        return f"{cost.aliases} aliases found. Allowed: {MAX_ALIASES}"
    if cost.fields > MAX_FIELDS:
        return (
            f"'{name}' selects {cost.fields:,} fields once its fragments are expanded. "
            f"Allowed: {MAX_FIELDS:,}"
        )
    return None


class CostLimit(ValidationRule):
    """Refuse a document over its depth, alias or field budget, looking at it once."""

    def __init__(self, context: ValidationContext) -> None:
        super().__init__(context)

    def enter_document(self, node: DocumentNode, *_: Any) -> Any:
        for name, cost in document_costs(node).items():
            message = _too_costly(name, cost)
            if message is not None:
                self.report_error(GraphQLError(message, extensions={"code": "QUERY_TOO_COSTLY"}))
        return self.BREAK  # nothing else to look at
