from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise.indexes import Index
from tortoise.migrations.constraints import CheckConstraint

# The initial migration drops CheckConstraints, so they are added here; on SQLite each
# AddConstraint rebuilds the table. The ledger is append-only: triggers refuse UPDATE,
# DELETE (and TRUNCATE on PostgreSQL) of ledger entries.

_POSTGRES_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION ledger_entry_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entry is append-only: % refused', TG_OP;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER ledger_entry_append_only BEFORE UPDATE OR DELETE ON ledger_entry
    FOR EACH ROW EXECUTE FUNCTION ledger_entry_append_only();
CREATE TRIGGER ledger_entry_no_truncate BEFORE TRUNCATE ON ledger_entry
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entry_append_only();
"""

_SQLITE_APPEND_ONLY = """
CREATE TRIGGER ledger_entry_no_update BEFORE UPDATE ON ledger_entry
BEGIN SELECT RAISE(ABORT, 'ledger_entry is append-only: UPDATE refused'); END;
CREATE TRIGGER ledger_entry_no_delete BEFORE DELETE ON ledger_entry
BEGIN SELECT RAISE(ABORT, 'ledger_entry is append-only: DELETE refused'); END;
"""


# On SQLite, AddConstraint rebuilds the table and loses its secondary indexes (Tortoise
# 1.1): put them back under the names PostgreSQL keeps. tests/api/test_schema.py checks both.
_SQLITE_REBUILT_INDEXES = """
CREATE UNIQUE INDEX IF NOT EXISTS uid_free_quota__account_6e633f
    ON free_quota_usage (account_id, process_type, period_start);
CREATE INDEX IF NOT EXISTS idx_ledger_entr_account_4628e8
    ON ledger_entry (account_id, process_type, created_at, id);
CREATE INDEX IF NOT EXISTS idx_ledger_entr_account_5ab368
    ON ledger_entry (account_id, created_at, id);
CREATE INDEX IF NOT EXISTS idx_ledger_entr_account_6f8589
    ON ledger_entry (account_id, type, created_at, id);
CREATE INDEX IF NOT EXISTS idx_ledger_entr_account_798230
    ON ledger_entry (account_id, user_id, created_at, id);
CREATE INDEX IF NOT EXISTS idx_metered_usa_account_ca5423 ON metered_usage (account_id, created_at);
CREATE INDEX IF NOT EXISTS idx_payment_account_49be1c ON payment (account_id, created_at);
CREATE INDEX IF NOT EXISTS idx_payment_status_f4da9c ON payment (status, updated_at);
"""


async def append_only(apps, schema_editor):
    client = schema_editor.client
    if client.capabilities.dialect == "postgres":
        await client.execute_script(_POSTGRES_APPEND_ONLY)
    else:
        await client.execute_script(_SQLITE_REBUILT_INDEXES + _SQLITE_APPEND_ONLY)


async def drop_append_only(apps, schema_editor):
    client = schema_editor.client
    if client.capabilities.dialect == "postgres":
        await client.execute_script(
            "DROP TRIGGER IF EXISTS ledger_entry_append_only ON ledger_entry;"
            "DROP TRIGGER IF EXISTS ledger_entry_no_truncate ON ledger_entry;"
            "DROP FUNCTION IF EXISTS ledger_entry_append_only();"
        )
    else:
        await client.execute_script(
            "DROP TRIGGER IF EXISTS ledger_entry_no_update;"
            "DROP TRIGGER IF EXISTS ledger_entry_no_delete;"
        )


class Migration(migrations.Migration):
    dependencies = [('billing', '0001_initial')]

    initial = False

    operations = [
        ops.AddConstraint(
            model_name='Account',
            constraint=CheckConstraint(check='balance >= 0', name='credit_account_balance_nonneg'),
        ),
        ops.AlterModelOptions(
            name='AutoRechargeSetting',
            options={'table': 'auto_recharge_setting', 'app': 'billing', 'indexes': [Index(fields=['enabled', 'trigger', 'next_run_at'])], 'pk_attr': 'account_id', 'table_description': "An account's auto-recharge setting (one row per account once it has been saved)."},
        ),
        ops.AddConstraint(
            model_name='FreeQuotaUsage',
            constraint=CheckConstraint(check='used >= 0', name='free_quota_usage_used_nonneg'),
        ),
        ops.AddConstraint(
            model_name='LedgerEntry',
            constraint=CheckConstraint(check='credits <> 0', name='ledger_entry_credits_nonzero'),
        ),
        ops.AddConstraint(
            model_name='LedgerEntry',
            constraint=CheckConstraint(check='balance_after >= 0', name='ledger_entry_balance_nonneg'),
        ),
        ops.AddConstraint(
            model_name='MeteredUsage',
            constraint=CheckConstraint(check='quantity > 0', name='metered_usage_quantity_positive'),
        ),
        ops.AddConstraint(
            model_name='MeteredUsage',
            constraint=CheckConstraint(check='amount_cents >= 0', name='metered_usage_amount_nonneg'),
        ),
        ops.AddConstraint(
            model_name='Payment',
            constraint=CheckConstraint(check='credits > 0', name='payment_credits_positive'),
        ),
        ops.AddConstraint(
            model_name='Payment',
            constraint=CheckConstraint(check='amount_cents > 0', name='payment_amount_positive'),
        ),
        ops.RunPython(append_only, drop_append_only),
    ]
