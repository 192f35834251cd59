"""Cards on file. The gateway holds the card; we keep brand, last4, expiry and address.

Every flow here that calls the gateway owns its transactions and never holds one across
a gateway call (the transaction rule, ``api/graphql/run.py``): the gateway call comes
first (or after commit), and the database change runs in its own short transaction,
under the account lock, so the primary and last-card rules hold under concurrency.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass

from tortoise.transactions import in_transaction

from billing import sql
from billing.accounts import ensure_account
from billing.enums import ErrorCode, NotificationKind
from billing.errors import Validator, fail
from billing.ledger import posting
from billing.models import Account, AutoRechargeSetting, Card
from billing.notifications import outbox
from billing.payments.gateways import (
    Address,
    CardChanges,
    CardDetails,
    CardRejected,
    PaymentGateway,
)

MAX_CARDS = 20
MAX_NAME = 200
MAX_ADDRESS_LINE = 200
MAX_POSTAL_CODE = 32
_COUNTRY = re.compile(r"^[A-Z]{2}$")
_PM_ID = re.compile(r"^pm_[A-Za-z0-9_]{1,250}$")
log = logging.getLogger(__name__)


def address_of(card: Card) -> Address | None:
    """The card's billing address (None when none of it is known)."""
    address = Address(
        card.address_line1,
        card.address_line2,
        card.address_city,
        card.address_state,
        card.address_postal_code,
        card.address_country,
    )
    return None if address == Address() else address


def _not_found() -> Exception:
    return fail(ErrorCode.NOT_FOUND, "No such card.", "cardId")


async def get_card(card_id: uuid.UUID | None, scope_account_id: str | None) -> Card:
    """An active card, visible only within ``scope_account_id`` (None: billing staff)."""
    if card_id is None:
        raise _not_found()
    query = Card.filter(id=card_id, removed_at=None)
    if scope_account_id is not None:
        query = query.filter(account_id=scope_account_id)
    card = await query.first()
    if card is None:
        raise _not_found()
    return card


async def active_cards(account_id: str) -> list[Card]:
    return await Card.filter(account_id=account_id, removed_at=None).order_by(
        "-is_primary", "-created_at"
    )


async def primary_card(account_id: str) -> Card | None:
    return await Card.filter(account_id=account_id, removed_at=None, is_primary=True).first()


async def _customer_id(gateway: PaymentGateway, account_id: str) -> str:
    await ensure_account(account_id)
    account = await Account.get(id=account_id)
    if account.gateway_customer_id:
        return account.gateway_customer_id
    customer_id = await gateway.ensure_customer(account_id, None)
    await Account.filter(id=account_id, gateway_customer_id=None).update(
        gateway_customer_id=customer_id
    )
    account = await Account.get(id=account_id)
    assert account.gateway_customer_id is not None
    return account.gateway_customer_id


async def start_setup(gateway: PaymentGateway, account_id: str) -> str:
    """A SetupIntent's client secret for the account's customer: the browser saves the card
    with it (3-D Secure at saving, when the bank asks), then ``add_card`` takes its
    PaymentMethod id."""
    if await Card.filter(account_id=account_id, removed_at=None).count() >= MAX_CARDS:
        raise fail(ErrorCode.VALIDATION, f"An account may hold at most {MAX_CARDS} cards.")
    return await gateway.start_card_setup(await _customer_id(gateway, account_id))


async def attach(gateway: PaymentGateway, account_id: str, payment_method_id: str) -> CardDetails:
    """Step 1 of adding a card (no transaction): the gateway attaches and describes it."""
    if not _PM_ID.match(payment_method_id):
        raise fail(
            ErrorCode.VALIDATION,
            "paymentMethodId must be a PaymentMethod id from Stripe Elements (pm_...)",
            "paymentMethodId",
        )
    if await Card.filter(account_id=account_id, removed_at=None).count() >= MAX_CARDS:
        raise fail(ErrorCode.VALIDATION, f"An account may hold at most {MAX_CARDS} cards.")
    customer_id = await _customer_id(gateway, account_id)
    try:
        return await gateway.attach_card(customer_id, payment_method_id)
    except CardRejected as exc:
        code = ErrorCode.VALIDATION if exc.unknown else ErrorCode.CARD_DECLINED
        raise fail(code, exc.message, "paymentMethodId") from exc


