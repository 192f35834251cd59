from tortoise import migrations
from tortoise.migrations import operations as ops

# History search is a case-insensitive substring of description or reference. On
# PostgreSQL a trigram index (pg_trgm) on exactly the expressions the ORM's icontains
# produces lets a rare term be found without reading every entry of a large account.
# CREATE EXTENSION needs a superuser (or the extension already installed): without it the
# index is skipped and search still works, scanning the account's entries.

_EXPRESSIONS = {
    "idx_ledger_entr_search_desc": 'UPPER(CAST("description" AS VARCHAR))',
    "idx_ledger_entr_search_ref": 'UPPER(CAST("reference" AS VARCHAR))',
}


async def search_indexes(apps, schema_editor):
    client = schema_editor.client
    if client.capabilities.dialect != "postgres":
        return
    _, rows = await client.execute_query(
        "SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'pg_trgm') AS installed, "
        "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser, "
        "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm') AS available"
    )
    row = dict(rows[0])
    if not row["installed"]:
        if not (row["superuser"] and row["available"]):
            return
        await client.execute_script("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    for name, expression in _EXPRESSIONS.items():
        await client.execute_script(
            f"CREATE INDEX IF NOT EXISTS {name} ON ledger_entry "
            f"USING gin (({expression}) gin_trgm_ops)"
        )


async def drop_search_indexes(apps, schema_editor):
    client = schema_editor.client
    if client.capabilities.dialect == "postgres":
        for name in _EXPRESSIONS:
            await client.execute_script(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [("billing", "0006_low_balance")]

    initial = False

    operations = [
        ops.RunPython(search_indexes, drop_search_indexes),
    ]
