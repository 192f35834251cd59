"""Part 3: monthly invoices for metered transcription usage.

Each test works in a month of its own, far in the future (``billing.clock.travel``), so the
month-end job, which looks at every account, meets no other test's usage.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
from tortoise.transactions import in_transaction

from api import ids
from billing import clock, invoices
from billing.enums import InvoiceStatus, PaymentKind, PaymentStatus, Role
from billing.models import Account, Invoice, InvoiceLine, LedgerEntry, Notification, Payment
from billing.payments.gateways import ChargeRequest, ChargeResult, ChargeStatus, GatewayUnavailable
from billing.pricing import load_price_book
from billing.settlement.booking import Settled, settle
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import Caller, MakeCaller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import METERED, REMOVE_CARD, add_card, key
from workers.invoicing import INVOICE_FUNCTIONS
from workers.mail import MAIL_FUNCTIONS

AUDIO = "PREMIUM_AUDIO_TRANSCRIPTION"
CARDS = "BUSINESS_CARD_TRANSCRIPTION"

INVOICES = """query($accountId: ID) { creditAccount(accountId: $accountId) { invoices {
  id periodStart periodEnd status amountCents currency attempts paidAt failureMessage
  lines { processType quantity amountCents } } } }"""
PRICES = "{ creditPricing { currency processes { processType centsPerUnit } } }"


@dataclass
class Jobs:
    """The invoice job functions, called as a worker would, with their own queue."""

    queue: InProcessQueue

    @property
    def ctx(self) -> dict[str, Any]:
        return self.queue.ctx

    async def close_month_end(self) -> int:
        created: int = await INVOICE_FUNCTIONS["close_monthly_invoices"](self.ctx)
        await self.queue.drain()
        return created

    async def retry_due(self) -> int:
        queued: int = await INVOICE_FUNCTIONS["retry_due_invoices"](self.ctx)
        await self.queue.drain()
        return queued

    async def charge(self, invoice_id: uuid.UUID) -> str:
        outcome: str = await INVOICE_FUNCTIONS["charge_invoice"](self.ctx, str(invoice_id))
        return outcome


@pytest.fixture
def jobs(gateway: Any, settings: Settings) -> Jobs:
    ctx = {
        "gateway": gateway,
        "book": load_price_book(settings.price_book_path),
        "settings": settings,
    }
    queue = InProcessQueue({**INVOICE_FUNCTIONS, **MAIL_FUNCTIONS}, ctx)
    queue.ctx["queue"] = queue  # jobs enqueue their follow-ups here
    return Jobs(queue)


def a_month() -> datetime:
    """Midnight UTC on the first of a month no other test uses."""
    return datetime(2200 + secrets.randbelow(7000), 1 + secrets.randbelow(12), 1, tzinfo=UTC)


def next_month(first: datetime) -> datetime:
    return first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)


def local_first(first: datetime, zone: str) -> datetime:
    """Midnight on that month's first day in ``zone``, as UTC."""
    return first.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


async def cents_per_unit(who: Caller) -> dict[str, int]:
    data = await who.gql(PRICES)
    return {p["processType"]: p["centsPerUnit"] for p in data["creditPricing"]["processes"]}


async def use(service: Caller, process: str, quantity: int, at: datetime) -> dict[str, Any]:
    with clock.travel(at):
        data = await service.gql(
            METERED,
            {
                "input": {
                    "accountId": service.account_id,
                    "userId": "transcriber",
                    "processType": process,
                    "quantity": quantity,
                    "idempotencyKey": key(),
                }
            },
        )
    payload = data["recordMeteredUsage"]
    assert payload["errors"] == [], payload
    return cast("dict[str, Any]", payload["usage"])


async def invoices_of(account_id: str) -> list[Invoice]:
    return await Invoice.filter(account_id=account_id).order_by("period_start")


