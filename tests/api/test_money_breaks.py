"""Issue 10's rules attacked: each test is a break a review found by trying the rules the
way a payment provider, a racing client or an operator would (two batches with one key set,
disputes and refunds of other intents, purchases in flight at the Int bound, a late recharge
and a newer crossing, concurrent refund and dispute events, inquiries, carried invoices,
dashboard charges, reconciliation gaps). Each states its steps and the right value; each
failed on the first version of the rules and holds now.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest

from billing import clock
from billing.enums import PaymentStatus, ProcessType, TransactionType
from billing.ledger import posting
from billing.ledger.posting import Movement
from billing.models import Account, GatewayEvent, LedgerEntry, Payment
from runtime.queue import InProcessQueue
from tests.api.test_batch import BATCH
from tests.api.test_stripe import CONFIRM, event, payment_row, post_event
from tests.conftest import Caller
from tests.support.gateways import GatewayHarness, StripeHarness
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import AUTO_RECHARGE, add_card, balance, buy, consume, key

INT_MAX = 2**31 - 1


def stripe_only(harness: GatewayHarness) -> StripeHarness:
    if not isinstance(harness, StripeHarness):
        pytest.skip("gateway events are Stripe's (played with localstripe)")
    return harness


def sandbox_only(gateway_name: str) -> None:
    if gateway_name != "sandbox":
        pytest.skip("spending does not touch the gateway: one gateway is enough")


async def _fund(account_id: str, credits: int) -> None:
    """Staff funds, posted as grants of at most a ledger entry's size (quicker than 200
    grantCredits calls of 10,000,000; the ledger is the same)."""
    from tortoise.transactions import in_transaction

    from billing.accounts import ensure_account

    await ensure_account(account_id)
    left = credits
    while left:
        step = min(left, posting.MAX_CREDITS_PER_ENTRY)
        async with in_transaction():
            await posting.post(
                Movement(
                    account_id=account_id,
                    credits=step,
                    type=TransactionType.GRANT,
                    process_type=ProcessType.ADMINISTRATIVE,
                    description="Credits granted: review funds",
                    user_id="staff-1",
                )
            )
        left -= step


def _payloads(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert "errors" not in body, body
    data = body["data"]
    if "consumeCredits" in data:
        return [data["consumeCredits"]]
    return list(data["consumeCreditsBatch"])


# ---------------------------------------------------------------- idempotency keys, batches


async def test_two_batches_with_the_same_keys_in_another_order_both_answer(
    service: Caller, gateway_name: str, backend: str
) -> None:
    """A client retries a batch (its request timed out) with the same items in another
    order, while the first is still running: both claim the same keys in one multi-row
    INSERT each, in opposite orders, so on PostgreSQL each waits for a key the other holds
    (a deadlock; PostgreSQL aborts one: "Internal error."). Right: every item spends once,
    the other batch replays it, no error (fault 7's kind: "every writer that claims a key
    treats an earlier claimant the same way").
    At fault: billing/spending/batch.py ``_claim`` inserts
    the keys in the order given (the accounts are locked in id order, the keys are not)."""
    sandbox_only(gateway_name)
    # SQLite serialises writers (no lock order to get wrong): one round there is enough.
    rounds, size = (10, 1000) if backend == "postgres" else (1, 1000)
    await _fund(service.account_id, rounds * size * 12)
    for _ in range(rounds):
        items = [
            {
                "accountId": service.account_id,
                "userId": "u1",
                "processType": "POSTCARD",
                "quantity": 1,
                "idempotencyKey": key(),
            }
            for _ in range(size)
        ]
        orders = (items, list(reversed(items)), items[size // 2 :] + items[: size // 2])
        responses = await asyncio.gather(*(service.raw(BATCH, {"inputs": o}) for o in orders))
        for response in responses:
            assert response.status_code == 200, response.text
            body = response.json()
            assert "errors" not in body, body["errors"]
            assert all(p["errors"] == [] for p in body["data"]["consumeCreditsBatch"])
    spent = await LedgerEntry.filter(account_id=service.account_id, type="USAGE").count()
    assert spent == rounds * size
    assert await assert_ledger_consistent(service.account_id) == 0


# ---------------------------------------------------------------- gateway objects, by their own id


async def resolved_by_staff(account_id: str, *event_ids: str) -> None:
    """Billing staff clear the flag and file the events away once they have looked (so the
    whole-database reconciliation of later tests is clean)."""
    await Account.filter(id=account_id).update(flag_reason=None, flagged_at=None)
    await GatewayEvent.filter(external_id__in=list(event_ids)).delete()


async def _paid(admin: Caller, credits: int) -> Payment:
    await add_card(admin, "pm_card_visa")
    bought = await buy(admin, credits)
    assert bought["payment"]["status"] == "SUCCEEDED", bought
    return await payment_row(bought["payment"]["id"])


async def test_a_dispute_of_another_intent_is_not_trusted_by_its_metadata(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """Fault 3's kind, for disputes: a signed ``charge.dispute.created`` of another
    PaymentIntent (``pi_other``) whose metadata names our paid 500-credit payment. Today the
    500 credits are taken from our account. Right: nothing moves; the event is ``mismatch``
    and the account flagged (as for ``payment_intent.*`` and ``charge.refunded``). At fault:
    billing/settlement/webhooks.py ``_dispute_payment`` (no id check after ``_find_payment``, whose
    metadata fallback does not keep to "only while that payment has no other id")."""
    stripe_only(harness)
    payment = await _paid(admin, 500)
    assert payment.gateway_payment_id
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "payment_intent": "pi_other",
        "charge": "ch_other",
        "amount": 5000,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
        "metadata": {"payment_id": str(payment.id)},
    }
    sent = event("charge.dispute.created", dispute)
    assert (await post_event(http, sent)).status_code == 200
    await queue.drain()
    assert await balance(admin) == 500
    assert await LedgerEntry.filter(account_id=admin.account_id, type="ADJUSTMENT").count() == 0
    stored = await GatewayEvent.get(external_id=sent["id"])
    assert stored.outcome == "mismatch", stored.outcome
    await resolved_by_staff(admin.account_id, sent["id"])


async def test_a_refund_of_a_charge_without_an_intent_is_not_trusted_by_its_metadata(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """Fault 3's kind, for refunds: a signed ``charge.refunded`` of a charge that is not
    our PaymentIntent's (a Charges-API charge on the same Stripe account has no
    ``payment_intent``), whose metadata names our paid payment: today its refund is booked
    on our payment (500 credits taken, payment REFUNDED). Right: mismatch, nothing moves.
    At fault: billing/settlement/webhooks.py ``_paid_payment_for_charge`` checks the intent id only
    when the charge names one, and never checks amount/currency/customer of a payment
    already SUCCEEDED."""
    stripe_only(harness)
    payment = await _paid(admin, 500)
    charge = {
        "id": f"ch_{uuid.uuid4().hex[:12]}",
        "object": "charge",
        "payment_intent": None,
        "amount": 5000,
        "currency": "usd",
        "amount_refunded": 5000,
        "refunded": True,
        "status": "succeeded",
        "paid": True,
        "metadata": {"payment_id": str(payment.id)},
    }
    sent = event("charge.refunded", charge)
    assert (await post_event(http, sent)).status_code == 200
    await queue.drain()
    after = await Payment.get(id=payment.id)
    assert (after.status, after.refunded_cents) == (PaymentStatus.SUCCEEDED, 0)
    assert await balance(admin) == 500
    assert (await GatewayEvent.get(external_id=sent["id"])).outcome == "mismatch"
    await resolved_by_staff(admin.account_id, sent["id"])


# ---------------------------------------------------------------- the Int bound


async def test_refunding_a_payment_whose_credits_could_not_be_held_takes_nothing(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """Two 3-D Secure purchases of 500 started at a balance of 2^31-1 - 600: each passes
    the bound when it is written (the check is per payment, not for what is in flight).
    Both are authenticated; the second success can't be held (BALANCE_LIMIT), so settlement
    marks it SUCCEEDED with no PURCHASE entry and flags "refund it or move credits". Staff
    refund it at Stripe, as told: ``charge.refunded`` then takes 500 credits that the
    payment never gave, from the 500 the first payment did give. Right: a refund removes
    at most what its payment credited (here 0): the balance stays 2^31-1 - 100. At fault:
    billing/settlement/webhooks.py ``_charge_refunded`` (credits from the payment's ``credits``, not
    from its credit entry) with billing/settlement/booking.py ``_succeeded`` (SUCCEEDED without an
    entry); billing/payments/purchases.py checks the bound without what is already in flight."""
    h = stripe_only(harness)
    await add_card(admin, "pm_card_authenticationRequired")
    await _fund(admin.account_id, INT_MAX - 600)
    # (A second purchase in flight is now refused: see the next test. Staff funds granted
    # while a purchase waits for 3-D Secure still leave no room for its credits.)
    second = await buy(admin, 500)
    assert second["payment"]["status"] == "REQUIRES_ACTION"
    await _fund(admin.account_id, 500)
    row = await payment_row(second["payment"]["id"])
    assert row.gateway_payment_id
    await h.complete_3ds(row.gateway_payment_id, second["payment"]["clientSecret"])
    await admin.gql(CONFIRM, {"id": second["payment"]["id"]})
    assert await balance(admin) == INT_MAX - 100
    late = await Payment.get(id=row.id)
    assert late.status is PaymentStatus.SUCCEEDED
    assert await LedgerEntry.filter(payment_id=late.id).count() == 0  # flagged, not credited
    refunded = {
        "id": f"ch_{uuid.uuid4().hex[:12]}",
        "object": "charge",
        "payment_intent": late.gateway_payment_id,
        "amount": late.amount_cents,
        "currency": "usd",
        "amount_refunded": late.amount_cents,
        "refunded": True,
        "status": "succeeded",
    }
    assert (await post_event(http, event("charge.refunded", refunded))).status_code == 200
    await queue.drain()
    assert await balance(admin) == INT_MAX - 100
    assert await LedgerEntry.filter(account_id=admin.account_id, type="REFUND").count() == 0
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


async def test_purchases_in_flight_never_take_money_for_credits_that_cannot_be_held(
    admin: Caller, harness: GatewayHarness
) -> None:
    """The root of the case above, on both gateways: at 2^31-1 - 600, two 3-D Secure
    purchases of 500 are each checked against the balance alone (not what is in flight),
    both are written and sent, both are authenticated: the card pays $100 and 500 credits
    land. Right (invariant 10, "refused before anything is written"): the second purchase
    is refused with BALANCE_LIMIT, or every succeeded purchase has its credits. At fault:
    billing/payments/purchases.py (``account.balance > MAX_BALANCE - credits`` ignores PENDING and
    REQUIRES_ACTION purchases)."""
    await add_card(admin, "pm_card_authenticationRequired")
    await _fund(admin.account_id, INT_MAX - 600)
    first = await buy(admin, 500)
    second = await buy(admin, 500)
    for bought in (first, second):
        if bought["payment"] is None:
            continue
        row = await payment_row(bought["payment"]["id"])
        assert row.gateway_payment_id
        await harness.complete_3ds(row.gateway_payment_id, bought["payment"]["clientSecret"])
        await admin.gql(CONFIRM, {"id": bought["payment"]["id"]})
    paid = await Payment.filter(account_id=admin.account_id, status=PaymentStatus.SUCCEEDED)
    credited = await LedgerEntry.filter(account_id=admin.account_id, type="PURCHASE").count()
    assert (len(paid), credited) == (1, 1), [(p.credits, p.status) for p in paid]
    assert await balance(admin) == INT_MAX - 100
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


# ---------------------------------------------------------------- events kept pending


async def test_a_dashboard_charge_of_our_customer_is_not_kept_pending_forever(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """Billing staff charge a customer by hand in the Stripe dashboard (a PaymentIntent of
    our customer that this service never created: no ``metadata.payment_id``). Its
    ``payment_intent.succeeded`` is kept ``pending`` ("no payment of ours yet") although
    nothing can ever make it ours: the sweep retries it every minute for good and
    reconciliation reports it as a discrepancy every day after the first (exit 1 forever).
    Right: it is ``ignored`` (processed).
    At fault: billing/settlement/webhooks.py ``_payment_intent``
    (and ``_paid_payment_for_charge``): "our customer" alone is taken as "may become ours",
    where only an intent whose metadata names a payment of ours can be."""
    stripe_only(harness)
    await add_card(admin, "pm_card_visa")
    account = await Account.get(id=admin.account_id)
    manual = {
        "id": f"pi_{uuid.uuid4().hex[:14]}",
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 12000,
        "currency": "usd",
        "customer": account.gateway_customer_id,
        "description": "Onboarding fee (charged by accounting)",
        "metadata": {},
    }
    sent = event("payment_intent.succeeded", manual)
    assert (await post_event(http, sent)).status_code == 200
    await queue.drain()
    stored = await GatewayEvent.get(external_id=sent["id"])
    assert stored.processed_at is not None, (stored.outcome, stored.last_error)
    await GatewayEvent.filter(external_id=sent["id"]).delete()


# ---------------------------------------------------------------- threshold crossings


async def test_a_late_recharge_success_does_not_close_a_newer_crossing(
    admin: Caller,
    service: Caller,
    staff: Caller,
    queue: InProcessQueue,
    gateway: Any,
    gateway_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threshold 1,000, recharge 100. Crossing 1 (1,000 -> 988) starts recharge P1, whose
    gateway call times out (P1 stays PENDING: the sweep will settle it). Staff grant 1,000
    (1,988: at or above the threshold again), a spend of 1,500 crosses again (crossing 2,
    488); its job finds P1 in flight. The sweep settles P1 as succeeded (588) and
    ``runs.settle`` closes *the open crossing*, which is now crossing 2: no charge ever
    serves it, and the balance stays at 588, under the threshold, for good. Right (issue 10,
    fault 4: "none until the balance has been at or above the threshold again"): crossing 2
    gets its own charge (2 recharges, 688). At fault: billing/recharge/runs.py ``settle`` ->
    ``_next_crossing(served=True)`` -> ``close_crossing`` closes whatever crossing is open,
    not the one the payment was for (its ``trigger_key`` names the crossing number)."""
    from billing.payments.gateways import GatewayUnavailable

    if gateway_name != "sandbox":
        pytest.skip("the gateway's answer is not what is tried here: one gateway is enough")
    await add_card(admin, "pm_card_visa")
    await _fund(admin.account_id, 1000)
    data = await admin.gql(
        AUTO_RECHARGE,
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": 1000,
                "rechargeCredits": 100,
            }
        },
    )
    assert data["updateAutoRecharge"]["errors"] == [], data
    await queue.drain()
    real_charge = gateway.charge

    async def timed_out(request: Any) -> Any:
        raise GatewayUnavailable("read timeout")

    monkeypatch.setattr(gateway, "charge", timed_out)
    assert (await consume(service, "POSTCARD", 1))["errors"] == []  # crossing 1: 988
    await queue.drain()
    monkeypatch.setattr(gateway, "charge", real_charge)
    in_flight = await Payment.get(account_id=admin.account_id, kind="AUTO_RECHARGE")
    assert in_flight.status is PaymentStatus.PENDING
    await _fund(admin.account_id, 1000)  # 1,988
    assert (await consume(service, "POSTCARD", 125))["errors"] == []  # crossing 2: 488
    await queue.drain()
    for minutes in (10, 20, 30):  # the sweep: P1 is settled, then whatever is still open
        with clock.travel(clock.now() + timedelta(minutes=minutes)):
            await queue.functions["sweep"](queue.ctx)
            await queue.drain()
    succeeded = await Payment.filter(
        account_id=admin.account_id, kind="AUTO_RECHARGE", status=PaymentStatus.SUCCEEDED
    ).count()
    assert (succeeded, await balance(admin)) == (2, 688)


