from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from billing.enums import InvoiceStatus, ProcessType
from json import dumps, loads
from tortoise.fields.base import OnDelete
from uuid import uuid4
from tortoise import fields
from tortoise.indexes import Index
from tortoise.migrations.constraints import CheckConstraint

# On SQLite the payment table is rebuilt (its CHECK changes) and loses its secondary
# indexes (Tortoise 1.1): put them back. tests/api/test_schema.py checks every index.
_SQLITE_PAYMENT_INDEXES = """
CREATE INDEX IF NOT EXISTS idx_payment_account_49be1c ON payment (account_id, created_at);
CREATE INDEX IF NOT EXISTS idx_payment_status_f4da9c ON payment (status, updated_at);
"""


async def restore_sqlite_indexes(apps, schema_editor):
    client = schema_editor.client
    if client.capabilities.dialect == "sqlite":
        await client.execute_script(_SQLITE_PAYMENT_INDEXES)


class Migration(migrations.Migration):
    dependencies = [('billing', '0003_gateway_events')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Invoice',
            fields=[
                ('id', fields.UUIDField(primary_key=True, default=uuid4, unique=True, db_index=True)),
                ('account', fields.ForeignKeyField('billing.Account', source_field='account_id', db_constraint=True, to_field='id', related_name='invoices', on_delete=OnDelete.RESTRICT)),
                ('period_start', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('period_end', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('status', fields.CharEnumField(description='OPEN: OPEN\nPAID: PAID\nFAILED: FAILED', enum_type=InvoiceStatus, max_length=16)),
                ('amount_cents', fields.BigIntField()),
                ('currency', fields.CharField(max_length=3)),
                ('attempts', fields.IntField(default=0)),
                ('next_attempt_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('paid_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('failure_message', fields.CharField(null=True, max_length=500)),
                ('payment', fields.ForeignKeyField('billing.Payment', source_field='payment_id', null=True, db_constraint=True, to_field='id', related_name='invoices', on_delete=OnDelete.RESTRICT)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'invoice', 'app': 'billing', 'unique_together': (('account', 'period_start'),), 'indexes': [Index(fields=['status', 'next_attempt_at'])], 'pk_attr': 'id', 'table_description': 'A month of metered usage, charged to the card on file.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='InvoiceLine',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('invoice', fields.ForeignKeyField('billing.Invoice', source_field='invoice_id', db_constraint=True, to_field='id', related_name='lines', on_delete=OnDelete.RESTRICT)),
                ('process_type', fields.CharEnumField(description='MANUAL_PURCHASE: MANUAL_PURCHASE\nAUTO_RECHARGE: AUTO_RECHARGE\nHANDWRITTEN_LETTER: HANDWRITTEN_LETTER\nPOSTCARD: POSTCARD\nADVANCED_EMAIL_TEST: ADVANCED_EMAIL_TEST\nSOCIAL_MEDIA_APPEND: SOCIAL_MEDIA_APPEND\nSMART_MATCH: SMART_MATCH\nPREMIUM_AUDIO_TRANSCRIPTION: PREMIUM_AUDIO_TRANSCRIPTION\nBUSINESS_CARD_TRANSCRIPTION: BUSINESS_CARD_TRANSCRIPTION\nPROSPECT_SEARCH: PROSPECT_SEARCH\nADMINISTRATIVE: ADMINISTRATIVE', enum_type=ProcessType, max_length=32)),
                ('quantity', fields.BigIntField()),
                ('amount_cents', fields.BigIntField()),
            ],
            options={'table': 'invoice_line', 'app': 'billing', 'pk_attr': 'id', 'table_description': "One process type's usage on an invoice."},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Notification',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('account', fields.ForeignKeyField('billing.Account', source_field='account_id', db_constraint=True, to_field='id', related_name='notifications', on_delete=OnDelete.RESTRICT)),
                ('kind', fields.CharField(max_length=32)),
                ('dedupe_key', fields.CharField(unique=True, max_length=255)),
                ('recipients', fields.JSONField(default=list, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('subject', fields.CharField(max_length=300)),
                ('body', fields.TextField(unique=False)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('sent_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('attempts', fields.IntField(default=0)),
                ('next_attempt_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('last_error', fields.CharField(null=True, max_length=500)),
            ],
            options={'table': 'notification', 'app': 'billing', 'indexes': [Index(fields=['sent_at', 'next_attempt_at'])], 'pk_attr': 'id', 'table_description': 'An e-mail to send: written in the transaction of the event, sent by a job.'},
            bases=['Model'],
        ),
        ops.AddField(
            model_name='Account',
            name='recharge_seq',
            field=fields.IntField(default=0),
        ),
        ops.AddField(
            model_name='Account',
            name='recharge_threshold',
            field=fields.BigIntField(null=True),
        ),
        ops.AddField(
            model_name='AutoRechargeSetting',
            name='next_attempt_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.RemoveConstraint(
            model_name='Payment',
            name='payment_credits_positive',
            fields=None,
        ),
        ops.AddField(
            model_name='Payment',
            name='trigger_key',
            field=fields.CharField(null=True, unique=True, max_length=255),
        ),
        ops.AddConstraint(
            model_name='Payment',
            constraint=CheckConstraint(check='credits >= 0', name='payment_credits_nonneg'),
        ),
        ops.RunPython(restore_sqlite_indexes, ops.RunPython.noop),
    ]
