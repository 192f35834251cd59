from tortoise import fields, migrations
from tortoise.indexes import Index
from tortoise.migrations import operations as ops

# Invariant 10: every figure the API serves fits GraphQL's Int (2**31 - 1). The code refuses
# a movement past it with BALANCE_LIMIT before writing; the database holds the same bound.
# PostgreSQL gets CHECK constraints; SQLite gets triggers (an AddConstraint there rebuilds
# the table, losing its indexes and the ledger's append-only triggers).
INT_MAX = 2**31 - 1

_BOUNDS = {
    "credit_account": ("balance",),
    "ledger_entry": ("balance_after", "credits"),
    "payment": ("credits", "amount_cents", "refunded_cents"),
    "invoice": ("amount_cents", "carried_in_cents"),
    "invoice_line": ("amount_cents", "quantity"),
    "metered_usage": ("amount_cents",),
}


def _condition(columns: tuple[str, ...], prefix: str = "") -> str:
    return " AND ".join(
        f"{prefix}{c} BETWEEN -{INT_MAX} AND {INT_MAX}" for c in columns
    )


async def int_bounds(apps, schema_editor):
    client = schema_editor.client
    for table, columns in _BOUNDS.items():
        if client.capabilities.dialect == "postgres":
            await client.execute_script(
                f"ALTER TABLE {table} ADD CONSTRAINT {table}_int_bound "
                f"CHECK ({_condition(columns)});"
            )
        else:
            for op in ("INSERT", "UPDATE"):
                await client.execute_script(
                    f"CREATE TRIGGER {table}_int_bound_{op.lower()} BEFORE {op} ON {table} "
                    f"WHEN NOT ({_condition(columns, 'NEW.')}) "
                    f"BEGIN SELECT RAISE(ABORT, 'CHECK constraint failed: {table}_int_bound'); END;"
                )


async def drop_int_bounds(apps, schema_editor):
    client = schema_editor.client
    for table in _BOUNDS:
        if client.capabilities.dialect == "postgres":
            await client.execute_script(
                f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {table}_int_bound;"
            )
        else:
            for op in ("insert", "update"):
                await client.execute_script(f"DROP TRIGGER IF EXISTS {table}_int_bound_{op};")


class Migration(migrations.Migration):
    dependencies = [("billing", "0007_search_index")]

    initial = False

    operations = [
        ops.AddField(
            model_name="Account",
            name="recharge_crossed",
            field=fields.BooleanField(default=False, db_default=False),
        ),
        ops.AddField(
            model_name="Payment",
            name="gateway_checked_at",
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name="GatewayEvent",
            name="outcome",
            field=fields.CharField(max_length=16, null=True),
        ),
        ops.AddField(
            model_name="GatewayEvent",
            name="object_id",
            field=fields.CharField(max_length=255, null=True),
        ),
        ops.AddIndex(
            model_name="GatewayEvent",
            index=Index(fields=["object_id", "type"]),
        ),
        ops.AddField(
            model_name="Invoice",
            name="carried_in_cents",
            field=fields.BigIntField(default=0, db_default=0),
        ),
        ops.AddField(
            model_name="Invoice",
            name="carried_into_id",
            field=fields.UUIDField(null=True),
        ),
        ops.RunPython(int_bounds, drop_int_bounds),
    ]