# ---------------------------------------------------------------- refunds and disputes


async def _deliver_at_once(queue: InProcessQueue, *events: dict[str, Any]) -> None:
    """Stripe delivers these events; the worker runs their jobs at the same time (arq runs
    up to ``max_jobs`` jobs at once)."""
    from tortoise.transactions import in_transaction

    from billing.settlement import webhooks

    ids = []
    for sent in events:
        async with in_transaction():
            stored = await webhooks.record("stripe", sent)
        assert stored is not None
        ids.append(stored)
    job = queue.functions["process_gateway_event"]
    await asyncio.gather(*(job(queue.ctx, i) for i in ids))


async def test_two_refund_events_applied_at_once_take_the_refund_once(
    admin: Caller, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A partial refund of 20.00 and then the rest (50.00 in all) of a 500-credit payment:
    two ``charge.refunded`` events (cumulative ``amount_refunded`` 2000, then 5000), whose
    jobs run at once. Each reads the payment's ``refunded_cents`` (0) before taking the
    account lock, so the first takes 200 and the second 500: 700 credits for a 500-credit
    payment. Right: 500 in all, whatever the timing (on SQLite writers are serialised and
    it holds; on PostgreSQL it breaks).
    At fault: billing/settlement/webhooks.py ``_charge_refunded``
    (the payment row is read without a lock; the account lock in ``_take_back`` comes after
    the share was computed from it)."""
    stripe_only(harness)
    payment = await _paid(admin, 500)
    await _fund(admin.account_id, 1000)  # other credits: a refund can't be capped at zero
    for_charge = f"ch_{uuid.uuid4().hex[:12]}"

    def refunded(cents: int) -> dict[str, Any]:
        return event(
            "charge.refunded",
            {
                "id": for_charge,
                "object": "charge",
                "payment_intent": payment.gateway_payment_id,
                "amount": payment.amount_cents,
                "currency": "usd",
                "amount_refunded": cents,
                "refunded": cents >= payment.amount_cents,
                "status": "succeeded",
            },
        )

    await _deliver_at_once(queue, refunded(2000), refunded(5000))
    assert await balance(admin) == 1000
    refunds = await LedgerEntry.filter(payment_id=payment.id, type="REFUND")
    assert sum(r.credits for r in refunds) == -500, [r.credits for r in refunds]
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


async def test_a_dispute_delivered_twice_at_once_takes_the_credits_once(
    admin: Caller, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """``charge.dispute.created`` for one dispute arrives as two events (Stripe sends
    ``charge.dispute.created`` and may redeliver under a new event id after a timeout; the
    shipped test plays them one after the other); their jobs run at once. Both check "no
    entry with reference dispute:<id>" before either has written it: 400 credits are taken
    twice. Right: once.
    At fault: billing/settlement/webhooks.py ``_dispute_created`` (the exists check
    runs before ``posting.lock_account``; nothing unique holds ``reference``); the same
    shape in ``_dispute_closed`` gives a win back twice."""
    stripe_only(harness)
    payment = await _paid(admin, 400)
    await _fund(admin.account_id, 1000)
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "payment_intent": payment.gateway_payment_id,
        "amount": payment.amount_cents,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
    }
    await _deliver_at_once(
        queue, event("charge.dispute.created", dispute), event("charge.dispute.created", dispute)
    )
    taken = await LedgerEntry.filter(account_id=admin.account_id, type="ADJUSTMENT")
    assert [t.credits for t in taken] == [-400]
    assert await balance(admin) == 1000
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


async def test_a_dispute_won_after_the_credits_were_spent_is_not_kept_pending_forever(
    admin: Caller,
    service: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    harness: GatewayHarness,
) -> None:
    """The customer buys 400 credits, spends them all, then disputes the charge; the
    dispute's opening takes nothing (balance 0: no ledger entry, the account is flagged).
    We win the dispute: ``charge.dispute.closed`` (won) looks for the opening's entry, finds
    none and is kept ``pending`` "the dispute's opening is not booked yet" — for good: the
    sweep retries it every minute and reconciliation reports it once it is a day old, with
    nothing anyone can do. Right: the win is applied (nothing to give back) and the event is
    processed. At fault: billing/settlement/webhooks.py ``_dispute_closed`` (``taken is None`` means
    "not booked yet" even when the opening was booked and took 0) with ``_dispute_created``
    (which records nothing when it takes 0). The same happens for a dispute of a fully
    refunded payment (``open_cents`` 0)."""
    stripe_only(harness)
    payment = await _paid(admin, 400)
    for _ in range(40):  # 400 credits of postcards (12 each) and letters: down to 0
        if await balance(admin) < 12:
            break
        assert (await consume(service, "POSTCARD", 1))["errors"] == []
    rest = await balance(admin)
    if rest:
        await _take(admin.account_id, rest)
    assert await balance(admin) == 0
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "payment_intent": payment.gateway_payment_id,
        "amount": payment.amount_cents,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
    }
    assert (await post_event(http, event("charge.dispute.created", dispute))).status_code == 200
    await queue.drain()
    won = event("charge.dispute.closed", {**dispute, "status": "won"})
    assert (await post_event(http, won)).status_code == 200
    await queue.drain()
    stored = await GatewayEvent.get(external_id=won["id"])
    assert stored.processed_at is not None, (stored.outcome, stored.last_error)
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)
    await GatewayEvent.filter(external_id=won["id"]).delete()


async def _take(account_id: str, credits: int) -> None:
    from tortoise.transactions import in_transaction

    async with in_transaction():
        await posting.post(
            Movement(
                account_id=account_id,
                credits=-credits,
                type=TransactionType.ADJUSTMENT,
                process_type=ProcessType.ADMINISTRATIVE,
                description="Adjustment: review",
                user_id="staff-1",
            )
        )


async def test_an_inquiry_closed_without_a_chargeback_gives_the_credits_back(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A Stripe *inquiry* (a retrieval request: ``charge.dispute.created`` with status
    ``warning_needs_response``) withdraws no funds; it closes as ``warning_closed`` when it
    does not escalate. Today the opening takes the 400 credits and the close gives nothing
    back (only ``won`` does): the customer loses 400 credits while the vendor kept the $40.
    Right: after the inquiry closed without a chargeback the balance is 400 again (or an
    inquiry takes nothing). At fault: billing/settlement/webhooks.py ``_dispute_created`` (takes on
    any status) and ``_dispute_closed`` (``status != "won"`` keeps the credits)."""
    stripe_only(harness)
    payment = await _paid(admin, 400)
    inquiry = {
        "id": f"du_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "payment_intent": payment.gateway_payment_id,
        "amount": payment.amount_cents,
        "currency": "usd",
        "reason": "general",
        "status": "warning_needs_response",
        "is_charge_refundable": True,
    }
    for kind, obj in (
        ("charge.dispute.created", inquiry),
        ("charge.dispute.closed", {**inquiry, "status": "warning_closed"}),
    ):
        assert (await post_event(http, event(kind, obj))).status_code == 200
        await queue.drain()
    assert await balance(admin) == 400
    assert await assert_ledger_consistent(admin.account_id) == 400
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


async def test_a_dispute_won_at_the_balance_limit_is_recorded_not_an_error(
    admin: Caller, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A dispute takes 500 credits; the balance is then brought to 2^31-1 - 100 (grants);
    the dispute is won. Giving the 500 back would pass the bound, so ``posting.post`` raises
    BALANCE_LIMIT inside the event's job: the job fails with an exception, the event stays
    unprocessed with no outcome and no reason, and the sweep repeats the failure every
    minute. Right (as ``booking._succeeded`` does for a payment): the event is processed
    or visibly kept, and the account flagged ("credits can't be returned: move credits").
    At fault: billing/settlement/webhooks.py ``_dispute_closed`` (no BALANCE_LIMIT handling)."""
    stripe_only(harness)
    payment = await _paid(admin, 500)
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "payment_intent": payment.gateway_payment_id,
        "amount": payment.amount_cents,
        "currency": "usd",
        "reason": "fraudulent",
        "status": "needs_response",
    }
    await _deliver_at_once(queue, event("charge.dispute.created", dispute))
    assert await balance(admin) == 0
    await _fund(admin.account_id, INT_MAX - 100)
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)
    won = event("charge.dispute.closed", {**dispute, "status": "won"})
    await _deliver_at_once(queue, won)  # raises BillingError(BALANCE_LIMIT) today
    stored = await GatewayEvent.get(external_id=won["id"])
    assert stored.outcome is not None
    flagged = await Account.get(id=admin.account_id)
    assert flagged.flag_reason
    assert await balance(admin) == INT_MAX - 100
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)
    await GatewayEvent.filter(external_id=won["id"]).delete()


# ---------------------------------------------------------------- invoices: minimum and Int


async def test_a_carried_amount_never_pushes_an_invoice_past_int(
    admin: Caller, service: Caller, gateway: Any, settings: Any
) -> None:
    """Month 1: 30 cents of business cards, CARRIED_FORWARD. Month 2: metered usage of
    2^31-1 - 10 cents (``recordMeteredUsage`` accepts it: its bound is the month's usage,
    not the invoice's total; the rows are written directly here to save 860,000 calls).
    Closing month 2 adds the 30 carried cents: 2^31-1 + 20, which the invoice table's CHECK
    refuses; ``close_monthly_invoices`` logs the exception and goes on, so month 2 is never
    invoiced (every run fails the same way) and $21M of usage is never billed. Right: every
    invoice fits Int and month 2 is invoiced (the carry waits, or is billed on its own).
    At fault: billing/invoices.py ``close_month`` (total = usage + carried, unchecked)
    with billing/spending/usage.py ``record_metered`` (bounds the month, not month + carry)."""
    from billing.enums import InvoiceStatus
    from billing.models import Invoice, MeteredUsage
    from billing.pricing import load_price_book
    from tests.api.test_invoices import CARDS, a_month, next_month, use
    from workers.invoicing import INVOICE_FUNCTIONS

    await add_card(admin, "pm_card_visa")
    first = a_month()
    second = next_month(first)
    third = next_month(second)
    ctx: dict[str, Any] = {"gateway": gateway, "book": load_price_book(settings.price_book_path)}
    queue = InProcessQueue(INVOICE_FUNCTIONS, ctx)
    queue.ctx["queue"] = queue
    await use(service, CARDS, 3, first + timedelta(days=3))  # 30 cents
    with clock.travel(second + timedelta(hours=1)):
        await INVOICE_FUNCTIONS["close_monthly_invoices"](queue.ctx)
    await queue.drain()
    amount = INT_MAX - 10
    await MeteredUsage.create(
        id=uuid.uuid4(),
        account_id=admin.account_id,
        user_id="transcriber",
        process_type=CARDS,
        quantity=1,
        unit_cents=amount,
        amount_cents=amount,
        reference=None,
        created_at=second + timedelta(days=3),
    )
    with clock.travel(third + timedelta(hours=1)):
        await INVOICE_FUNCTIONS["close_monthly_invoices"](queue.ctx)
    await queue.drain()  # its charge runs here, not in a later test
    found = await Invoice.filter(account_id=admin.account_id).order_by("period_start")
    assert [i.period_start for i in found] == [first, second], [
        (i.period_start, i.status, i.amount_cents) for i in found
    ]
    assert all(i.amount_cents <= INT_MAX for i in found)
    assert found[1].status is not InvoiceStatus.CARRIED_FORWARD


# ---------------------------------------------------------------- reconciliation


class _Planted(Exception):
    """Raised to roll back what a test planted."""


async def test_reconcile_reports_refund_entries_that_exceed_the_refunded_share(
    admin: Caller, harness: GatewayHarness
) -> None:
    """What the concurrent refunds above leave behind: a 500-credit payment refunded in full
    (``refunded_cents`` 5000, as at Stripe) with REFUND entries of -700 (a -200 here is
    injected as the race writes it). Reconciliation compares ``refunded_cents`` with Stripe
    (equal) and checks credit entries, never the REFUND entries against the refunded share:
    it is clean. Right (issue 10: "a refund without its REFUND entry" is a discrepancy, and
    so is the converse): a discrepancy line and exit 1. At fault: billing/reconcile.py (no
    refund-entry check)."""
    from tortoise.transactions import in_transaction

    from billing import reconcile

    h = stripe_only(harness)
    payment = await _paid(admin, 500)
    await _fund(admin.account_id, 1000)
    charge = await h.http.get(
        f"/v1/payment_intents/{payment.gateway_payment_id}", params={"expand[]": "latest_charge"}
    )
    refund = await h.http.post("/v1/refunds", data={"charge": charge.json()["latest_charge"]["id"]})
    refund.raise_for_status()
    reports: list[Any] = []
    with pytest.raises(_Planted):  # planted, checked, rolled back (the ledger is append-only)
        async with in_transaction():
            for credits in (-500, -200):
                await posting.post(
                    Movement(
                        account_id=admin.account_id,
                        credits=credits,
                        type=TransactionType.REFUND,
                        process_type=ProcessType.MANUAL_PURCHASE,
                        description="Refund of 50.00 USD on a card payment",
                        payment_id=payment.id,
                    )
                )
            await Payment.filter(id=payment.id).update(
                status=PaymentStatus.REFUNDED, refunded_cents=payment.amount_cents
            )
            reports.append(await reconcile.run([admin.account_id], h.gateway))
            raise _Planted
    [report] = reports
    assert report.discrepancies, "a 500-credit payment refunded by 700 credits went unreported"


async def test_reconcile_reports_a_dispute_at_stripe_that_was_never_booked(
    admin: Caller, harness: GatewayHarness
) -> None:
    """The issue asks reconciliation to check "status, amount, currency, refunded amount,
    disputes" against the gateway. A charge disputed at Stripe whose
    ``charge.dispute.created`` never reached us (delivery given up after Stripe's three
    days of retries) keeps its 400 credits here, and reconciliation is clean: it reads the
    PaymentIntent's ``latest_charge`` but not its ``disputed`` flag (localstripe has no
    disputes, so Stripe's answer is given that flag here). Right: a discrepancy line. At
    fault: billing/reconcile.py ``_intent_problems`` (no dispute check)."""
    from billing import reconcile
    from tests.support.gateways import CountingStripeGateway

    h = stripe_only(harness)
    payment = await _paid(admin, 400)

    class DisputedAtStripe(CountingStripeGateway):
        async def retrieve_intent(self, gateway_payment_id: str) -> dict[str, Any] | None:
            found = await super().retrieve_intent(gateway_payment_id)
            if found is not None and gateway_payment_id == payment.gateway_payment_id:
                found["latest_charge"] = {**found["latest_charge"], "disputed": True}
            return found

    stripe = DisputedAtStripe("sk_test_suite", api_base=h.url, max_network_retries=0)
    report = await reconcile.run([admin.account_id], stripe)
    assert report.discrepancies, "a disputed charge with its credits still here went unreported"


# ---------------------------------------------------------------- what else the review saw


async def test_a_refund_opens_no_threshold_crossing(
    admin: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    harness: GatewayHarness,
) -> None:
    """A refund (or dispute) takes credits back; it must not set off an auto-recharge on
    the very card that was just refunded or disputed."""
    h = stripe_only(harness)
    payment = await _paid(admin, 500)
    data = await admin.gql(
        AUTO_RECHARGE,
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": 300,
                "rechargeCredits": 100,
            }
        },
    )
    assert data["updateAutoRecharge"]["errors"] == [], data
    charge = (
        await h.http.get(
            f"/v1/payment_intents/{payment.gateway_payment_id}",
            params={"expand[]": "latest_charge"},
        )
    ).json()["latest_charge"]
    refunded = {**charge, "amount_refunded": 5000, "refunded": True}
    assert (await post_event(http, event("charge.refunded", refunded))).status_code == 200
    await queue.drain()
    await queue.functions["sweep"](queue.ctx)
    await queue.drain()
    assert await balance(admin) == 0
    assert await Payment.filter(account_id=admin.account_id, kind="AUTO_RECHARGE").count() == 0


async def test_an_invoice_paid_twice_is_flagged_and_reconciled(admin: Caller) -> None:
    """A late success of an older attempt's payment, after a newer attempt paid the invoice,
    is money taken twice: the account is flagged and reconciliation reports it."""
    from tortoise.transactions import in_transaction

    from billing import invoices, reconcile, sql
    from billing.enums import InvoiceStatus, PaymentKind
    from billing.models import Invoice

    await add_card(admin, "pm_card_visa")
    now = sql.now()
    invoice_id = uuid.uuid4()
    await Invoice.create(
        id=invoice_id,
        account_id=admin.account_id,
        period_start=now - timedelta(days=40),
        period_end=now - timedelta(days=10),
        status=InvoiceStatus.OPEN,
        amount_cents=900,
        currency="usd",
        created_at=now,
    )
    payments = []
    for attempt in (1, 2):
        payments.append(
            await Payment.create(
                id=uuid.uuid4(),
                account_id=admin.account_id,
                kind=PaymentKind.INVOICE,
                status=PaymentStatus.SUCCEEDED,
                credits=0,
                amount_cents=900,
                currency="usd",
                trigger_key=invoices.trigger_key(invoice_id, attempt),
                created_at=now,
                updated_at=now,
            )
        )
    async with in_transaction():
        for payment in payments:
            await invoices.settle_payment(payment)
    flagged = await Account.get(id=admin.account_id)
    assert flagged.flag_reason and "Paid twice" in flagged.flag_reason
    report = await reconcile.run([admin.account_id])
    assert [d.check for d in report.discrepancies] == ["flagged"]
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


async def test_a_pending_payment_older_than_the_key_lifetime_is_not_charged_again(
    admin: Caller, gateway: Any
) -> None:
    """Stripe forgets an idempotency key after 24 hours: the sweep does not send it again
    (it could charge twice); the account is flagged for staff to look the payment up."""
    from billing import sql
    from billing.models import Card
    from billing.settlement import heal

    await add_card(admin, "pm_card_visa")
    card = await Card.get(account_id=admin.account_id)
    old = sql.now() - timedelta(hours=30)
    payment = await Payment.create(
        id=uuid.uuid4(),
        account_id=admin.account_id,
        card_id=card.id,
        kind="PURCHASE",
        status=PaymentStatus.PENDING,
        credits=100,
        amount_cents=1000,
        currency="usd",
        created_at=old,
        updated_at=old,
    )
    charges = gateway.charge_count
    assert await heal.heal_payment(gateway, payment.id) is PaymentStatus.PENDING
    assert gateway.charge_count == charges
    flagged = await Account.get(id=admin.account_id)
    assert flagged.flag_reason and str(payment.id) in flagged.flag_reason


async def test_flags_accumulate_until_staff_clear_them(admin: Caller) -> None:
    from billing.settlement import booking

    await add_card(admin, "pm_card_visa")
    await booking.flag(admin.account_id, f"{booking.MISMATCH_FLAG} first")
    await booking.flag(admin.account_id, "Refund exceeded the balance by 3 credits")
    reason = (await Account.get(id=admin.account_id)).flag_reason or ""
    assert "Refund exceeded" in reason and booking.MISMATCH_FLAG in reason
    await Account.filter(id=admin.account_id).update(flag_reason=None, flagged_at=None)


async def test_a_charge_of_a_purchase_whose_answer_was_lost_is_kept_not_dropped(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A purchase whose answer was lost (a crash: PENDING, no intent id) may be refunded
    before anything heals it. Stripe does not copy the intent's metadata onto its charge, so
    the charge is recognised by its customer and amount: kept pending (the sweep applies it
    once the intent is learnt), while a charge of another amount is not ours."""
    from billing import sql

    stripe_only(harness)
    await add_card(admin, "pm_card_visa")
    account = await Account.get(id=admin.account_id)
    now = sql.now()
    lost = await Payment.create(
        id=uuid.uuid4(),
        account_id=admin.account_id,
        kind="PURCHASE",
        status=PaymentStatus.PENDING,
        credits=300,
        amount_cents=3000,
        currency="usd",
        created_at=now,
        updated_at=now,
    )

    def charge(amount: int) -> dict[str, Any]:
        return {
            "id": f"ch_{uuid.uuid4().hex[:12]}",
            "object": "charge",
            "payment_intent": f"pi_{uuid.uuid4().hex[:14]}",
            "customer": account.gateway_customer_id,
            "amount": amount,
            "amount_refunded": amount,
            "currency": "usd",
            "status": "succeeded",
            "paid": True,
            "metadata": {},
        }

    ours, other = event("charge.refunded", charge(3000)), event("charge.refunded", charge(1234))
    for sent in (ours, other):
        assert (await post_event(http, sent)).status_code == 200
    await queue.drain()
    kept = await GatewayEvent.get(external_id=ours["id"])
    assert (kept.outcome, kept.processed_at) == ("pending", None)
    assert (await GatewayEvent.get(external_id=other["id"])).outcome == "ignored"
    # Tidy up as the sweep would once the payment settled: nothing of this is left pending.
    await Payment.filter(id=lost.id).update(status=PaymentStatus.FAILED)
    await GatewayEvent.filter(external_id__in=[ours["id"], other["id"]]).delete()
