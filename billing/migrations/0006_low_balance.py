from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('billing', '0005_recharge')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Account',
            name='low_balance_level',
            field=fields.BigIntField(null=True),
        ),
    ]
