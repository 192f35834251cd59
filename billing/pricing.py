"""The price book: loaded once from a TOML file and validated."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from billing.enums import BillingMode, ProcessType

#: Process types that platform features spend; the others label non-usage entries.
FEATURE_PROCESSES: tuple[ProcessType, ...] = (
    ProcessType.HANDWRITTEN_LETTER,
    ProcessType.POSTCARD,
    ProcessType.ADVANCED_EMAIL_TEST,
    ProcessType.SOCIAL_MEDIA_APPEND,
    ProcessType.SMART_MATCH,
    ProcessType.PREMIUM_AUDIO_TRANSCRIPTION,
    ProcessType.BUSINESS_CARD_TRANSCRIPTION,
    ProcessType.PROSPECT_SEARCH,
)


@dataclass(frozen=True, slots=True)
class ProcessPrice:
    process_type: ProcessType
    billing: BillingMode
    credits_per_unit: int | None = None
    free_monthly_quota: int | None = None
    cents_per_unit: int | None = None


@dataclass(frozen=True, slots=True)
class PriceBook:
    version: str
    currency: str
    cents_per_credit: int
    min_purchase_credits: int
    max_purchase_credits: int
    processes: tuple[ProcessPrice, ...]

    def process(self, process_type: ProcessType) -> ProcessPrice | None:
        for price in self.processes:
            if price.process_type is process_type:
                return price
        return None

    def amount_cents(self, credits: int) -> int:
        return credits * self.cents_per_credit


def _positive_int(data: dict[str, Any], key: str, where: str, *, zero: bool = False) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if zero else 1):
        raise ValueError(
            f"price book: {where}.{key} must be a {'non-negative' if zero else 'positive'} integer"
        )
    return value


def _process_price(process_type: ProcessType, entry: dict[str, Any], where: str) -> ProcessPrice:
    """One process type's price from its price book entry."""
    mode = BillingMode(entry["billing"])
    if mode is BillingMode.METERED:
        return ProcessPrice(
            process_type, mode, cents_per_unit=_positive_int(entry, "cents_per_unit", where)
        )
    if mode is BillingMode.FREE_QUOTA_THEN_PREPAID:
        return ProcessPrice(
            process_type,
            mode,
            credits_per_unit=_positive_int(entry, "credits_per_unit", where),
            free_monthly_quota=_positive_int(entry, "free_monthly_quota", where, zero=True),
        )
    return ProcessPrice(
        process_type, mode, credits_per_unit=_positive_int(entry, "credits_per_unit", where)
    )


def parse_price_book(data: dict[str, Any]) -> PriceBook:
    processes: list[ProcessPrice] = []
    raw = data.get("processes", {})
    for process_type in FEATURE_PROCESSES:
        entry = raw.get(process_type.value)
        where = f"processes.{process_type.value}"
        if entry is None:
            raise ValueError(f"price book: {where} is missing")
        processes.append(_process_price(process_type, entry, where))
    unknown = set(raw) - {p.value for p in FEATURE_PROCESSES}
    if unknown:
        raise ValueError(f"price book: unknown process types {sorted(unknown)}")
    book = PriceBook(
        version=str(data["version"]),
        currency=str(data.get("currency", "usd")).lower(),
        cents_per_credit=_positive_int(data, "cents_per_credit", "price book"),
        min_purchase_credits=_positive_int(data, "min_purchase_credits", "price book"),
        max_purchase_credits=_positive_int(data, "max_purchase_credits", "price book"),
        processes=tuple(processes),
    )
    if book.min_purchase_credits > book.max_purchase_credits:
        raise ValueError("price book: min_purchase_credits is above max_purchase_credits")
    if book.amount_cents(book.max_purchase_credits) > INT_MAX:
        # Every amount the API serves fits GraphQL's Int (DESIGN.md invariant 10).
        raise ValueError(
            "price book: max_purchase_credits x cents_per_credit passes 2,147,483,647 cents"
        )
    for price in book.processes:
        per_unit = price.credits_per_unit or price.cents_per_unit or 0
        if per_unit * MAX_UNITS_PER_CALL > INT_MAX:
            raise ValueError(f"price book: {price.process_type.value} costs too much per unit")
    return book


INT_MAX = 2**31 - 1
#: The most units one consumeCredits / recordMeteredUsage call takes (DESIGN.md section 3).
MAX_UNITS_PER_CALL = 10_000


@lru_cache(maxsize=8)
def load_price_book(path: Path) -> PriceBook:
    with path.open("rb") as fh:
        return parse_price_book(tomllib.load(fh))