async def save_attached(account_id: str, details: CardDetails, *, make_primary: bool) -> Card:
    """Step 2 of adding a card, in the caller's transaction."""
    await posting.lock_account(account_id)
    has_primary = await Card.exists(account_id=account_id, removed_at=None, is_primary=True)
    primary = make_primary or not has_primary
    if primary and has_primary:
        await Card.filter(account_id=account_id, is_primary=True).update(is_primary=False)
    address = details.address
    card = await Card.create(
        account_id=account_id,
        gateway_payment_method_id=details.payment_method_id,
        brand=details.brand,
        last4=details.last4,
        exp_month=details.exp_month,
        exp_year=details.exp_year,
        cardholder_name=details.cardholder_name,
        address_line1=address.line1,
        address_line2=address.line2,
        address_city=address.city,
        address_state=address.state,
        address_postal_code=address.postal_code,
        address_country=address.country,
        is_primary=primary,
        created_at=sql.now(),
    )
    await _resume_auto_recharge(account_id)
    return card


async def _resume_auto_recharge(account_id: str) -> None:
    """A new card clears a pause (declines, no card): the next crossing may recharge."""
    setting = await AutoRechargeSetting.get_or_none(account_id=account_id)
    if setting is not None and setting.paused_reason is not None:
        setting.paused_reason = None
        setting.consecutive_failures = 0
        setting.next_attempt_at = None
        await setting.save()
        await Account.filter(id=account_id).update(recharge_threshold=setting.threshold_level())


def _check_update(
    v: Validator,
    exp_month: int | None,
    exp_year: int | None,
    cardholder_name: str | None,
    address: Address | None,
) -> None:
    now = sql.now()
    if exp_month is not None and not 1 <= exp_month <= 12:
        v.add("expMonth must be 1 to 12", "expMonth")
    if exp_year is not None and not now.year <= exp_year <= now.year + 30:
        v.add(f"expYear must be {now.year} to {now.year + 30}", "expYear")
    if cardholder_name is not None and (
        not cardholder_name.strip() or len(cardholder_name) > MAX_NAME
    ):
        v.add(f"cardholderName must be 1 to {MAX_NAME} characters", "cardholderName")
    if address is not None:
        for name, value, limit in (
            ("line1", address.line1, MAX_ADDRESS_LINE),
            ("line2", address.line2, MAX_ADDRESS_LINE),
            ("city", address.city, MAX_ADDRESS_LINE),
            ("state", address.state, MAX_ADDRESS_LINE),
            ("postalCode", address.postal_code, MAX_POSTAL_CODE),
        ):
            if value is not None and len(value) > limit:
                v.add(f"{name} must be at most {limit} characters", "billingAddress", name)
        if address.country is not None and not _COUNTRY.match(address.country):
            v.add(
                "country must be an ISO 3166-1 alpha-2 code such as US", "billingAddress", "country"
            )


async def update(
    gateway: PaymentGateway,
    *,
    card_id: uuid.UUID | None,
    scope_account_id: str | None,
    exp_month: int | None,
    exp_year: int | None,
    cardholder_name: str | None,
    address: Address | None,
) -> Card:
    """Update expiry, name or address: at the gateway first, then here (its own
    transaction, none open during the gateway call)."""
    v = Validator()
    _check_update(v, exp_month, exp_year, cardholder_name, address)
    v.check()
    card = await get_card(card_id, scope_account_id)
    month = exp_month if exp_month is not None else card.exp_month
    year = exp_year if exp_year is not None else card.exp_year
    now = sql.now()
    if (year, month) < (now.year, now.month):
        raise fail(ErrorCode.VALIDATION, "The card would already be expired.", "expYear")
    try:
        await gateway.update_card(
            card.gateway_payment_method_id,
            CardChanges(exp_month, exp_year, cardholder_name, address),
        )
    except CardRejected as exc:
        raise fail(ErrorCode.CARD_DECLINED, exc.message, "cardId") from exc
    async with in_transaction():
        # Read again under the account lock: a set-primary or removal that committed
        # during the gateway call stands (a removed card is NOT_FOUND), and only the
        # fields changed here are written.
        await posting.lock_account(card.account_id)
        card = await get_card(card.id, scope_account_id)
        changed: list[str] = []
        if exp_month is not None or exp_year is not None:
            card.exp_month, card.exp_year = month, year
            changed += ["exp_month", "exp_year"]
        if cardholder_name is not None:
            card.cardholder_name = cardholder_name.strip()
            changed.append("cardholder_name")
        if address is not None:
            card.address_line1, card.address_line2 = address.line1, address.line2
            card.address_city, card.address_state = address.city, address.state
            card.address_postal_code, card.address_country = address.postal_code, address.country
            changed += [f"address_{f}" for f in _ADDRESS_FIELDS]
        if changed:
            await card.save(update_fields=changed)
    return card


_ADDRESS_FIELDS = ("line1", "line2", "city", "state", "postal_code", "country")


