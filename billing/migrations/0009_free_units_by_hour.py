from tortoise import migrations
from tortoise.migrations import operations as ops

# Free-quota units by the hour, for the billing page's usage chart (creditAccount.usage).
# free_quota_usage keeps one counter per account, process and month; a use wholly covered
# by the free quota writes no ledger entry, so nothing else says on which day it happened.
# A trigger on the counter adds each increase to the hour's row, whichever code path (a
# single spend or a batch) took the units; the counter's row lock already serialises them.

_POSTGRES = """
CREATE TABLE IF NOT EXISTS free_quota_hour (
    account_id VARCHAR(64) NOT NULL,
    process_type VARCHAR(32) NOT NULL,
    hour_start TIMESTAMPTZ NOT NULL,
    used BIGINT NOT NULL CHECK (used >= 0),
    PRIMARY KEY (account_id, process_type, hour_start)
);
CREATE OR REPLACE FUNCTION free_quota_usage_by_hour() RETURNS trigger AS $$
BEGIN
    IF NEW.used > OLD.used THEN
        INSERT INTO free_quota_hour (account_id, process_type, hour_start, used)
        VALUES (NEW.account_id, NEW.process_type, date_trunc('hour', now() AT TIME ZONE 'UTC')
                AT TIME ZONE 'UTC', NEW.used - OLD.used)
        ON CONFLICT (account_id, process_type, hour_start)
        DO UPDATE SET used = free_quota_hour.used + EXCLUDED.used;
    END IF;
    RETURN NEW;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS free_quota_usage_by_hour ON free_quota_usage;
CREATE TRIGGER free_quota_usage_by_hour AFTER UPDATE OF used ON free_quota_usage
    FOR EACH ROW EXECUTE FUNCTION free_quota_usage_by_hour();
"""

# SQLite: the hour as text, 'YYYY-MM-DD HH' in UTC (how billing.insights groups it).
_SQLITE = """
CREATE TABLE IF NOT EXISTS free_quota_hour (
    account_id VARCHAR(64) NOT NULL,
    process_type VARCHAR(32) NOT NULL,
    hour_start VARCHAR(13) NOT NULL,
    used BIGINT NOT NULL CHECK (used >= 0),
    PRIMARY KEY (account_id, process_type, hour_start)
);
CREATE TRIGGER IF NOT EXISTS free_quota_usage_by_hour AFTER UPDATE OF used ON free_quota_usage
WHEN NEW.used > OLD.used
BEGIN
    INSERT INTO free_quota_hour (account_id, process_type, hour_start, used)
    VALUES (NEW.account_id, NEW.process_type, strftime('%Y-%m-%d %H', 'now'), NEW.used - OLD.used)
    ON CONFLICT (account_id, process_type, hour_start) DO UPDATE SET used = used + excluded.used;
END;
"""


async def create(apps, schema_editor):
    client = schema_editor.client
    await client.execute_script(_POSTGRES if client.capabilities.dialect == "postgres" else _SQLITE)


async def drop(apps, schema_editor):
    client = schema_editor.client
    if client.capabilities.dialect == "postgres":
        await client.execute_script(
            "DROP TRIGGER IF EXISTS free_quota_usage_by_hour ON free_quota_usage;"
            "DROP FUNCTION IF EXISTS free_quota_usage_by_hour();"
            "DROP TABLE IF EXISTS free_quota_hour;"
        )
    else:
        await client.execute_script(
            "DROP TRIGGER IF EXISTS free_quota_usage_by_hour; DROP TABLE IF EXISTS free_quota_hour;"
        )


class Migration(migrations.Migration):
    dependencies = [("billing", "0008_money_rules")]

    initial = False

    operations = [ops.RunPython(create, drop)]
