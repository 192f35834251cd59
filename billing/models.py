"""Tortoise ORM models. Credits and cents are integers, the ledger is append-only.

Table and column names are fixed (db_table) because a few hot paths use raw SQL.
"""

from __future__ import annotations

from tortoise import fields
from tortoise.indexes import Index
from tortoise.migrations.constraints import CheckConstraint
from tortoise.models import Model

from billing.enums import (
    AutoRechargeTrigger,
    InvoiceStatus,
    PaymentKind,
    PaymentStatus,
    ProcessType,
    TransactionType,
)


class Account(Model):
    """A customer account, mirrored lazily from the platform's identity."""

    id = fields.CharField(primary_key=True, max_length=64)
    balance = fields.BigIntField(default=0)
    timezone = fields.CharField(max_length=64, default="UTC")
    gateway_customer_id = fields.CharField(max_length=255, null=True)
    recharge_threshold = fields.BigIntField(null=True)  # set while THRESHOLD auto-recharge is on
    recharge_seq = fields.IntField(default=0)  # bumps when a threshold recharge settles
    # A threshold crossing not yet served: set by the debit that took the balance from at or
    # above the threshold to below it (or by saving the setting while below); cleared by the
    # recharge that serves it. See billing/crossing.py.
    recharge_crossed = fields.BooleanField(default=False, db_default=False)
    low_balance_level = fields.BigIntField(null=True)  # the admins' low-balance alert (None: off)
    flag_reason = fields.CharField(max_length=500, null=True)
    flagged_at = fields.DatetimeField(null=True)
    created_at = fields.DatetimeField(auto_now_add=True)

    class Meta:
        table = "credit_account"
        indexes = (Index(fields=("recharge_threshold",)),)
        constraints = (CheckConstraint(check="balance >= 0", name="credit_account_balance_nonneg"),)


class Member(Model):
    """A user seen on a signed token (or named by a service), for history and notices."""

    id = fields.BigIntField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="members", on_delete=fields.RESTRICT
    )
    account_id: str
    user_id = fields.CharField(max_length=128)
    email = fields.CharField(max_length=320, null=True)
    name = fields.CharField(max_length=200, null=True)
    is_admin = fields.BooleanField(default=False)
    updated_at = fields.DatetimeField(auto_now=True)

    class Meta:
        table = "member"
        unique_together = (("account", "user_id"),)


class Card(Model):
    """A card on file: a gateway PaymentMethod id plus display details, never the number."""

    id = fields.UUIDField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="cards", on_delete=fields.RESTRICT
    )
    account_id: str
    gateway_payment_method_id = fields.CharField(max_length=255)
    brand = fields.CharField(max_length=32)
    last4 = fields.CharField(max_length=4)
    exp_month = fields.SmallIntField()
    exp_year = fields.SmallIntField()
    cardholder_name = fields.CharField(max_length=200, null=True)
    address_line1 = fields.CharField(max_length=200, null=True)
    address_line2 = fields.CharField(max_length=200, null=True)
    address_city = fields.CharField(max_length=200, null=True)
    address_state = fields.CharField(max_length=200, null=True)
    address_postal_code = fields.CharField(max_length=32, null=True)
    address_country = fields.CharField(max_length=2, null=True)
    is_primary = fields.BooleanField(default=False)
    created_at = fields.DatetimeField()
    removed_at = fields.DatetimeField(null=True)

    class Meta:
        table = "card"
        indexes = (Index(fields=("account_id", "removed_at", "created_at")),)


class Payment(Model):
    """One attempt to take money from a card, written before the gateway is called."""

    id = fields.UUIDField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="payments", on_delete=fields.RESTRICT
    )
    account_id: str
    card: fields.ForeignKeyNullableRelation[Card] = fields.ForeignKeyField(
        "billing.Card", related_name="payments", null=True, on_delete=fields.RESTRICT
    )
    card_id: str | None
    kind = fields.CharEnumField(PaymentKind, max_length=16)
    status = fields.CharEnumField(PaymentStatus, max_length=16)
    credits = fields.BigIntField()
    amount_cents = fields.BigIntField()
    currency = fields.CharField(max_length=3)
    gateway_payment_id = fields.CharField(max_length=255, null=True, unique=True)
    client_secret = fields.CharField(max_length=255, null=True)
    failure_code = fields.CharField(max_length=64, null=True)
    failure_message = fields.CharField(max_length=500, null=True)
    refunded_cents = fields.BigIntField(default=0)
    trigger_key = fields.CharField(max_length=255, null=True, unique=True)
    settled_at = fields.DatetimeField(null=True)  # auto-recharge outcome booked on its setting
    # when the sweep last re-read a payment the gateway may still move (requires_action, a
    # retryable failure) at the gateway
    gateway_checked_at = fields.DatetimeField(null=True)
    created_by = fields.CharField(max_length=128, null=True)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "payment"
        constraints = (
            CheckConstraint(check="credits >= 0", name="payment_credits_nonneg"),
            CheckConstraint(check="amount_cents > 0", name="payment_amount_positive"),
        )
        indexes = (
            Index(fields=("account_id", "created_at")),
            Index(fields=("status", "updated_at")),
        )