async def set_primary(
    gateway: PaymentGateway, *, card_id: uuid.UUID | None, scope_account_id: str | None
) -> Card:
    """Make a card the primary: the gateway's default first, then here (its own
    transaction, under the account lock; a card removed meanwhile is not found)."""
    card = await get_card(card_id, scope_account_id)
    account = await Account.get(id=card.account_id)
    if account.gateway_customer_id:
        await gateway.set_default_card(account.gateway_customer_id, card.gateway_payment_method_id)
    async with in_transaction():
        await posting.lock_account(card.account_id)
        card = await get_card(card.id, scope_account_id)
        await (
            Card.filter(account_id=card.account_id, is_primary=True)
            .exclude(id=card.id)
            .update(is_primary=False)
        )
        card.is_primary = True
        await card.save(update_fields=["is_primary"])
    return card


@dataclass(frozen=True, slots=True)
class Removal:
    card: Card
    primary: Card | None
    auto_recharge_moved_to_primary: bool


async def remove(
    *, card_id: uuid.UUID | None, scope_account_id: str | None, is_staff: bool
) -> Removal:
    """Mark a card removed (caller's transaction); detach at the gateway after commit.

    Only billing staff may remove an account's last card.
    """
    card = await get_card(card_id, scope_account_id)
    await posting.lock_account(card.account_id)
    # Read again under the lock: a set-primary or removal committed since the first read
    # counts (the card as first read may no longer be the primary, or be removed).
    card = await get_card(card.id, scope_account_id)
    remaining = [c for c in await active_cards(card.account_id) if c.id != card.id]
    if not remaining and not is_staff:
        raise fail(
            ErrorCode.LAST_CARD,
            "This is the account's last card: to remove it without a replacement, "
            "contact accounting.",
            "cardId",
        )
    card.removed_at = sql.now()
    was_primary = card.is_primary
    card.is_primary = False
    await card.save(update_fields=["removed_at", "is_primary"])
    primary = next((c for c in remaining if c.is_primary), None)
    if was_primary and remaining:
        primary = max(remaining, key=lambda c: c.created_at)
        primary.is_primary = True
        await primary.save(update_fields=["is_primary"])
    moved = await AutoRechargeSetting.filter(account_id=card.account_id, card_id=card.id).update(
        card_id=None, use_primary_card=True
    )
    if moved:
        fallback = (
            f"the primary card ({primary.brand} ending {primary.last4})"
            if primary
            else ("the primary card, but there is none now")
        )
        await outbox.queue(
            card.account_id,
            NotificationKind.AUTO_RECHARGE_CARD_CHANGED,
            dedupe_key=f"auto-recharge-card-removed:{card.id}",
            subject="Auto-recharge now uses the primary card",
            body=f"The {card.brand} card ending {card.last4} that auto-recharge used was "
            f"removed. Auto-recharge will now charge {fallback}.",
        )
    return Removal(card, primary, bool(moved))


# Orchestration: these own their transactions because a gateway call sits between steps.


async def add_card(
    gateway: PaymentGateway, *, account_id: str, payment_method_id: str, make_primary: bool
) -> Card:
    details = await attach(gateway, account_id, payment_method_id)
    try:
        async with in_transaction():
            card = await save_attached(account_id, details, make_primary=make_primary)
    except BaseException:
        await _detach_quietly(gateway, details.payment_method_id)
        raise
    if card.is_primary:
        await _set_default_quietly(gateway, account_id, card)
    return card


async def remove_card(
    gateway: PaymentGateway,
    *,
    card_id: uuid.UUID | None,
    scope_account_id: str | None,
    is_staff: bool,
) -> Removal:
    async with in_transaction():
        removal = await remove(
            card_id=card_id, scope_account_id=scope_account_id, is_staff=is_staff
        )
    await _detach_quietly(gateway, removal.card.gateway_payment_method_id)
    return removal


async def _detach_quietly(gateway: PaymentGateway, payment_method_id: str) -> None:
    try:
        await gateway.detach_card(payment_method_id)
    except Exception:  # the card is already gone on our side; the gateway copy is inert
        log.warning("could not detach %s at the gateway", payment_method_id, exc_info=True)


async def _set_default_quietly(gateway: PaymentGateway, account_id: str, card: Card) -> None:
    account = await Account.get(id=account_id)
    if not account.gateway_customer_id:
        return
    try:
        await gateway.set_default_card(account.gateway_customer_id, card.gateway_payment_method_id)
    except Exception:  # we charge with an explicit card, so the default is a courtesy
        log.warning("could not set the default card at the gateway", exc_info=True)
