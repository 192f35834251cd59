"""Model-based test of settlement: the ledger follows the gateway's truth in any order.

Hypothesis drives a small model of Stripe (``StripeModel``: PaymentIntents through
``requires_action`` -> ``requires_payment_method`` -> retried -> ``succeeded``, charges with
partial and full refunds, disputes won and lost, the minimum charge) against the real
domain: purchases, ``confirmPurchase``, spends, threshold auto-recharge runs, monthly
invoice runs, the webhook
processing (``webhooks.record`` + ``webhooks.process``, as the job runs them) and the sweep.
The model's events go to an outbox and are delivered in any order, twice, late, or lost
(a lost ``payment_intent.*`` event is never delivered; the sweep must find the truth by
re-reading the intent; refund and dispute events are at worst late, as Stripe retries a
failed delivery for days).

After every step: balance == sum of entries (and the chain), each payment credited at most
once, and no more auto-recharge charges than threshold crossings. At the end, once every
kept event is delivered and the sweep has run: credits from cards == paid - refunded -
disputes lost, our payments agree with the model's intents, and reconciliation is clean.

Bounds: the ``ci`` profile is small and derandomized (runs in ``.ci/run``); a bigger, random
run is one command:

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/system/test_model_gateway.py
    (add TEST_BACKEND=postgres TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test)

Invoice runs are in too: metered use, the month closes, its invoice is charged off-session
(or carried forward under the minimum). Their retries and backoff are in
tests/api/test_invoices.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import uuid
from collections.abc import Coroutine
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from starlette.applications import Starlette
from tortoise.transactions import in_transaction

from billing import clock, invoices, reconcile
from billing.accounts import ensure_account
from billing.enums import (
    AutoRechargeTrigger,
    InvoiceStatus,
    PaymentKind,
    PaymentStatus,
    ProcessType,
)
from billing.errors import BillingError
from billing.models import Invoice, LedgerEntry, Payment
from billing.payments import cards, purchases
from billing.payments.gateways import (
    CardDetails,
    ChargeRequest,
    ChargeResult,
    ChargeStatus,
    check_minimum,
)
from billing.pricing import PriceBook, load_price_book
from billing.recharge import autorecharge, runs
from billing.settlement import heal, webhooks
from billing.spending import usage
from billing.spending.quota import month_bounds
from runtime.settings import Settings

T = TypeVar("T")

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,
    "suppress_health_check": list(HealthCheck),
    "print_blob": False,
}
PROFILES = {
    "ci": settings(max_examples=20, stateful_step_count=35, derandomize=True, **_COMMON),
    "long": settings(max_examples=200, stateful_step_count=60, derandomize=False, **_COMMON),
}
PROFILE = PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), PROFILES["ci"])
BASE_CREDITS = 1_000_000  # staff funds first: take-backs never run short
THRESHOLD = BASE_CREDITS - 100
SWEEP_STEP = timedelta(minutes=6)  # past the sweep's re-read interval


def next_month_start(start: datetime) -> datetime:
    return start.replace(year=start.year + start.month // 12, month=start.month % 12 + 1)


# ---------------------------------------------------------------- the gateway model


@dataclass
class Intent:
    id: str
    amount: int
    currency: str
    customer: str
    payment_id: str
    needs_auth: bool
    off_session: bool
    status: str  # requires_action, requires_payment_method, succeeded
    refunded: int = 0
    dispute: dict[str, Any] | None = None  # id, amount, status: open / won / lost
    client_secret: str = field(default_factory=lambda: f"secret_{secrets.token_hex(6)}")

    def as_object(self) -> dict[str, Any]:
        error = (
            {"code": "payment_intent_authentication_failure", "message": "Authentication failed."}
            if self.status == "requires_payment_method"
            else None
        )
        return {
            "id": self.id,
            "object": "payment_intent",
            "status": self.status,
            "amount": self.amount,
            "currency": self.currency,
            "customer": self.customer,
            "client_secret": self.client_secret,
            "metadata": {"payment_id": self.payment_id},
            "last_payment_error": error,
        }

    def charge_object(self) -> dict[str, Any]:
        return {
            "id": f"ch_{self.id}",
            "object": "charge",
            "payment_intent": self.id,
            "status": "succeeded",
            "paid": True,
            "amount": self.amount,
            "amount_refunded": self.refunded,
            "currency": self.currency,
            "customer": self.customer,
        }

    def result(self) -> ChargeResult:
        seen = {
            "amount_cents": self.amount,
            "currency": self.currency,
            "customer_id": self.customer,
        }
        if self.status == "succeeded":
            return ChargeResult(ChargeStatus.SUCCEEDED, self.id, **seen)  # type: ignore[arg-type]
        if self.status == "requires_action":
            return ChargeResult(
                ChargeStatus.REQUIRES_ACTION,
                self.id,
                client_secret=self.client_secret,
                **seen,  # type: ignore[arg-type]
            )
        return ChargeResult(
            ChargeStatus.FAILED,
            self.id,
            failure_code="card_declined",
            failure_message="Authentication failed.",
            **seen,  # type: ignore[arg-type]
        )


class StripeModel:
    """Just enough of Stripe for settlement: intents, refunds, disputes, events."""

    name = "stripe-model"

    def __init__(self) -> None:
        self.intents: dict[str, Intent] = {}
        self.by_key: dict[str, Intent] = {}
        self.outbox: list[dict[str, Any]] = []
        self.charges_sent = 0

    async def start_card_setup(self, customer_id: str) -> str:
        raise NotImplementedError("settlement never saves a card in the browser")

    def emit(self, kind: str, obj: dict[str, Any]) -> None:
        self.outbox.append(
            {"id": f"evt_{secrets.token_hex(8)}", "type": kind, "data": {"object": obj}}
        )

    async def ensure_customer(self, account_id: str, existing_customer_id: str | None) -> str:
        return existing_customer_id or f"cus_{secrets.token_hex(6)}"

    async def attach_card(self, customer_id: str, payment_method_id: str) -> CardDetails:
        last4 = "3155" if "auth" in payment_method_id else "4242"
        return CardDetails(f"{payment_method_id}_{secrets.token_hex(3)}", "visa", last4, 12, 2034)

    async def update_card(self, payment_method_id: str, changes: Any) -> None:
        return None

    async def set_default_card(self, customer_id: str, payment_method_id: str) -> None:
        return None

    async def detach_card(self, payment_method_id: str) -> None:
        return None

    async def charge(self, request: ChargeRequest) -> ChargeResult:
        check_minimum(request)
        known = self.by_key.get(request.idempotency_key)
        if known is not None:
            return known.result()
        self.charges_sent += 1
        needs_auth = "auth" in request.payment_method_id
        intent = Intent(
            id=f"pi_{secrets.token_hex(8)}",
            amount=request.amount_cents,
            currency=request.currency,
            customer=request.customer_id,
            payment_id=request.metadata["payment_id"],
            needs_auth=needs_auth,
            off_session=request.off_session,
            status="requires_action" if needs_auth else "succeeded",
        )
        if needs_auth and request.off_session:
            intent.status = "requires_payment_method"
        self.intents[intent.id] = intent
        self.by_key[request.idempotency_key] = intent
        if intent.status == "succeeded":
            self.emit("payment_intent.succeeded", intent.as_object())
        elif intent.status == "requires_payment_method":
            self.emit("payment_intent.payment_failed", intent.as_object())
        return intent.result()

    async def retrieve_charge(self, gateway_payment_id: str) -> ChargeResult:
        return self.intents[gateway_payment_id].result()

    # -- what customers, banks and the vendor do at Stripe

    def authenticate(self, intent: Intent, success: bool) -> None:
        intent.status = "succeeded" if success else "requires_payment_method"
        kind = "payment_intent.succeeded" if success else "payment_intent.payment_failed"
        self.emit(kind, intent.as_object())

    def retry(self, intent: Intent) -> None:
        intent.status = "requires_action"

    def refund(self, intent: Intent, cents: int) -> None:
        intent.refunded += cents
        self.emit("charge.refunded", intent.charge_object())

    def open_dispute(self, intent: Intent) -> None:
        intent.dispute = {
            "id": f"dp_{secrets.token_hex(6)}",
            "object": "dispute",
            "payment_intent": intent.id,
            "amount": intent.amount - intent.refunded,
            "reason": "fraudulent",
            "status": "needs_response",
        }
        self.emit("charge.dispute.created", dict(intent.dispute))

    def close_dispute(self, intent: Intent, won: bool) -> None:
        assert intent.dispute is not None
        intent.dispute["status"] = "won" if won else "lost"
        self.emit("charge.dispute.closed", dict(intent.dispute))


# ---------------------------------------------------------------- the machine


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    book: PriceBook


class SettlementMachine(RuleBasedStateMachine):
    env: Env

    def __init__(self) -> None:
        super().__init__()
        self.gw = StripeModel()
        self.stack = ExitStack()
        self.now = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
        self.stack.enter_context(clock.travel(self.now))
        self.account = f"gwmodel-{uuid.uuid4().hex[:12]}"
        self.plain = self.auth = ""
        self.delivered: list[dict[str, Any]] = []
        self.run(self._setup())

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.env.loop.run_until_complete(coro)

    async def _setup(self) -> None:
        await ensure_account(self.account)
        await usage.grant_or_adjust(
            account_id=self.account,
            credits=BASE_CREDITS,
            reason="model funds",
            idempotency_key="funds",
            user_id="staff",
            adjust=False,
        )
        plain = await cards.add_card(
            self.gw, account_id=self.account, payment_method_id="pm_plain", make_primary=True
        )
        auth = await cards.add_card(
            self.gw, account_id=self.account, payment_method_id="pm_auth", make_primary=False
        )
        self.plain, self.auth = str(plain.id), str(auth.id)

    def advance(self, by: timedelta = SWEEP_STEP) -> None:
        self.stack.close()
        self.now += by
        self.stack = ExitStack()
        self.stack.enter_context(clock.travel(self.now))

    # -- our side

    @rule(credits=st.sampled_from([100, 150, 333, 1000]), auth=st.booleans())
    def purchase(self, credits: int, auth: bool) -> None:
        card = uuid.UUID(self.auth if auth else self.plain)
        outcome = self.run(
            purchases.purchase_credits(
                self.gw,
                self.env.book,
                account_id=self.account,
                user_id="admin",
                credits=credits,
                card_id=card,
                card_id_given=True,
                idempotency_key=uuid.uuid4().hex,
            )
        )
        expected = PaymentStatus.REQUIRES_ACTION if auth else PaymentStatus.SUCCEEDED
        assert outcome.payment.status is expected

    @precondition(lambda self: bool(self.gw.intents))
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        intent = data.draw(st.sampled_from(sorted(self.gw.intents.values(), key=lambda i: i.id)))
        payment_id = uuid.UUID(intent.payment_id)
        self.run(
            purchases.confirm_purchase(self.gw, account_id=self.account, payment_id=payment_id)
        )

    @rule(units=st.integers(1, 20))
    def spend(self, units: int) -> None:
        async def go() -> None:
            with contextlib.suppress(BillingError):  # a short balance spends nothing
                await usage.consume(
                    self.env.book,
                    account_id=self.account,
                    user_id="svc",
                    process_type=ProcessType.POSTCARD,
                    quantity=units,
                    reference=None,
                    idempotency_key=uuid.uuid4().hex,
                )

        self.run(go())

    @rule(enabled=st.booleans())
    def save_auto_recharge(self, enabled: bool) -> None:
        async def go() -> None:
            async with in_transaction():
                await autorecharge.update_auto_recharge(
                    self.env.book,
                    self.account,
                    autorecharge.AutoRechargeInput(
                        enabled=enabled,
                        trigger=AutoRechargeTrigger.THRESHOLD,
                        threshold_credits=THRESHOLD,
                        recharge_credits=100,
                    ),
                )

        self.run(go())
        self.saves_below += int(enabled and self._balance() < THRESHOLD)

    saves_below = 0

    @rule(copies=st.integers(1, 3))
    def recharge_job(self, copies: int) -> None:
        async def go() -> None:
            await asyncio.gather(
                *(
                    runs.run(self.gw, self.env.book, self.account, AutoRechargeTrigger.THRESHOLD)
                    for _ in range(copies)
                )
            )

        self.run(go())

    @precondition(lambda self: self.invoice_runs < 2)
    @rule(units=st.sampled_from([3, 4, 40]))
    def invoice_run(self, units: int) -> None:
        """Metered use this month, then the month closes: its invoice is charged off-session
        to the primary card (or, 30 cents being under the minimum, carried forward)."""
        self.invoice_runs += 1
        self.run(self._invoice_run(units))

    invoice_runs = 0

    async def _invoice_run(self, units: int) -> None:
        await usage.record_metered(
            self.env.book,
            account_id=self.account,
            user_id="transcriber",
            process_type=ProcessType.BUSINESS_CARD_TRANSCRIPTION,
            quantity=units,
            reference=None,
            idempotency_key=uuid.uuid4().hex,
        )
        start, _ = month_bounds(self.now, "UTC")
        self.advance(by=next_month_start(start) - self.now + timedelta(hours=1))
        for due in await invoices.months_to_close():
            if due.account_id != self.account:
                continue
            async with in_transaction():
                closed = await invoices.close_month(
                    self.account, due.period_start, due.period_end, currency="usd"
                )
            if closed is not None and closed.invoice.status is InvoiceStatus.OPEN:
                await invoices.charge_invoice(self.gw, closed.invoice.id)

    @rule()
    def sweep(self) -> None:
        self.advance()
        self.run(self._sweep())

    async def _sweep(self) -> None:
        for payment_id in await runs.stuck_payments() + await runs.payments_to_recheck():
            payment = await Payment.get(id=payment_id)
            if payment.account_id == self.account:
                await heal.heal_payment(self.gw, payment_id)
        for event_id, _ in await webhooks.pending_events(older_than_seconds=0, limit=10_000):
            await self._process(event_id)
        for account_id, _ in await runs.below_threshold(limit=10_000):
            if account_id == self.account:
                await runs.run(self.gw, self.env.book, self.account, AutoRechargeTrigger.THRESHOLD)

    async def _process(self, event_id: int) -> None:
        async with in_transaction():
            await webhooks.process(event_id)

    # -- the gateway's side

    def _intents(self, *statuses: str) -> list[Intent]:
        return sorted(
            (i for i in self.gw.intents.values() if i.status in statuses and not i.off_session),
            key=lambda i: i.id,
        )

    @precondition(lambda self: bool(self._intents("requires_action")))
    @rule(data=st.data(), success=st.booleans())
    def authenticate(self, data: st.DataObject, success: bool) -> None:
        self.gw.authenticate(data.draw(st.sampled_from(self._intents("requires_action"))), success)

    @precondition(lambda self: bool(self._intents("requires_payment_method")))
    @rule(data=st.data())
    def retry(self, data: st.DataObject) -> None:
        self.gw.retry(data.draw(st.sampled_from(self._intents("requires_payment_method"))))

    @precondition(lambda self: bool(self._intents("requires_action")))
    @rule(data=st.data(), confirm_between=st.booleans())
    def fail_then_retry(self, data: st.DataObject, confirm_between: bool) -> None:
        """The customer fails the challenge (we may see it: FAILED), then tries again."""
        intent = data.draw(st.sampled_from(self._intents("requires_action")))
        self.gw.authenticate(intent, success=False)
        if confirm_between:
            payment_id = uuid.UUID(intent.payment_id)
            self.run(
                purchases.confirm_purchase(self.gw, account_id=self.account, payment_id=payment_id)
            )
        self.gw.retry(intent)

    @precondition(lambda self: bool(self._intents("requires_action")))
    @rule(data=st.data(), dispute=st.booleans())
    def pass_then_take_back(self, data: st.DataObject, dispute: bool) -> None:
        """Authentication passes and the money is at once refunded or disputed: the events
        race each other (the take-back may arrive first)."""
        intent = data.draw(st.sampled_from(self._intents("requires_action")))
        self.gw.authenticate(intent, success=True)
        if dispute:
            self.gw.open_dispute(intent)
        else:
            self.gw.refund(intent, intent.amount)
        if data.draw(st.booleans()):  # the later event first
            self.gw.outbox.insert(0, self.gw.outbox.pop())

    def _refundable(self) -> list[Intent]:
        return [
            i for i in self._intents("succeeded") if i.refunded < i.amount and i.dispute is None
        ]

    @precondition(lambda self: bool(self._refundable()))
    @rule(data=st.data(), share=st.sampled_from([1, 3, 10]))
    def refund(self, data: st.DataObject, share: int) -> None:
        intent = data.draw(st.sampled_from(self._refundable()))
        cents = max(1, (intent.amount - intent.refunded) // share)
        self.gw.refund(intent, cents)

    @precondition(lambda self: bool(self._refundable()))
    @rule(data=st.data())
    def dispute(self, data: st.DataObject) -> None:
        self.gw.open_dispute(data.draw(st.sampled_from(self._refundable())))

    def _open_disputes(self) -> list[Intent]:
        return [
            i
            for i in self._intents("succeeded")
            if i.dispute and i.dispute["status"] == "needs_response"
        ]

    @precondition(lambda self: bool(self._open_disputes()))
    @rule(data=st.data(), won=st.booleans())
    def close_dispute(self, data: st.DataObject, won: bool) -> None:
        self.gw.close_dispute(data.draw(st.sampled_from(self._open_disputes())), won)

    # -- delivery: any order, twice, late, lost

    @precondition(lambda self: bool(self.gw.outbox))
    @rule(data=st.data(), keep=st.booleans())
    def deliver(self, data: st.DataObject, keep: bool) -> None:
        index = data.draw(st.integers(0, len(self.gw.outbox) - 1))
        sent = self.gw.outbox[index] if keep else self.gw.outbox.pop(index)
        self.run(self._deliver(sent))

    async def _deliver(self, sent: dict[str, Any]) -> None:
        # As Stripe redelivers: a copy of the same event (same id) may come again.
        stored = await webhooks.record("stripe", json.loads(json.dumps(sent)))
        if stored is not None:
            await self._process(stored)

    @precondition(lambda self: any(e["type"].startswith("payment_intent.") for e in self.gw.outbox))
    @rule(data=st.data())
    def lose(self, data: st.DataObject) -> None:
        lost = [e for e in self.gw.outbox if e["type"].startswith("payment_intent.")]
        self.gw.outbox.remove(data.draw(st.sampled_from(lost)))

    # -- after every step

    def _balance(self) -> int:
        async def read() -> int:
            from billing.ledger.posting import balance_of

            return await balance_of(self.account)

        return self.run(read())

    @invariant()
    def ledger_holds(self) -> None:
        self.run(self._ledger_holds())

    async def _ledger_holds(self) -> None:
        report = await reconcile.check_database([self.account])
        assert report.ok, [d.line() for d in report.discrepancies]
        entries = await LedgerEntry.filter(account_id=self.account).order_by("created_at", "id")
        credited = [e.payment_id for e in entries if e.type.value in ("PURCHASE", "AUTO_RECHARGE")]
        assert len(credited) == len(set(credited)), "a payment credited twice"
        # One crossing, one charge: debits from at/above the threshold to below it, plus
        # saves below it, bound the auto-recharge charges.
        crossings = self.saves_below
        for e in entries:
            before = e.balance_after - e.credits
            crossings += int(e.credits < 0 and before >= THRESHOLD > e.balance_after)
        charged = await Payment.filter(
            account_id=self.account, kind=PaymentKind.AUTO_RECHARGE
        ).count()
        assert charged <= crossings, (charged, crossings)

    def teardown(self) -> None:
        try:
            self.run(self._settle_everything())
        finally:
            self.stack.close()

    async def _settle_everything(self) -> None:
        while self.gw.outbox:
            await self._deliver(self.gw.outbox.pop(0))
        for _ in range(2):
            self.advance()
            await self._sweep()
        await self._ledger_holds()
        expected = 0
        for intent in self.gw.intents.values():
            payment = await Payment.get(id=intent.payment_id)
            paid = intent.status == "succeeded"
            assert (payment.status in (PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED)) is paid, (
                intent,
                payment.status,
            )
            assert payment.refunded_cents == intent.refunded
            if not paid:
                continue
            credits = payment.credits
            got = credits - credits * intent.refunded // intent.amount
            # A dispute takes the funds when it opens; only a won one gives them back.
            if intent.dispute and intent.dispute["status"] != "won":
                got -= credits * int(intent.dispute["amount"]) // intent.amount
            expected += got
        entries = await LedgerEntry.filter(account_id=self.account, payment_id__isnull=False)
        assert sum(e.credits for e in entries) == expected
        # Invoices: each paid once, or carried (under the minimum), never charged under it.
        for invoice in await Invoice.filter(account_id=self.account):
            charged = await Payment.filter(
                account_id=self.account, kind=PaymentKind.INVOICE, amount_cents=invoice.amount_cents
            ).count()
            if invoice.status is InvoiceStatus.CARRIED_FORWARD:
                assert invoice.amount_cents < 50
            else:
                assert invoice.status is InvoiceStatus.PAID and charged >= 1, invoice.status
        report = await reconcile.check_database([self.account])
        assert report.ok, [d.line() for d in report.discrepancies]


# ---------------------------------------------------------------- the test


@pytest_asyncio.fixture
async def session_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.mark.timeout(300 if PROFILE is PROFILES["ci"] else 6 * 3600)
def test_settlement_follows_the_gateway_in_any_order(
    session_loop: asyncio.AbstractEventLoop,
    app: Starlette,
    settings: Settings,
    gateway_name: str,
) -> None:
    if gateway_name != "sandbox":
        pytest.skip("the gateway here is the model of Stripe: once per database is enough")
    book = load_price_book(settings.price_book_path)

    class Machine(SettlementMachine):
        env = Env(session_loop, book)

    run_state_machine_as_test(Machine, settings=PROFILE)