class LedgerEntry(Model):
    """An append-only credit movement. credits is signed, balance_after is stored."""

    id = fields.UUIDField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="entries", on_delete=fields.RESTRICT
    )
    account_id: str
    created_at = fields.DatetimeField()
    type = fields.CharEnumField(TransactionType, max_length=16)
    process_type = fields.CharEnumField(ProcessType, max_length=32)
    credits = fields.BigIntField()
    balance_after = fields.BigIntField()
    quantity = fields.IntField(null=True)
    user_id = fields.CharField(max_length=128, null=True)
    description = fields.CharField(max_length=500)
    reference = fields.CharField(max_length=255, null=True)
    payment: fields.ForeignKeyNullableRelation[Payment] = fields.ForeignKeyField(
        "billing.Payment", related_name="entries", null=True, on_delete=fields.RESTRICT
    )
    payment_id: str | None
    reverses_entry_id = fields.UUIDField(null=True, unique=True)

    class Meta:
        table = "ledger_entry"
        constraints = (
            CheckConstraint(check="credits <> 0", name="ledger_entry_credits_nonzero"),
            CheckConstraint(check="balance_after >= 0", name="ledger_entry_balance_nonneg"),
        )
        indexes = (
            Index(fields=("account_id", "created_at", "id")),
            Index(fields=("account_id", "type", "created_at", "id")),
            Index(fields=("account_id", "process_type", "created_at", "id")),
            Index(fields=("account_id", "user_id", "created_at", "id")),
        )


class IdempotencyRecord(Model):
    """What a keyed write did, so a retry replays it and a different request is refused."""

    id = fields.BigIntField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="idempotency_records", on_delete=fields.RESTRICT
    )
    account_id: str
    key = fields.CharField(max_length=255)
    operation = fields.CharField(max_length=64)
    fingerprint = fields.CharField(max_length=64)
    result: fields.Field[dict[str, object]] = fields.JSONField()
    created_at = fields.DatetimeField()

    class Meta:
        table = "idempotency_record"
        unique_together = (("account", "key"),)


class FreeQuotaUsage(Model):
    """Free units used of a process's monthly allowance, one row per account, process, month."""

    id = fields.BigIntField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="free_quota_usage", on_delete=fields.RESTRICT
    )
    account_id: str
    process_type = fields.CharEnumField(ProcessType, max_length=32)
    period_start = fields.DatetimeField()
    used = fields.IntField(default=0)

    class Meta:
        table = "free_quota_usage"
        constraints = (CheckConstraint(check="used >= 0", name="free_quota_usage_used_nonneg"),)
        unique_together = (("account", "process_type", "period_start"),)


class MeteredUsage(Model):
    """A metered (invoiced monthly) use, priced in cents when it is recorded."""

    id = fields.UUIDField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="metered_usage", on_delete=fields.RESTRICT
    )
    account_id: str
    user_id = fields.CharField(max_length=128)
    process_type = fields.CharEnumField(ProcessType, max_length=32)
    quantity = fields.IntField()
    unit_cents = fields.IntField()
    amount_cents = fields.BigIntField()
    reference = fields.CharField(max_length=255, null=True)
    created_at = fields.DatetimeField()

    class Meta:
        table = "metered_usage"
        constraints = (
            CheckConstraint(check="quantity > 0", name="metered_usage_quantity_positive"),
            CheckConstraint(check="amount_cents >= 0", name="metered_usage_amount_nonneg"),
        )
        indexes = (Index(fields=("account_id", "created_at")),)


class AutoRechargeSetting(Model):
    """An account's auto-recharge setting (one row per account once it has been saved)."""

    account: fields.OneToOneRelation[Account] = fields.OneToOneField(
        "billing.Account", related_name="auto_recharge", primary_key=True, on_delete=fields.RESTRICT
    )
    account_id: str
    enabled = fields.BooleanField(default=False)
    trigger = fields.CharEnumField(AutoRechargeTrigger, max_length=16, null=True)
    interval_days = fields.IntField(null=True)
    threshold_credits = fields.BigIntField(null=True)
    recharge_credits = fields.BigIntField(null=True)
    use_primary_card = fields.BooleanField(default=True)
    card: fields.ForeignKeyNullableRelation[Card] = fields.ForeignKeyField(
        "billing.Card", related_name="auto_recharge_settings", null=True, on_delete=fields.RESTRICT
    )
    card_id: str | None
    notify = fields.BooleanField(default=False)
    notify_emails: fields.Field[list[str]] = fields.JSONField(default=list)
    monthly_limit_credits = fields.BigIntField(null=True)
    next_run_at = fields.DatetimeField(null=True)
    last_run_at = fields.DatetimeField(null=True)
    consecutive_failures = fields.IntField(default=0)
    next_attempt_at = fields.DatetimeField(null=True)  # backoff after a decline
    paused_reason = fields.CharField(max_length=500, null=True)
    updated_at = fields.DatetimeField(auto_now=True)

    def threshold_level(self) -> int | None:
        """What credit_account.recharge_threshold holds while this setting is in force."""
        if (
            self.enabled
            and self.trigger is AutoRechargeTrigger.THRESHOLD
            and self.paused_reason is None
            and self.threshold_credits is not None
        ):
            return int(self.threshold_credits)
        return None

    class Meta:
        table = "auto_recharge_setting"
        indexes = (Index(fields=("enabled", "trigger", "next_run_at")),)


