"""A spend request: one usage item as given, and the same item once validated.

``validate`` checks what a ``consumeCredits`` call (or one batch item) asks for, once:
quantity, reference, account and user ids, the idempotency key, and that the process is
paid with credits. Every spending path (``usage.consume``, its transactional fallback,
``batch.consume_batch``) takes a ``SpendRequest`` and never checks it again.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from billing import idempotency
from billing.accounts import validate_account_id, validate_user_id
from billing.enums import BillingMode, ErrorCode, ProcessType, TransactionType
from billing.errors import Validator, fail
from billing.ledger.entries import Movement
from billing.pricing import PriceBook, ProcessPrice

MIN_QUANTITY = 1
MAX_QUANTITY = 10_000
MAX_REFERENCE = 255
OPERATION = "consumeCredits"

_DESCRIPTIONS = {
    ProcessType.HANDWRITTEN_LETTER: "Handwritten letter",
    ProcessType.POSTCARD: "Postcard",
    ProcessType.ADVANCED_EMAIL_TEST: "Advanced email test",
    ProcessType.SOCIAL_MEDIA_APPEND: "Social media append",
    ProcessType.SMART_MATCH: "Smart match",
    ProcessType.PROSPECT_SEARCH: "Prospect search",
    ProcessType.PREMIUM_AUDIO_TRANSCRIPTION: "Premium audio transcription",
    ProcessType.BUSINESS_CARD_TRANSCRIPTION: "Business card transcription",
}


@dataclass(frozen=True, slots=True)
class SpendItem:
    """One spend as asked for (not yet validated)."""

    account_id: str
    user_id: str
    process_type: ProcessType
    quantity: int
    reference: str | None
    idempotency_key: str


@dataclass(frozen=True, slots=True)
class SpendRequest:
    """A validated spend, with the price of its process."""

    item: SpendItem
    price: ProcessPrice

    @property
    def account_id(self) -> str:
        return self.item.account_id

    @property
    def key(self) -> str:
        return self.item.idempotency_key

    @property
    def params(self) -> dict[str, object]:
        """What the idempotency key is bound to (its fingerprint's input)."""
        return usage_params(
            self.item.user_id, self.item.process_type, self.item.quantity, self.item.reference
        )

    @property
    def credits_per_unit(self) -> int:
        return self.price.credits_per_unit or 0

    @property
    def free_allowance(self) -> int | None:
        """The free monthly quota, for a FREE_QUOTA_THEN_PREPAID process; else None."""
        if self.price.billing is BillingMode.FREE_QUOTA_THEN_PREPAID:
            return self.price.free_monthly_quota or 0
        return None

    def movement(self, *, free: int, entry_id: uuid.UUID) -> Movement:
        """The debit for the units that are not free."""
        i = self.item
        return Movement(
            account_id=i.account_id,
            credits=-(i.quantity - free) * self.credits_per_unit,
            type=TransactionType.USAGE,
            process_type=i.process_type,
            description=describe_usage(i.process_type, i.quantity, free),
            user_id=i.user_id,
            reference=i.reference,
            quantity=i.quantity,
            entry_id=entry_id,
        )


def validate(book: PriceBook, item: SpendItem) -> SpendRequest:
    """The item, validated; raises ``BillingError`` (every input error at once, then the
    process's and the key's)."""
    v = Validator()
    check_usage_input(v, item.quantity, item.reference, item.account_id, item.user_id)
    v.check()
    price = prepaid_price(book, item.process_type)
    idempotency.check_key(item.idempotency_key)
    return SpendRequest(item, price)


def check_usage_input(
    v: Validator, quantity: int, reference: str | None, account_id: str, user_id: str
) -> None:
    """The checks every usage call shares (prepaid and metered)."""
    if not MIN_QUANTITY <= quantity <= MAX_QUANTITY:
        v.add(f"quantity must be {MIN_QUANTITY} to {MAX_QUANTITY:,}", "quantity")
    if reference is not None and len(reference) > MAX_REFERENCE:
        v.add(f"reference must be at most {MAX_REFERENCE} characters", "reference")
    validate_account_id(v, account_id, "accountId")
    validate_user_id(v, user_id, "userId")


def prepaid_price(book: PriceBook, process_type: ProcessType) -> ProcessPrice:
    price = book.process(process_type)
    if price is None or price.billing is BillingMode.METERED:
        hint = " (it is metered: use recordMeteredUsage)" if price else ""
        raise fail(
            ErrorCode.VALIDATION,
            f"{process_type.value} cannot be paid with credits{hint}",
            "processType",
        )
    return price


def usage_params(
    user_id: str, process_type: ProcessType, quantity: int, reference: str | None
) -> dict[str, object]:
    return {
        "userId": user_id,
        "processType": process_type.value,
        "quantity": quantity,
        "reference": reference,
    }


def describe_usage(process_type: ProcessType, quantity: int, free: int) -> str:
    label = _DESCRIPTIONS.get(process_type, process_type.value)
    return f"{label} x {quantity}" + (f" ({free} free)" if free else "")
