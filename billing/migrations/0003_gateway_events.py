from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    dependencies = [('billing', '0002_checks')]

    initial = False

    operations = [
        ops.CreateModel(
            name='GatewayEvent',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('source', fields.CharField(max_length=16)),
                ('external_id', fields.CharField(max_length=255)),
                ('type', fields.CharField(max_length=100)),
                ('payload', fields.JSONField(encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('received_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('processed_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('attempts', fields.IntField(default=0)),
                ('last_error', fields.CharField(null=True, max_length=500)),
            ],
            options={'table': 'gateway_event', 'app': 'billing', 'unique_together': (('source', 'external_id'),), 'indexes': [Index(fields=['processed_at', 'id'])], 'pk_attr': 'id', 'table_description': 'A payment gateway event (Stripe webhook), stored once by its id, processed by a job.'},
            bases=['Model'],
        ),
        ops.AddField(
            model_name='Account',
            name='flag_reason',
            field=fields.CharField(null=True, max_length=500),
        ),
        ops.AddField(
            model_name='Account',
            name='flagged_at',
            field=fields.DatetimeField(null=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name='Payment',
            name='refunded_cents',
            field=fields.BigIntField(default=0),
        ),
    ]
