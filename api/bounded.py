"""The Strawberry schema with what every operation gets, on every transport (HTTP and
websocket alike):

- a wall-clock budget: an operation still running after ``operation_timeout_seconds`` is
  cancelled and answered with a ``TIMEOUT`` error, so nothing a client sends holds the
  process (the document's cost is bounded before it runs: ``api.cost``);
- no "Did you mean …?" suggestions when they are turned off (production): they would
  spell out the schema that introspection hides (fields, arguments, types, enum values);
- logging by whose mistake it is: a client's (a syntax or validation error, ``FORBIDDEN``,
  ``BAD_USER_INPUT``, ...) at INFO without a traceback; ERROR with the traceback is for
  faults of ours.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import strawberry
from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import GraphQLError, GraphQLSchema, execute, parse, specified_rules, validate
from graphql.language import DocumentNode
from graphql.validation import ASTValidationRule
from strawberry.extensions import SchemaExtension
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule
from strawberry.types import ExecutionContext

from api.trusted import Registry

log = logging.getLogger("api.graphql")

DEFAULT_OPERATION_TIMEOUT_SECONDS = 30.0
_SUGGESTION = re.compile(r"\s*Did you mean [^?]*\?")


#: Distinct documents whose parse (by their text, as Strawberry's ``ParserCache``) and
#: validation are remembered.
PARSE_CACHE_SIZE = 256


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _validate(
    schema: GraphQLSchema,
    document: DocumentNode,
    rules: RuleSet,
    hide_suggestions: bool,
) -> list[GraphQLError]:
    return validate(
        schema,
        document,
        (*rules.rules, MaybeNullValidationRule, OneOfInputValidationRule),
        hide_suggestions=hide_suggestions,
    )


def validation_cache_info() -> Any:
    return _validate.cache_info()


@functools.lru_cache(maxsize=PARSE_CACHE_SIZE)
def _parse(query: str, max_tokens: int) -> DocumentNode:
    return parse(query, max_tokens=max_tokens)


class Documents(SchemaExtension):
    """A document's parse and validation, each done once per distinct document and
    remembered (one extension for what Strawberry's ``MaxTokensLimiter``, ``ParserCache``,
    ``AddValidationRules`` and ``ValidationCache`` do, with suggestions hidden when asked):

    - parsing stops past ``max_tokens`` tokens (a syntax error), before any cost is paid;
    - validation runs ``rules``: GraphQL's own and ours (the document's cost included:
      ``api.cost.CostLimit``).

    Strawberry parses and validates only what no extension did, so its own
    ``parse_options`` and ``validation_rules`` are not used."""

    def __init__(
        self,
        rules: RuleSet,
        *,
        hide_suggestions: bool,
        max_tokens: int,
        trusted: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.rules = rules
        #: Trusted documents by their text (``api.trusted.Registry.by_text``): checked at
        #: start-up, so neither parsed nor validated here.
        self.trusted = trusted or {}
        self.hide_suggestions = hide_suggestions
        self.max_tokens = max_tokens

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        if context.query is not None:
            trusted = self.trusted.get(context.query)
            if trusted is not None:
                context.graphql_document = trusted.document
                # For the guards: the document's facts, worked out at start-up.
                context.trusted_document = trusted  # type: ignore[attr-defined]
            else:
                context.graphql_document = _parse(context.query, self.max_tokens)
        yield

    def on_validate(self) -> Iterator[None]:
        context = self.execution_context
        assert context.graphql_document is not None
        if getattr(context, "trusted_document", None) is not None:
            context.pre_execution_errors = []  # validated at start-up
        else:
            context.pre_execution_errors = _validate(
                context.schema._schema, context.graphql_document, self.rules, self.hide_suggestions
            )
        yield


@dataclass(frozen=True, eq=False)
class RuleSet:
    """Validation rules, compared by identity: a key of the validation cache that costs
    nothing to hash (a tuple of thirty rules is hashed anew on every lookup)."""

    rules: tuple[type[ASTValidationRule], ...]


def all_rules(rules: Iterable[type[ASTValidationRule]]) -> RuleSet:
    """GraphQL's own validation rules, then ``rules`` (made once per schema)."""
    return RuleSet((*specified_rules, *rules))


#: Codes of errors that are the client's doing (logged at INFO, without a traceback).
CLIENT_CODES = frozenset(
    {
        "FORBIDDEN",
        "BAD_USER_INPUT",
        "BAD_REQUEST",
        "UNAUTHENTICATED",
        "NOT_FOUND",
        "QUERY_TOO_COSTLY",
        "TIMEOUT",
    }
)


def is_client_error(error: GraphQLError) -> bool:
    original = error.original_error
    if original is None:
        return True  # syntax and validation errors, variables that don't coerce
    if isinstance(original, GraphQLError):
        code = (original.extensions or {}).get("code")
        return code in CLIENT_CODES
    return False


def timeout_error(seconds: float) -> GraphQLError:
    return GraphQLError(
        f"The operation took longer than {seconds:g} s and was stopped.",
        extensions={"code": "TIMEOUT"},
    )


class BoundedSchema(strawberry.Schema):
    def __init__(
        self,
        *args: Any,
        operation_timeout_seconds: float = DEFAULT_OPERATION_TIMEOUT_SECONDS,
        hide_suggestions: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.operation_timeout_seconds = operation_timeout_seconds
        self.hide_suggestions = hide_suggestions
        #: Its trusted documents (``api.trusted.Registry``), set by ``build_schema``.
        self.trusted = Registry()

    def _get_execute_function(self) -> Callable[..., Any]:
        return functools.partial(execute, hide_suggestions=self.hide_suggestions)

    async def _execute_operation(  # type: ignore[override]
        self, execution_context: ExecutionContext, *args: Any, **kwargs: Any
    ) -> Any:
        """Queries and mutations, over HTTP and over the websocket, within the budget."""
        seconds = self.operation_timeout_seconds
        try:
            async with asyncio.timeout(seconds):
                return await super()._execute_operation(execution_context, *args, **kwargs)
        except TimeoutError:
            log.warning(
                "stopped operation %s after %g s",
                execution_context.operation_name or "anonymous",
                seconds,
            )
            result = GraphQLExecutionResult(data=None, errors=[timeout_error(seconds)])
            execution_context.result = result
            return result

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        for error in errors:
            if self.hide_suggestions:
                error.message = _SUGGESTION.sub("", error.message)
            if is_client_error(error):
                code = (error.extensions or {}).get("code") or "GRAPHQL_VALIDATION"
                log.info("client error %s: %s", code, error.message)
            else:
                log.error(error.message, exc_info=error.original_error)
