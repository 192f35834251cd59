"""Trusted documents (persisted operations): the operations first-party clients send by
their id instead of their text.

The documents are server-side files, one operation each (with the fragments it uses):

- ``api/static/billing/operations.graphql``: the billing page's (the page sends them by
  hash from ``operations.js``, which ``make trusted`` writes from this file);
- ``api/graphql/trusted/platform.graphql``: the platform's services'.

A client sends Apollo's persisted-query shape without ``query``::

    {"operationName": "ConsumeCredits", "variables": {...},
     "extensions": {"persistedQuery": {"version": 1, "sha256Hash": "<hex>"}}}

where the hash is the sha256 of the operation's text as ``python -m api.trusted`` prints
it. A known hash runs the stored document; an unknown one is answered with
``PERSISTED_QUERY_NOT_FOUND`` (HTTP 200, as Apollo Server does); a hash sent with a
``query`` whose sha256 is another is refused (``BAD_REQUEST``). Nothing a client sends is
ever registered (no automatic persisted queries): the list is the server's, so nobody can
fill it (or its memory) with documents of their own. Arbitrary documents sent as text
still run (GraphiQL, other clients), through every check.

Each trusted document is parsed, validated (GraphQL's rules, the cost limit, the
introspection switch) and checked for unstorable text once, when the schema is built: a
document that fails stops the start-up. Per request only its variables are checked; the
permission table still applies per request (it depends on the caller)."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graphql import DocumentNode, GraphQLError, GraphQLSchema, parse, print_ast, validate
from graphql.utilities import separate_operations
from strawberry.schema.validation_rules.maybe_null import MaybeNullValidationRule
from strawberry.schema.validation_rules.one_of import OneOfInputValidationRule

from api.guards import DocumentFacts, document_facts

API = Path(__file__).resolve().parent
#: The files of trusted documents, by who sends them.
SOURCES: dict[str, Path] = {
    "billing": API / "static" / "billing" / "operations.graphql",
    "platform": API / "graphql" / "trusted" / "platform.graphql",
}
#: The billing page's names -> hashes (written by ``make trusted``).
PAGE_MODULE = API / "static" / "billing" / "operations.js"

NOT_FOUND = "PERSISTED_QUERY_NOT_FOUND"


class TrustedDocumentError(Exception):
    """A trusted document that does not hold: the service does not start."""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class TrustedDocument:
    source: str
    name: str
    #: The canonical text (``print_ast`` of the operation and its fragments): its sha256
    #: is the id.
    text: str
    sha256: str
    document: DocumentNode
    facts: DocumentFacts


def split(source: str) -> Iterator[tuple[str, str]]:
    """Each named operation of a file with the fragments it uses: (name, canonical text)."""
    for name, document in separate_operations(parse(source)).items():
        if not name:
            raise TrustedDocumentError("a trusted operation must have a name")
        yield name, print_ast(document)


def read(sources: dict[str, Path] | None = None) -> list[tuple[str, str, str]]:
    """(source, name, text) of every trusted operation, unchecked."""
    found: list[tuple[str, str, str]] = []
    for source, path in (sources or SOURCES).items():
        found.extend((source, name, text) for name, text in split(path.read_text("utf-8")))
    return found


@dataclass
class Registry:
    """The trusted documents, by hash and by text (the text is the registry's own string:
    a request that names a hash carries that very object, so looking it up by text hashes
    nothing)."""

    by_hash: dict[str, TrustedDocument] = field(default_factory=dict)
    by_text: dict[str, TrustedDocument] = field(default_factory=dict)

    def load(
        self,
        schema: GraphQLSchema,
        rules: tuple[Any, ...],
        *,
        hide_suggestions: bool,
        sources: dict[str, Path] | None = None,
    ) -> Registry:
        """Reads, parses and validates every trusted document against ``schema`` with
        ``rules`` (the ones every request's document meets); raises
        ``TrustedDocumentError`` for one that fails."""
        every_rule = (*rules, MaybeNullValidationRule, OneOfInputValidationRule)
        for source, name, text in read(sources):
            where = f"trusted document {name} ({source})"
            document = parse(text)
            errors = validate(schema, document, every_rule, hide_suggestions=hide_suggestions)
            if errors:
                raise TrustedDocumentError(f"{where}: {'; '.join(e.message for e in errors)}")
            facts = document_facts(document)
            if facts.bad_literal:
                raise TrustedDocumentError(f"{where}: a string is not storable text")
            entry = TrustedDocument(source, name, text, sha256(text), document, facts)
            if entry.sha256 in self.by_hash or any(d.name == name for d in self.by_hash.values()):
                raise TrustedDocumentError(f"{where}: defined twice")
            self.by_hash[entry.sha256] = entry
            self.by_text[text] = entry
        return self

    def resolve(
        self, query: str | None, extensions: dict[str, Any] | None
    ) -> tuple[str | None, GraphQLError | None]:
        """The text a request runs, or the error that answers it instead."""
        persisted = (extensions or {}).get("persistedQuery")
        if persisted is None:
            return query, None
        digest = persisted.get("sha256Hash") if isinstance(persisted, dict) else None
        if not isinstance(digest, str) or persisted.get("version") != 1:
            return None, _error(
                'persistedQuery must be {"version": 1, "sha256Hash": "<hex>"}.', "BAD_REQUEST"
            )
        digest = digest.lower()
        known = self.by_hash.get(digest)
        if query is not None:
            # Apollo's shape for registering: we register nothing, but a text that matches
            # its hash runs like any text (a trusted one as trusted).
            if sha256(query) != digest:
                return None, _error("The sha256Hash does not match the query.", "BAD_REQUEST")
            return (known.text if known is not None else query), None
        if known is None:
            return None, _error("PersistedQueryNotFound", NOT_FOUND)
        return known.text, None


def _error(message: str, code: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": code})


def page_module(sources: dict[str, Path] | None = None) -> str:
    """``operations.js``: the billing page's operation names and their hashes."""
    lines = [
        "// Written by `make trusted` from operations.graphql: do not edit. The page sends",
        "// these ids instead of the documents (trusted documents: api/trusted.py).",
        "export const OPERATIONS = {",
    ]
    for source, name, text in read(sources):
        if source == "billing":
            lines.append(f'  {name}: "{sha256(text)}",')
    lines.append("};")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    """``python -m api.trusted``: each document's source, name and hash (``--text``: and
    its text); ``--write``: writes the page's ``operations.js``."""
    if "--write" in argv:
        PAGE_MODULE.write_text(page_module(), "utf-8")
        print(f"wrote {PAGE_MODULE}")
        return 0
    for source, name, text in read():
        print(f"{source}\t{name}\t{sha256(text)}")
        if "--text" in argv:
            print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
