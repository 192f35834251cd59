"""The checked-in SDL, the shared contract, and the database schema."""

from __future__ import annotations

import pytest
from graphql import (
    DangerousChangeType,
    build_schema,
    find_breaking_changes,
    find_dangerous_changes,
)

from api.graphql.schema import schema
from billing import sql
from tests.conftest import ROOT

CONTRACT = ROOT.parent / "shared" / "contract.graphql"


def test_schema_graphql_is_generated_from_the_code() -> None:
    committed = (ROOT / "schema.graphql").read_text()
    assert committed.strip() == schema.as_str().strip(), (
        "schema.graphql is stale: run `make schema` and commit it"
    )


@pytest.mark.skipif(not CONTRACT.exists(), reason="shared/contract.graphql is not beside the repo")
def test_schema_keeps_every_name_of_the_contract() -> None:
    contract = build_schema(CONTRACT.read_text())
    ours = build_schema((ROOT / "schema.graphql").read_text())
    breaking = [c.description for c in find_breaking_changes(contract, ours)]
    defaults = (
        DangerousChangeType.ARG_DEFAULT_VALUE_CHANGE,
        DangerousChangeType.INPUT_FIELD_DEFAULT_VALUE_CHANGE,
    )
    changed_defaults = [
        c.description for c in find_dangerous_changes(contract, ours) if c.type in defaults
    ]
    assert breaking == []
    assert changed_defaults == []


EXPECTED_CHECKS = {
    "credit_account_balance_nonneg",
    "payment_credits_nonneg",
    "payment_amount_positive",
    "ledger_entry_credits_nonzero",
    "ledger_entry_balance_nonneg",
    "free_quota_usage_used_nonneg",
    "metered_usage_quantity_positive",
    "metered_usage_amount_nonneg",
}

EXPECTED_INDEXES = {
    ("auto_recharge_setting", ("enabled", "trigger", "next_run_at")),
    ("card", ("account_id", "removed_at", "created_at")),
    ("free_quota_usage", ("account_id", "process_type", "period_start")),
    ("idempotency_record", ("account_id", "key")),
    ("member", ("account_id", "user_id")),
    ("ledger_entry", ("account_id", "created_at", "id")),
    ("ledger_entry", ("account_id", "type", "created_at", "id")),
    ("ledger_entry", ("account_id", "process_type", "created_at", "id")),
    ("ledger_entry", ("account_id", "user_id", "created_at", "id")),
    ("ledger_entry", ("reverses_entry_id",)),
    ("metered_usage", ("account_id", "created_at")),
    ("payment", ("account_id", "created_at")),
    ("payment", ("status", "updated_at")),
    ("payment", ("gateway_payment_id",)),
    ("gateway_event", ("source", "external_id")),
    ("gateway_event", ("processed_at", "id")),
    ("gateway_event", ("object_id", "type")),
    ("payment", ("trigger_key",)),
    ("credit_account", ("recharge_threshold",)),
    ("notification", ("dedupe_key",)),
    ("notification", ("sent_at", "next_attempt_at")),
    ("invoice", ("account_id", "period_start")),
    ("invoice", ("status", "next_attempt_at")),
}


async def _indexes(backend: str) -> set[tuple[str, tuple[str, ...]]]:
    found: set[tuple[str, tuple[str, ...]]] = set()
    if backend == "postgres":
        rows = await sql.fetch(
            "SELECT t.relname AS tbl, array_agg(a.attname ORDER BY k.n) AS cols "
            "FROM pg_index i JOIN pg_class t ON t.oid = i.indrelid "
            "JOIN pg_namespace ns ON ns.oid = t.relnamespace "
            "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
            "JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum "
            "WHERE ns.nspname = 'public' AND NOT i.indisprimary GROUP BY i.indexrelid, t.relname"
        )
        return {(r["tbl"], tuple(r["cols"])) for r in rows}
    for row in await sql.fetch("SELECT tbl_name, name FROM sqlite_master WHERE type = 'index'"):
        cols = await sql.fetch(f"PRAGMA index_info('{row['name']}')")
        found.add(
            (row["tbl_name"], tuple(c["name"] for c in sorted(cols, key=lambda c: c["seqno"])))
        )
    return found


async def test_every_history_filter_and_lookup_has_its_index(app: object, backend: str) -> None:
    missing = EXPECTED_INDEXES - await _indexes(backend)
    assert missing == set()


async def test_check_constraints_exist(app: object, backend: str) -> None:
    if backend == "postgres":
        rows = await sql.fetch("SELECT conname FROM pg_constraint WHERE contype = 'c'")
        names = {r["conname"] for r in rows}
    else:
        rows = await sql.fetch("SELECT sql FROM sqlite_master WHERE type = 'table'")
        text = " ".join(r["sql"] or "" for r in rows)
        names = {n for n in EXPECTED_CHECKS if f'"{n}" CHECK' in text}
    assert names >= EXPECTED_CHECKS


async def test_database_refuses_a_negative_balance(app: object, account_id: str) -> None:
    from billing.accounts import ensure_account

    await ensure_account(account_id)
    with pytest.raises(Exception, match=r"(?i)check|constraint"):
        await sql.execute("UPDATE credit_account SET balance = -1 WHERE id = ?", account_id)


async def test_ledger_is_append_only_in_the_database(app: object, account_id: str) -> None:
    from billing.accounts import ensure_account
    from billing.enums import ProcessType, TransactionType
    from billing.ledger import posting

    await ensure_account(account_id)
    entry = await posting.post(
        posting.Movement(
            account_id=account_id,
            credits=5,
            type=TransactionType.GRANT,
            process_type=ProcessType.ADMINISTRATIVE,
            description="seed",
        )
    )
    entry_id = str(entry.id)
    with pytest.raises(Exception, match="append-only"):
        await sql.execute("UPDATE ledger_entry SET credits = 50 WHERE id = ?", entry_id)
    with pytest.raises(Exception, match="append-only"):
        await sql.execute("DELETE FROM ledger_entry WHERE id = ?", entry_id)


async def test_history_search_has_trigram_indexes_on_postgres(app: object, backend: str) -> None:
    if backend != "postgres":
        pytest.skip("a PostgreSQL (pg_trgm) index")
    rows = await sql.fetch(
        "SELECT indexname FROM pg_indexes WHERE tablename = 'ledger_entry' "
        "AND indexdef LIKE '%gin_trgm_ops%'"
    )
    assert {r["indexname"] for r in rows} == {
        "idx_ledger_entr_search_desc",
        "idx_ledger_entr_search_ref",
    }