class GatewayEvent(Model):
    """A payment gateway event (Stripe webhook), stored once by its id, processed by a job."""

    id = fields.BigIntField(primary_key=True)
    source = fields.CharField(max_length=16)
    external_id = fields.CharField(max_length=255)
    type = fields.CharField(max_length=100)
    payload: fields.Field[dict[str, object]] = fields.JSONField()
    received_at = fields.DatetimeField()
    processed_at = fields.DatetimeField(null=True)
    attempts = fields.IntField(default=0)
    last_error = fields.CharField(max_length=500, null=True)
    # what processing made of it: applied, ignored (not ours), pending (waits for a state
    # it needs: retried by the sweep), mismatch (the object contradicts our payment)
    outcome = fields.CharField(max_length=16, null=True)
    object_id = fields.CharField(max_length=255, null=True)  # data.object.id (a dispute's, say)

    class Meta:
        table = "gateway_event"
        unique_together = (("source", "external_id"),)
        indexes = (Index(fields=("processed_at", "id")), Index(fields=("object_id", "type")))


class Notification(Model):
    """An e-mail to send: written in the transaction of the event, sent by a job."""

    id = fields.BigIntField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="notifications", on_delete=fields.RESTRICT
    )
    account_id: str
    kind = fields.CharField(max_length=32)
    dedupe_key = fields.CharField(max_length=255, unique=True)
    recipients: fields.Field[list[str]] = fields.JSONField(default=list)
    subject = fields.CharField(max_length=300)
    body = fields.TextField()
    created_at = fields.DatetimeField()
    sent_at = fields.DatetimeField(null=True)
    attempts = fields.IntField(default=0)
    next_attempt_at = fields.DatetimeField(null=True)
    last_error = fields.CharField(max_length=500, null=True)

    class Meta:
        table = "notification"
        indexes = (Index(fields=("sent_at", "next_attempt_at")),)


class Invoice(Model):
    """A month of metered usage, charged to the card on file."""

    lines: fields.ReverseRelation[InvoiceLine]  # InvoiceLine.invoice's related_name

    id = fields.UUIDField(primary_key=True)
    account: fields.ForeignKeyRelation[Account] = fields.ForeignKeyField(
        "billing.Account", related_name="invoices", on_delete=fields.RESTRICT
    )
    account_id: str
    period_start = fields.DatetimeField()
    period_end = fields.DatetimeField()
    status = fields.CharEnumField(InvoiceStatus, max_length=16)
    amount_cents = fields.BigIntField()
    currency = fields.CharField(max_length=3)
    attempts = fields.IntField(default=0)
    next_attempt_at = fields.DatetimeField(null=True)
    paid_at = fields.DatetimeField(null=True)
    failure_message = fields.CharField(max_length=500, null=True)
    payment: fields.ForeignKeyNullableRelation[Payment] = fields.ForeignKeyField(
        "billing.Payment", related_name="invoices", null=True, on_delete=fields.RESTRICT
    )
    payment_id: str | None
    # cents of earlier months carried into this invoice (each under the minimum charge)
    carried_in_cents = fields.BigIntField(default=0, db_default=0)
    # set on a CARRIED_FORWARD invoice once a later invoice took its amount
    carried_into_id = fields.UUIDField(null=True)
    created_at = fields.DatetimeField()

    class Meta:
        table = "invoice"
        unique_together = (("account", "period_start"),)
        indexes = (Index(fields=("status", "next_attempt_at")),)


class InvoiceLine(Model):
    """One process type's usage on an invoice."""

    id = fields.BigIntField(primary_key=True)
    invoice: fields.ForeignKeyRelation[Invoice] = fields.ForeignKeyField(
        "billing.Invoice", related_name="lines", on_delete=fields.RESTRICT
    )
    invoice_id: str
    process_type = fields.CharEnumField(ProcessType, max_length=32)
    quantity = fields.BigIntField()
    amount_cents = fields.BigIntField()

    class Meta:
        table = "invoice_line"