async def only_invoice(account_id: str) -> Invoice:
    found = await invoices_of(account_id)
    assert len(found) == 1, found
    return found[0]


async def lines_of(invoice: Invoice) -> list[tuple[str, int, int]]:
    rows = await InvoiceLine.filter(invoice_id=invoice.id).order_by("process_type")
    return [(r.process_type.value, r.quantity, r.amount_cents) for r in rows]


async def notices(account_id: str, kind: str) -> list[Notification]:
    return await Notification.filter(account_id=account_id, kind=kind)


def iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat()


def wire_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------- a month becomes one invoice


async def test_a_month_of_usage_becomes_one_invoice_charged_once(
    admin: Caller, service: Caller, jobs: Jobs, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    price = await cents_per_unit(service)
    start = a_month()
    end = next_month(start)
    await use(service, AUDIO, 10, start - timedelta(minutes=1))  # the month before
    await use(service, AUDIO, 10, start + timedelta(days=3))
    await use(service, CARDS, 7, start + timedelta(days=9))
    await use(service, AUDIO, 5, end - timedelta(minutes=1))
    await use(service, CARDS, 1, end + timedelta(minutes=1))  # the month after
    charges = gateway.charge_count

    with clock.travel(end + timedelta(hours=1)):
        assert await jobs.close_month_end() == 1
        assert await jobs.close_month_end() == 0  # the month-end job, run again
        invoice = await only_invoice(admin.account_id)
        assert await jobs.charge(invoice.id) == "paid"  # its charge job, delivered again
        assert invoice.id not in {i.id for i in await invoices.due_invoices()}
    assert gateway.charge_count == charges + 1
    assert invoice.status is InvoiceStatus.PAID
    assert (invoice.period_start, invoice.period_end) == (start, end)
    assert await lines_of(invoice) == [
        (CARDS, 7, 7 * price[CARDS]),
        (AUDIO, 15, 15 * price[AUDIO]),
    ]
    assert invoice.amount_cents == 15 * price[AUDIO] + 7 * price[CARDS]
    assert invoice.currency == "usd"
    assert invoice.attempts == 1
    assert invoice.paid_at is not None and end <= invoice.paid_at < end + timedelta(hours=2)
    assert invoice.failure_message is None

    payments = await Payment.filter(account_id=admin.account_id)
    assert [(p.kind, p.status, p.credits, p.amount_cents, p.trigger_key) for p in payments] == [
        (
            PaymentKind.INVOICE,
            PaymentStatus.SUCCEEDED,
            0,
            invoice.amount_cents,
            f"invoice:{invoice.id}:1",
        )
    ]
    assert str(invoice.payment_id) == str(payments[0].id)
    # Metered usage moves no credits.
    assert await LedgerEntry.filter(account_id=admin.account_id).count() == 0
    assert await assert_ledger_consistent(admin.account_id) == 0

    paid = await notices(admin.account_id, "INVOICE_PAID")
    assert [(n.dedupe_key, n.recipients) for n in paid] == [
        (f"invoice-paid:{invoice.id}", ["admin@example.com"])
    ]
    # Sent right after the charge's commit (runtime.effects), with no sweep having run.
    assert [n.sent_at is not None for n in paid] == [True]
    assert await notices(admin.account_id, "INVOICE_FAILED") == []

    # The same success seen again (a Stripe webhook, the sweep) changes nothing.
    assert payments[0].gateway_payment_id is not None
    async with in_transaction():
        again = await settle(
            payments[0].id, ChargeResult(ChargeStatus.SUCCEEDED, payments[0].gateway_payment_id)
        )
    assert again is Settled.UNCHANGED
    assert len(await notices(admin.account_id, "INVOICE_PAID")) == 1
    assert (await Invoice.get(id=invoice.id)).paid_at == invoice.paid_at
    assert gateway.charge_count == charges + 1


async def test_closing_a_month_twice_makes_one_invoice(
    admin: Caller, service: Caller, settings: Settings
) -> None:
    await add_card(admin, "pm_card_visa")
    start = a_month()
    end = next_month(start)
    await use(service, AUDIO, 4, start + timedelta(days=1))
    async with in_transaction():
        first = await invoices.close_month(admin.account_id, start, end, currency="usd")
    async with in_transaction():
        second = await invoices.close_month(admin.account_id, start, end, currency="usd")
    assert first is not None and second is not None
    assert (first.created, second.created) == (True, False)
    assert first.invoice.id == second.invoice.id
    assert first.invoice.status is InvoiceStatus.OPEN
    assert len(await lines_of(await only_invoice(admin.account_id))) == 1
    # Concurrent closes of the same month, too.
    other = next_month(end)
    await use(service, CARDS, 2, end + timedelta(days=2))

    async def close() -> invoices.ClosedMonth | None:
        async with in_transaction():
            return await invoices.close_month(admin.account_id, end, other, currency="usd")

    results = await asyncio.gather(*(close() for _ in range(5)))
    assert sorted(r.created for r in results if r is not None) == [False] * 4 + [True]
    assert len({r.invoice.id for r in results if r is not None}) == 1
    assert len(await invoices_of(admin.account_id)) == 2
    # A month with no usage is not invoiced.
    async with in_transaction():
        empty = await invoices.close_month(
            admin.account_id, other, next_month(other), currency="usd"
        )
    assert empty is None
    # Settle them so no later test's retry job meets an open invoice.
    for invoice in await invoices_of(admin.account_id):
        await Invoice.filter(id=invoice.id).update(status=InvoiceStatus.PAID)


async def test_concurrent_charges_of_one_invoice_charge_once(
    admin: Caller, service: Caller, jobs: Jobs, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    start = a_month()
    end = next_month(start)
    await use(service, AUDIO, 3, start + timedelta(days=5))
    with clock.travel(end + timedelta(hours=1)):
        async with in_transaction():
            closed = await invoices.close_month(admin.account_id, start, end, currency="usd")
        assert closed is not None
        charges = gateway.charge_count
        # The charge job delivered several times at once, and the billing call beside it.
        outcomes = await asyncio.gather(
            *(jobs.charge(closed.invoice.id) for _ in range(4)),
            invoices.charge_invoice(gateway, closed.invoice.id),
        )
        # One call charges; the others find it claimed ("not_due") or, if they start
        # after it finished, already paid. Either way nobody charges a second time.
        assert "paid" in [str(o) for o in outcomes]
        assert set(str(o) for o in outcomes) <= {"not_due", "paid"}
        assert await jobs.charge(closed.invoice.id) == "paid"  # already paid: no charge
    assert gateway.charge_count == charges + 1
    assert await Payment.filter(account_id=admin.account_id).count() == 1
    assert len(await notices(admin.account_id, "INVOICE_PAID")) == 1


# ---------------------------------------------------------------- declines


async def test_declined_invoice_backs_off_then_fails_with_one_notice(
    admin: Caller, service: Caller, jobs: Jobs, gateway: Any
) -> None:
    await add_card(admin, "pm_card_chargeCustomerFail")  # added fine, every charge declined
    start = a_month()
    end = next_month(start)
    await use(service, AUDIO, 8, start + timedelta(days=12))
    charges = gateway.charge_count
    now = end + timedelta(hours=1)

    with clock.travel(now):
        assert await jobs.close_month_end() == 1
    invoice = await only_invoice(admin.account_id)
    assert (invoice.status, invoice.attempts) == (InvoiceStatus.OPEN, 1)
    assert invoice.failure_message
    assert invoice.next_attempt_at is not None
    assert now + timedelta(hours=1) <= invoice.next_attempt_at < now + timedelta(hours=2)
    assert gateway.charge_count == charges + 1

    # Not before the backoff: the declined card is not hammered.
    with clock.travel(now + timedelta(minutes=30)):
        assert await jobs.charge(invoice.id) == "not_due"
        await jobs.retry_due()
    assert gateway.charge_count == charges + 1
    assert (await Invoice.get(id=invoice.id)).attempts == 1

    expected_waits = [timedelta(hours=6), timedelta(hours=24)]
    for attempt, wait in zip((2, 3), expected_waits, strict=True):
        due = (await Invoice.get(id=invoice.id)).next_attempt_at
        assert due is not None
        at = due + timedelta(minutes=1)
        with clock.travel(at):
            assert await jobs.retry_due() >= 1
        current = await Invoice.get(id=invoice.id)
        assert (current.status, current.attempts) == (InvoiceStatus.OPEN, attempt)
        assert current.next_attempt_at is not None
        assert at + wait <= current.next_attempt_at < at + wait + timedelta(hours=1)
        assert gateway.charge_count == charges + attempt
        assert await notices(admin.account_id, "INVOICE_FAILED") == []

    last = (await Invoice.get(id=invoice.id)).next_attempt_at
    assert last is not None
    with clock.travel(last + timedelta(minutes=1)):
        await jobs.retry_due()
    failed = await Invoice.get(id=invoice.id)
    assert failed.status is InvoiceStatus.FAILED
    assert failed.attempts == 4
    assert failed.next_attempt_at is None
    assert failed.failure_message
    assert gateway.charge_count == charges + 4
    sent = await notices(admin.account_id, "INVOICE_FAILED")
    assert [(n.dedupe_key, n.recipients) for n in sent] == [
        (f"invoice-failed:{invoice.id}", ["admin@example.com"])
    ]
    payments = await Payment.filter(account_id=admin.account_id).order_by("created_at")
    assert [(p.status, p.trigger_key) for p in payments] == [
        (PaymentStatus.FAILED, f"invoice:{invoice.id}:{n}") for n in (1, 2, 3, 4)
    ]

    # A failed invoice is never charged again, however the jobs run.
    with clock.travel(last + timedelta(days=40)):
        assert await jobs.charge(invoice.id) == "failed"
        await jobs.retry_due()
        await jobs.close_month_end()
    assert gateway.charge_count == charges + 4
    assert len(await notices(admin.account_id, "INVOICE_FAILED")) == 1
    assert await notices(admin.account_id, "INVOICE_PAID") == []

    data = await admin.gql(INVOICES)
    [shown] = data["creditAccount"]["invoices"]
    assert (shown["status"], shown["attempts"], shown["paidAt"]) == ("FAILED", 4, None)
    assert shown["failureMessage"] == failed.failure_message


async def test_no_card_counts_as_a_failed_attempt_and_a_new_card_pays(
    admin: Caller, service: Caller, staff: Caller, jobs: Jobs, gateway: Any
) -> None:
    card = await add_card(admin, "pm_card_visa")
    start = a_month()
    end = next_month(start)
    await use(service, CARDS, 30, start + timedelta(days=2))
    removed = await staff.gql(REMOVE_CARD, {"id": card["id"]})
    assert removed["removeCard"]["errors"] == []
    charges = gateway.charge_count
    now = end + timedelta(hours=2)
    with clock.travel(now):
        assert await jobs.close_month_end() == 1
    invoice = await only_invoice(admin.account_id)
    assert (invoice.status, invoice.attempts) == (InvoiceStatus.OPEN, 1)
    assert invoice.failure_message == invoices.NO_CARD_MESSAGE
    assert gateway.charge_count == charges
    assert await Payment.filter(account_id=admin.account_id).count() == 0

    await add_card(admin, "pm_card_visa")
    assert invoice.next_attempt_at is not None
    with clock.travel(invoice.next_attempt_at + timedelta(minutes=1)):
        assert await jobs.retry_due() >= 1
    paid = await Invoice.get(id=invoice.id)
    assert (paid.status, paid.attempts, paid.failure_message) == (InvoiceStatus.PAID, 2, None)
    assert gateway.charge_count == charges + 1
    assert [p.trigger_key for p in await Payment.filter(account_id=admin.account_id)] == [
        f"invoice:{invoice.id}:2"
    ]


class FlakyGateway:
    """The suite's gateway, unreachable for its next ``outages`` charges."""

    def __init__(self, inner: Any, outages: int) -> None:
        self.inner = inner
        self.outages = outages
        self.name = inner.name

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        if self.outages > 0:
            self.outages -= 1
            raise GatewayUnavailable("connection reset")
        result: ChargeResult = await self.inner.charge(request)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_unreachable_gateway_leaves_the_attempt_for_later(
    admin: Caller, service: Caller, jobs: Jobs, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    start = a_month()
    end = next_month(start)
    await use(service, AUDIO, 2, start + timedelta(days=20))
    jobs.ctx["gateway"] = FlakyGateway(gateway, outages=1)
    charges = gateway.charge_count
    now = end + timedelta(hours=1)
    with clock.travel(now):
        assert await jobs.close_month_end() == 1
    invoice = await only_invoice(admin.account_id)
    # No decline counted, the payment waits PENDING for the same attempt.
    assert (invoice.status, invoice.attempts, invoice.failure_message) == (
        InvoiceStatus.OPEN,
        0,
        None,
    )
    [pending] = await Payment.filter(account_id=admin.account_id)
    assert (pending.status, pending.trigger_key) == (
        PaymentStatus.PENDING,
        f"invoice:{invoice.id}:1",
    )
    with clock.travel(now + timedelta(minutes=1)):
        assert await jobs.charge(invoice.id) == "not_due"  # the attempt's lease still runs
    assert invoice.next_attempt_at is not None
    with clock.travel(invoice.next_attempt_at + timedelta(minutes=1)):
        assert await jobs.retry_due() >= 1
    paid = await Invoice.get(id=invoice.id)
    assert (paid.status, paid.attempts) == (InvoiceStatus.PAID, 1)
    # The same payment, repeated with its own idempotency key: one charge reached the bank.
    [payment] = await Payment.filter(account_id=admin.account_id)
    assert (payment.id, payment.status) == (pending.id, PaymentStatus.SUCCEEDED)
    assert gateway.charge_count == charges + 1


# ---------------------------------------------------------------- which month, whose


async def test_an_account_in_another_time_zone_gets_its_own_calendar_month(
    admin: Caller, service: Caller, jobs: Jobs
) -> None:
    zone = "America/Chicago"
    await add_card(admin, "pm_card_visa")
    await Account.filter(id=admin.account_id).update(timezone=zone)
    first = a_month()
    following = next_month(first)
    # 03:00 UTC on the first is still the evening before in Chicago.
    await use(service, AUDIO, 1, first + timedelta(hours=3))  # Chicago: the month before
    await use(service, AUDIO, 2, first + timedelta(days=10))
    await use(service, CARDS, 4, following + timedelta(hours=3))  # Chicago: still this month
    period = (local_first(first, zone), local_first(following, zone))

    # 04:00 UTC on the first: in Chicago the month has not ended yet; only the one before.
    with clock.travel(following + timedelta(hours=4)):
        await jobs.close_month_end()
    [earlier] = await invoices_of(admin.account_id)
    assert earlier.period_end == period[0]
    assert earlier.period_start.astimezone(ZoneInfo(zone)).day == 1
    assert await lines_of(earlier) == [(AUDIO, 1, earlier.amount_cents)]

    # 07:00 UTC: past midnight in Chicago (UTC-6 or UTC-5), its month closes.
    with clock.travel(following + timedelta(hours=7)):
        await jobs.close_month_end()
    closed = (await invoices_of(admin.account_id))[-1]
    assert (closed.period_start, closed.period_end) == period
    assert period[0] - first in (timedelta(hours=5), timedelta(hours=6))
    assert [(p, q) for p, q, _ in await lines_of(closed)] == [(CARDS, 4), (AUDIO, 2)]
    # The earlier month's 25 cents are under the minimum charge: carried into this one.
    statuses = [(i.status, i.carried_in_cents) for i in await invoices_of(admin.account_id)]
    assert statuses == [(InvoiceStatus.CARRIED_FORWARD, 0), (InvoiceStatus.PAID, 25)]
    assert closed.amount_cents == 25 + sum(cents for _, _, cents in await lines_of(closed))

    data = await admin.gql(INVOICES)
    shown = data["creditAccount"]["invoices"]
    assert [wire_time(i["periodStart"]) for i in shown] == [period[0], earlier.period_start]
    assert wire_time(shown[0]["periodEnd"]) == period[1]


async def test_no_usage_no_invoice(
    admin: Caller, service: Caller, caller: MakeCaller, jobs: Jobs, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    other_id = f"acct-{uuid.uuid4().hex[:12]}"
    other_admin = caller(other_id, Role.ADMIN, email="other@example.com")
    other_service = caller(other_id, Role.SERVICE, user="svc-transcribe")
    await add_card(other_admin, "pm_card_visa")
    start = a_month()
    end = next_month(start)
    # The other account uses transcription only in the month that is still running.
    await use(other_service, AUDIO, 3, end + timedelta(hours=1))
    charges = gateway.charge_count
    with clock.travel(end + timedelta(hours=2)):
        due = await invoices.months_to_close()
        assert {admin.account_id, other_id}.isdisjoint(d.account_id for d in due)
        await jobs.close_month_end()
    assert await invoices_of(admin.account_id) == []
    assert await invoices_of(other_id) == []
    assert gateway.charge_count == charges
    assert (await admin.gql(INVOICES))["creditAccount"]["invoices"] == []


async def test_a_month_closes_a_few_minutes_after_it_ends(
    admin: Caller, service: Caller, jobs: Jobs
) -> None:
    await add_card(admin, "pm_card_visa")
    start = a_month()
    end = next_month(start)
    await use(service, AUDIO, 2, end - timedelta(seconds=30))  # 50 cents: the minimum charge
    with clock.travel(end + invoices.MONTH_CLOSE_GRACE - timedelta(minutes=1)):
        assert await jobs.close_month_end() == 0
    assert await invoices_of(admin.account_id) == []
    with clock.travel(end + invoices.MONTH_CLOSE_GRACE + timedelta(minutes=1)):
        due = [d for d in await invoices.months_to_close() if d.account_id == admin.account_id]
        assert [(d.timezone, d.period_start, d.period_end) for d in due] == [("UTC", start, end)]
        assert await jobs.close_month_end() == 1
    assert [i.status for i in await invoices_of(admin.account_id)] == [InvoiceStatus.PAID]


# ---------------------------------------------------------------- over GraphQL


async def test_invoices_are_shown_to_the_account_admin_only(
    admin: Caller,
    service: Caller,
    staff: Caller,
    user: Caller,
    caller: MakeCaller,
    jobs: Jobs,
) -> None:
    await add_card(admin, "pm_card_visa")
    price = await cents_per_unit(service)
    start = a_month()
    end = next_month(start)
    await use(service, CARDS, 3, start + timedelta(days=4))
    await use(service, AUDIO, 6, start + timedelta(days=6))
    with clock.travel(end + timedelta(hours=1)):
        assert await jobs.close_month_end() == 1
    invoice = await only_invoice(admin.account_id)

    data = await admin.gql(INVOICES)
    assert data["creditAccount"]["invoices"] == [
        {
            "id": ids.encode("Invoice", invoice.id),
            "periodStart": iso(start),
            "periodEnd": iso(end),
            "status": "PAID",
            "amountCents": 6 * price[AUDIO] + 3 * price[CARDS],
            "currency": "usd",
            "attempts": 1,
            "paidAt": iso(invoice.paid_at) if invoice.paid_at else None,
            "failureMessage": None,
            "lines": [
                {"processType": CARDS, "quantity": 3, "amountCents": 3 * price[CARDS]},
                {"processType": AUDIO, "quantity": 6, "amountCents": 6 * price[AUDIO]},
            ],
        }
    ]
    assert data["creditAccount"]["invoices"][0]["paidAt"] is not None
    # Billing staff name the account.
    staff_view = await staff.gql(INVOICES, {"accountId": admin.account_id})
    assert staff_view == data

    # Another account's admin sees only their own (none), and cannot name this account.
    stranger = caller(f"acct-{uuid.uuid4().hex[:12]}", Role.ADMIN)
    assert (await stranger.gql(INVOICES))["creditAccount"]["invoices"] == []
    error = await stranger.gql_error(INVOICES, {"accountId": admin.account_id})
    assert error["extensions"]["code"] == "FORBIDDEN"
    # Users and services see nothing of the account's billing.
    for who in (user, service):
        response = await who.raw(INVOICES)
        body = response.json()
        assert body["data"] is None
        assert [e["extensions"]["code"] for e in body["errors"]] == ["FORBIDDEN"]


async def test_invoices_list_is_newest_first_and_at_most_24(admin: Caller, service: Caller) -> None:
    await add_card(admin, "pm_card_visa")
    month = a_month().replace(month=1)
    starts = []
    for _ in range(26):
        starts.append(month)
        month = next_month(month)
    async with in_transaction():
        for start in starts:
            await Invoice.create(
                account_id=admin.account_id,
                period_start=start,
                period_end=next_month(start),
                status=InvoiceStatus.PAID,
                amount_cents=100,
                currency="usd",
                created_at=clock.now(),
            )
    shown = (await admin.gql(INVOICES))["creditAccount"]["invoices"]
    assert [wire_time(i["periodStart"]) for i in shown] == sorted(starts, reverse=True)[:24]


async def test_an_invoice_under_the_minimum_charge_is_carried_into_the_next(
    admin: Caller, service: Caller, jobs: Jobs, gateway: Any
) -> None:
    """Thirty cents are never sent to the gateway (Stripe refuses under 50): the month is
    CARRIED_FORWARD, not failed, and next month's invoice charges both."""
    await add_card(admin, "pm_card_visa")
    first = a_month()
    second = next_month(first)
    third = next_month(second)
    await use(service, CARDS, 3, first + timedelta(days=3))  # 30 cents
    charges = gateway.charge_count
    with clock.travel(second + timedelta(hours=1)):
        await jobs.close_month_end()
    [carried] = await invoices_of(admin.account_id)
    assert (carried.status, carried.amount_cents) == (InvoiceStatus.CARRIED_FORWARD, 30)
    assert gateway.charge_count == charges
    assert await Payment.filter(account_id=admin.account_id).count() == 0
    assert await notices(admin.account_id, "INVOICE_FAILED") == []
    shown = (await admin.gql(INVOICES))["creditAccount"]["invoices"]
    assert [i["status"] for i in shown] == ["CARRIED_FORWARD"]

    await use(service, CARDS, 3, second + timedelta(days=3))  # 30 more: 60 with the carry
    with clock.travel(third + timedelta(hours=1)):
        await jobs.close_month_end()
    latest = (await invoices_of(admin.account_id))[-1]
    assert (latest.status, latest.amount_cents, latest.carried_in_cents) == (
        InvoiceStatus.PAID,
        60,
        30,
    )
    assert (await Invoice.get(id=carried.id)).carried_into_id == latest.id
    [payment] = await Payment.filter(account_id=admin.account_id)
    assert payment.amount_cents == 60 and payment.status is PaymentStatus.SUCCEEDED
    assert gateway.charge_count == charges + 1
