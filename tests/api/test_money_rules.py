"""Issue 10's scenarios, each with its right value, on both gateways where they can be played
(Stripe's events are built from localstripe's own objects and signed) and on both databases.

1. A payment booked FAILED that later succeeds at the gateway is credited once.
2. A refund delivered before the success is applied (the success first), never dropped.
3. A gateway object is matched by its own id and checked against what we asked for.
4. One threshold crossing causes one recharge, by every path.
5. No balance (or figure the API serves) goes past GraphQL's Int.
6. No charge under the gateway's minimum is sent.
7. One idempotency key used by single spends and batches at once never breaks.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from tortoise.exceptions import IntegrityError, OperationalError
from tortoise.transactions import in_transaction

from api import ids
from billing import clock, reconcile, sql
from billing.enums import AutoRechargeTrigger, ErrorCode, PaymentStatus
from billing.errors import BillingError
from billing.models import Account, Card, GatewayEvent, LedgerEntry, Payment
from billing.payments import purchases
from billing.payments.gateways import AmountBelowMinimum, ChargeRequest, minimum_charge_cents
from billing.pricing import load_price_book
from billing.recharge import autorecharge
from runtime.queue import InProcessQueue
from tests.api.test_batch import BATCH
from tests.api.test_stripe import CONFIRM, event, intent, payment_row, post_event
from tests.conftest import Caller
from tests.support.gateways import GatewayHarness, StripeHarness
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import (
    AUTO_RECHARGE,
    CONSUME,
    GRANT,
    HISTORY,
    add_card,
    balance,
    buy,
    codes,
    consume,
    grant,
    key,
)

INT_MAX = 2**31 - 1


async def card_pm(card_gid: str) -> str:
    card_id = ids.decode("Card", card_gid)
    return (await Card.get(id=card_id)).gateway_payment_method_id


async def entries(account_id: str) -> list[tuple[str, int]]:
    rows = await LedgerEntry.filter(account_id=account_id).order_by("created_at", "id")
    return [(e.type.value, e.credits) for e in rows]


async def resolved_by_staff(account_id: str, *event_ids: str) -> None:
    """What billing staff do once they have looked into a mismatch: clear the flag and file
    the events away (so the whole-database reconciliation of later tests is clean)."""
    await Account.filter(id=account_id).update(flag_reason=None, flagged_at=None)
    await GatewayEvent.filter(external_id__in=list(event_ids)).delete()


async def sweep(queue: InProcessQueue) -> None:
    await queue.functions["sweep"](queue.ctx)
    await queue.drain()


def stripe_only(harness: GatewayHarness) -> StripeHarness:
    if not isinstance(harness, StripeHarness):
        pytest.skip("gateway events are Stripe's (this path is played with localstripe)")
    return harness


# ---------------------------------------------------------------- 1. FAILED, then succeeded


async def _failed_then_retried(
    admin: Caller, harness: GatewayHarness
) -> tuple[dict[str, Any], Payment]:
    """A 3-D Secure purchase of 500: the challenge fails (``requires_payment_method``, not
    final), confirm answers FAILED; the customer retries the same intent and passes."""
    card = await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 500)
    assert bought["payment"]["status"] == "REQUIRES_ACTION", bought
    row = await payment_row(bought["payment"]["id"])
    assert row.gateway_payment_id
    secret = bought["payment"]["clientSecret"]
    await harness.fail_3ds(row.gateway_payment_id, secret)
    failed = (await admin.gql(CONFIRM, {"id": bought["payment"]["id"]}))["confirmPurchase"]
    assert failed["payment"]["status"] == "FAILED"
    assert codes(failed) == ["CARD_DECLINED"]
    assert failed["balance"] == 0
    await harness.retry(row.gateway_payment_id, await card_pm(card["id"]))
    await harness.complete_3ds(row.gateway_payment_id, secret)
    return bought["payment"], row


@pytest.mark.parametrize(
    "order",
    [
        ("confirm",),
        ("sweep",),
        ("webhook",),
        ("webhook", "confirm", "sweep"),
        ("sweep", "webhook", "confirm", "webhook"),
    ],
    ids=lambda o: "-".join(o),
)
async def test_a_failed_payment_that_later_succeeds_is_credited_once(
    admin: Caller,
    http: httpx.AsyncClient,
    queue: InProcessQueue,
    harness: GatewayHarness,
    order: tuple[str, ...],
) -> None:
    if "webhook" in order:
        stripe_only(harness)
    payment, row = await _failed_then_retried(admin, harness)
    assert row.gateway_payment_id
    for step in order:
        if step == "confirm":
            done = (await admin.gql(CONFIRM, {"id": payment["id"]}))["confirmPurchase"]
            assert done["errors"] == [] and done["payment"]["status"] == "SUCCEEDED", done
        elif step == "sweep":
            await sweep(queue)
        else:
            assert isinstance(harness, StripeHarness)
            succeeded = event(
                "payment_intent.succeeded", await intent(harness, row.gateway_payment_id)
            )
            assert (await post_event(http, succeeded)).status_code == 200
            await queue.drain()
    assert await balance(admin) == 500
    assert await entries(admin.account_id) == [("PURCHASE", 500)]
    assert (await Payment.get(id=row.id)).status is PaymentStatus.SUCCEEDED
    assert await assert_ledger_consistent(admin.account_id) == 500


async def test_a_failed_purchase_retried_into_3ds_again_can_be_finished(
    admin: Caller, harness: GatewayHarness
) -> None:
    """The retry asks for authentication again: the payment waits again (REQUIRES_ACTION,
    with its client secret) instead of staying FAILED, so the page can finish it."""
    card = await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 300)
    row = await payment_row(bought["payment"]["id"])
    assert row.gateway_payment_id
    await harness.fail_3ds(row.gateway_payment_id, bought["payment"]["clientSecret"])
    assert (await admin.gql(CONFIRM, {"id": bought["payment"]["id"]}))["confirmPurchase"][
        "payment"
    ]["status"] == "FAILED"
    await harness.retry(row.gateway_payment_id, await card_pm(card["id"]))
    again = (await admin.gql(CONFIRM, {"id": bought["payment"]["id"]}))["confirmPurchase"]
    assert again["payment"]["status"] == "REQUIRES_ACTION" and again["errors"] == []
    assert again["payment"]["clientSecret"]
    await harness.complete_3ds(row.gateway_payment_id, again["payment"]["clientSecret"])
    done = (await admin.gql(CONFIRM, {"id": bought["payment"]["id"]}))["confirmPurchase"]
    assert done["payment"]["status"] == "SUCCEEDED" and done["balance"] == 300


# ---------------------------------------------------------------- 2. events out of order


async def _charge_of(h: StripeHarness, intent_id: str) -> dict[str, Any]:
    found = await h.http.get(
        f"/v1/payment_intents/{intent_id}", params={"expand[]": "latest_charge"}
    )
    found.raise_for_status()
    charge = found.json()["latest_charge"]
    assert isinstance(charge, dict) and charge["payment_intent"] == intent_id, charge
    return dict(charge)


async def test_a_refund_delivered_before_the_success_is_applied(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    h = stripe_only(harness)
    await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 500)
    row = await payment_row(bought["payment"]["id"])
    assert row.gateway_payment_id
    await h.complete_3ds(row.gateway_payment_id, bought["payment"]["clientSecret"])
    charge = await _charge_of(h, row.gateway_payment_id)
    refund = await h.http.post("/v1/refunds", data={"charge": charge["id"]})
    refund.raise_for_status()
    charge = await _charge_of(h, row.gateway_payment_id)
    assert charge["amount_refunded"] == 5000
    # Stripe does not order deliveries: the refund comes first.
    assert (await post_event(http, event("charge.refunded", charge))).status_code == 200
    await queue.drain()
    succeeded = event("payment_intent.succeeded", await intent(h, row.gateway_payment_id))
    assert (await post_event(http, succeeded)).status_code == 200
    await queue.drain()
    assert await entries(admin.account_id) == [("PURCHASE", 500), ("REFUND", -500)]
    assert await balance(admin) == 0
    paid = await Payment.get(id=row.id)
    assert (paid.status, paid.refunded_cents) == (PaymentStatus.REFUNDED, 5000)
    assert await assert_ledger_consistent(admin.account_id) == 0
    report = await reconcile.run([admin.account_id], h.gateway)
    assert report.discrepancies == [], [d.line() for d in report.discrepancies]


async def test_an_event_that_cannot_apply_yet_is_kept_and_applied_by_the_sweep(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A dispute of a payment not yet booked as paid waits (pending), and is applied once
    the success is known: nothing is dropped."""
    h = stripe_only(harness)
    await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 400)
    row = await payment_row(bought["payment"]["id"])
    assert row.gateway_payment_id
    dispute = {
        "id": f"dp_{uuid.uuid4().hex[:12]}",
        "object": "dispute",
        "payment_intent": row.gateway_payment_id,
        "amount": 4000,
        "reason": "fraudulent",
        "status": "needs_response",
    }
    created = event("charge.dispute.created", dispute)
    assert (await post_event(http, created)).status_code == 200
    await queue.drain()
    stored = await GatewayEvent.get(external_id=created["id"])
    assert (stored.processed_at, stored.outcome) == (None, "pending")
    assert await balance(admin) == 0
    # The customer authenticates; the success is seen (here: by the sweep's re-read).
    await h.complete_3ds(row.gateway_payment_id, bought["payment"]["clientSecret"])
    await sweep(queue)  # re-reads the payment at the gateway: succeeded
    # The kept event is due again a minute after it arrived (moved back, not the clock:
    # entries written meanwhile keep their real times).
    await GatewayEvent.filter(id=stored.id).update(
        received_at=stored.received_at - timedelta(minutes=2)
    )
    await sweep(queue)
    stored = await GatewayEvent.get(external_id=created["id"])
    assert stored.processed_at is not None and stored.outcome == "applied"
    assert await entries(admin.account_id) == [("PURCHASE", 400), ("ADJUSTMENT", -400)]
    # Won: the credits come back, once.
    closed = event("charge.dispute.closed", {**dispute, "status": "won"})
    for _ in range(2):
        assert (await post_event(http, closed)).status_code == 200
        await queue.drain()
    assert await balance(admin) == 400
    assert await assert_ledger_consistent(admin.account_id) == 400


# ---------------------------------------------------------------- 3. matched by its own id


async def test_a_webhook_object_is_not_trusted_by_its_metadata(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    h = stripe_only(harness)
    await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 500)
    row = await payment_row(bought["payment"]["id"])
    ours = row.gateway_payment_id
    account = await Account.get(id=admin.account_id)
    forged = {
        "id": "pi_other",
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 50,
        "currency": "usd",
        "customer": account.gateway_customer_id,
        "metadata": {"payment_id": str(row.id), "account_id": admin.account_id},
    }
    sent = event("payment_intent.succeeded", forged)
    assert (await post_event(http, sent)).status_code == 200
    await queue.drain()
    after = await Payment.get(id=row.id)
    assert (after.status, after.gateway_payment_id) == (PaymentStatus.REQUIRES_ACTION, ours)
    assert await balance(admin) == 0 and await entries(admin.account_id) == []
    stored = await GatewayEvent.get(external_id=sent["id"])
    assert stored.outcome == "mismatch" and stored.processed_at is not None
    flagged = await Account.get(id=admin.account_id)
    assert flagged.flag_reason and str(row.id) in flagged.flag_reason
    report = await reconcile.run(None, None)
    lines = [d.line() for d in report.discrepancies]
    assert any(sent["id"] in line and "does not match" in line for line in lines), lines
    assert any(line.startswith(f"flagged: account {admin.account_id}") for line in lines), lines

    # Our own intent with another amount (a forged or mistaken object) changes nothing either.
    assert ours is not None
    real = await intent(h, ours)
    wrong = event("payment_intent.succeeded", {**real, "status": "succeeded", "amount": 1})
    assert (await post_event(http, wrong)).status_code == 200
    await queue.drain()
    assert (await Payment.get(id=row.id)).status is PaymentStatus.REQUIRES_ACTION
    assert (await GatewayEvent.get(external_id=wrong["id"])).outcome == "mismatch"
    await resolved_by_staff(admin.account_id, sent["id"], wrong["id"])


async def test_a_payment_whose_intent_we_never_learnt_checks_the_amount(
    admin: Caller, http: httpx.AsyncClient, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A crash between the charge and its answer leaves no intent id: the metadata finds the
    payment, and the amount, currency and customer must still match."""
    stripe_only(harness)
    await add_card(admin, "pm_card_authenticationRequired")
    bought = await buy(admin, 200)
    row = await payment_row(bought["payment"]["id"])
    await Payment.filter(id=row.id).update(status=PaymentStatus.PENDING, gateway_payment_id=None)
    account = await Account.get(id=admin.account_id)
    obj = {
        "id": f"pi_{uuid.uuid4().hex[:14]}",
        "object": "payment_intent",
        "status": "succeeded",
        "amount": 2000,
        "currency": "eur",
        "customer": account.gateway_customer_id,
        "metadata": {"payment_id": str(row.id)},
    }
    euros = event("payment_intent.succeeded", obj)
    assert (await post_event(http, euros)).status_code == 200
    await queue.drain()
    assert (await Payment.get(id=row.id)).status is PaymentStatus.PENDING  # eur: not ours
    assert (await GatewayEvent.get(external_id=euros["id"])).outcome == "mismatch"
    await resolved_by_staff(admin.account_id, euros["id"])
    right = event("payment_intent.succeeded", {**obj, "currency": "usd"})
    assert (await post_event(http, right)).status_code == 200
    await queue.drain()
    adopted = await Payment.get(id=row.id)
    assert (adopted.status, adopted.gateway_payment_id) == (PaymentStatus.SUCCEEDED, obj["id"])
    assert await balance(admin) == 200


# ---------------------------------------------------------------- 4. one crossing, one charge


async def _threshold(admin: Caller, threshold: int, credits: int) -> None:
    data = await admin.gql(
        AUTO_RECHARGE,
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": threshold,
                "rechargeCredits": credits,
            }
        },
    )
    assert data["updateAutoRecharge"]["errors"] == [], data


async def recharge_entries(account_id: str) -> list[int]:
    rows = await LedgerEntry.filter(account_id=account_id, type="AUTO_RECHARGE")
    return [e.credits for e in rows]


async def test_one_threshold_crossing_charges_once(
    admin: Caller,
    service: Caller,
    staff: Caller,
    queue: InProcessQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def charges() -> int:  # auto-recharge charges sent for this account
        return await Payment.filter(account_id=admin.account_id, kind="AUTO_RECHARGE").count()

    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    await _threshold(admin, 1000, 100)
    await queue.drain()
    # The spends outpace the recharge (as in production, where the job takes a second or
    # two): its job waits until they are done.
    go = asyncio.Event()
    job = queue.functions["threshold_recharge"]

    async def later(ctx: Any, *args: Any) -> Any:
        await go.wait()
        return await job(ctx, *args)

    monkeypatch.setitem(queue.functions, "threshold_recharge", later)
    for _ in range(83):  # 1,000 -> 4, one postcard (12 credits) at a time
        spent = await consume(service, "POSTCARD", 1)
        assert spent["errors"] == [], spent
    assert await balance(admin) == 4
    go.set()
    await queue.drain()
    monkeypatch.setitem(queue.functions, "threshold_recharge", job)
    assert await charges() == 1
    # The recharge left the balance under the threshold (104): that re-arms nothing.
    for _ in range(3):
        await consume(service, "POSTCARD", 1)
    await queue.drain()
    assert await charges() == 1
    assert await recharge_entries(admin.account_id) == [100]
    # The sweep, again and again, much later: the balance stays under 1,000, no new crossing.
    for hours in (1, 5, 20):
        with clock.travel(clock.now() + timedelta(hours=hours)):
            await sweep(queue)
    assert await queue.functions["threshold_recharge"](queue.ctx, admin.account_id) == (
        "not_needed"
    )
    assert await charges() == 1
    assert await balance(admin) == 68

    # Back at or above the threshold, then under it again: a new crossing, a new charge.
    await grant(staff, admin.account_id, 1000)  # 1,068
    for _ in range(6):  # 1,068 -> 996
        await consume(service, "POSTCARD", 1)
    await queue.drain()
    assert await charges() == 2
    # A batch that crosses is one crossing too.
    await grant(staff, admin.account_id, 1000)  # 2,096
    items = [
        {
            "accountId": admin.account_id,
            "userId": "u1",
            "processType": "POSTCARD",
            "quantity": 50,
            "idempotencyKey": key(),
        }
        for _ in range(3)
    ]
    results = (await service.gql(BATCH, {"inputs": items}))["consumeCreditsBatch"]
    assert all(r["errors"] == [] for r in results), results
    await queue.drain()
    assert await charges() == 3
    # Saving the setting while under the threshold counts as a crossing.
    assert await balance(admin) < 1000
    await _threshold(admin, 1000, 100)
    await queue.drain()
    assert await charges() == 4
    assert await recharge_entries(admin.account_id) == [100] * 4
    assert await assert_ledger_consistent(admin.account_id) == await balance(admin)


# ---------------------------------------------------------------- 5. every figure fits Int


async def test_a_movement_past_the_int_bound_is_refused_and_writes_nothing(
    admin: Caller, staff: Caller, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    for _ in range(214):
        await grant(staff, admin.account_id, 10_000_000)
    assert await balance(admin) == 2_140_000_000
    before = await LedgerEntry.filter(account_id=admin.account_id).count()
    data = await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": 7_483_648,
                "reason": "one too many",
                "idempotencyKey": key(),
            }
        },
    )
    payload = data["grantCredits"]
    assert codes(payload) == ["BALANCE_LIMIT"] and payload["transaction"] is None
    assert await LedgerEntry.filter(account_id=admin.account_id).count() == before
    assert await balance(admin) == 2_140_000_000
    page = await admin.gql(HISTORY, {"first": 5})
    assert len(page["creditAccount"]["transactions"]["edges"]) == 5
    # Up to the bound is fine; a purchase past it is refused before the card is charged.
    await grant(staff, admin.account_id, INT_MAX - 2_140_000_000 - 100)
    charges = gateway.charge_count
    bought = await buy(admin, 101)
    assert codes(bought) == ["BALANCE_LIMIT"] and bought["payment"] is None, bought
    assert gateway.charge_count == charges
    assert await Payment.filter(account_id=admin.account_id).count() == 0
    assert await balance(admin) == INT_MAX - 100
    assert await assert_ledger_consistent(admin.account_id) == INT_MAX - 100


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE credit_account SET balance = 2147483648 WHERE id = ?",
        "UPDATE payment SET amount_cents = 2147483648 WHERE account_id = ?",
    ],
)
async def test_the_database_holds_the_int_bound(admin: Caller, statement: str) -> None:
    await add_card(admin, "pm_card_visa")
    await buy(admin, 100)
    sql.connection()
    with pytest.raises((IntegrityError, OperationalError)):
        async with in_transaction():
            await sql.execute(statement, admin.account_id)


# ---------------------------------------------------------------- 6. the minimum charge


async def test_purchases_and_settings_under_the_minimum_are_refused(
    admin: Caller, gateway: Any, tmp_path: Path
) -> None:
    book = _book(tmp_path, "cheap", cents_per_credit=1, min_purchase_credits=1)
    await add_card(admin, "pm_card_visa")
    charges = gateway.charge_count
    with pytest.raises(BillingError) as refused:
        await purchases.purchase_credits(
            gateway,
            book,
            account_id=admin.account_id,
            user_id=admin.user_id,
            credits=49,
            card_id=None,
            card_id_given=False,
            idempotency_key=key(),
        )
    assert [e.code for e in refused.value.errors] == [ErrorCode.AMOUNT_TOO_SMALL]
    assert gateway.charge_count == charges
    with pytest.raises(BillingError) as small:
        async with in_transaction():
            await autorecharge.update_auto_recharge(
                book,
                admin.account_id,
                autorecharge.AutoRechargeInput(
                    enabled=True,
                    trigger=AutoRechargeTrigger.THRESHOLD,
                    threshold_credits=10,
                    recharge_credits=30,
                ),
            )
    assert [(e.code, e.field) for e in small.value.errors] == [
        (ErrorCode.AMOUNT_TOO_SMALL, ("rechargeCredits",))
    ]
    # 50 credits at a cent each is the minimum: accepted.
    done = await purchases.purchase_credits(
        gateway,
        book,
        account_id=admin.account_id,
        user_id=admin.user_id,
        credits=50,
        card_id=None,
        card_id_given=False,
        idempotency_key=key(),
    )
    assert done.payment.status is PaymentStatus.SUCCEEDED and done.balance == 50


async def test_the_gateway_layer_never_sends_a_charge_under_the_minimum(
    admin: Caller, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    account = await Account.get(id=admin.account_id)
    card = await Card.get(account_id=admin.account_id)
    for currency, cents in (("usd", 49), ("gbp", 29), ("sek", 299)):
        assert cents == minimum_charge_cents(currency) - 1
        with pytest.raises(AmountBelowMinimum):
            await gateway.charge(
                ChargeRequest(
                    customer_id=account.gateway_customer_id or "",
                    payment_method_id=card.gateway_payment_method_id,
                    amount_cents=cents,
                    currency=currency,
                    idempotency_key=key(),
                    off_session=True,
                    description="too small",
                )
            )


# ---------------------------------------------------------------- 7. one key, two writers


async def test_one_key_in_single_spends_and_batches_at_once(
    service: Caller, gateway_name: str
) -> None:
    if gateway_name != "sandbox":
        pytest.skip("spending does not touch the gateway: one gateway is enough")
    answers: list[str] = []
    for _ in range(60):
        shared = key()
        item = {
            "accountId": service.account_id,
            "userId": "u1",
            "processType": "POSTCARD",
            "quantity": 1,
            "idempotencyKey": shared,
        }
        singles = [service.raw(CONSUME, {"input": item}) for _ in range(3)]
        batches = [service.raw(BATCH, {"inputs": [item]}) for _ in range(3)]
        for response in await asyncio.gather(*singles, *batches):
            assert response.status_code == 200, response.text
            body = response.json()
            assert "errors" not in body, body
            data = body["data"]
            payloads = (
                [data["consumeCredits"]]
                if "consumeCredits" in data
                else data["consumeCreditsBatch"]
            )
            for payload in payloads:
                answers += codes(payload)
    assert answers == ["INSUFFICIENT_CREDITS"] * 360
    assert await LedgerEntry.filter(account_id=service.account_id).count() == 0


def _book(tmp_path: Path, name: str, **values: int) -> Any:
    text = Path("billing/pricebook.toml").read_text()
    for field_name, value in values.items():
        lines = [
            f"{field_name} = {value}" if line.startswith(f"{field_name} =") else line
            for line in text.splitlines()
        ]
        text = "\n".join(lines) + "\n"
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_price_book(path)


async def test_a_saved_recharge_under_a_new_minimum_pauses_instead_of_charging(
    admin: Caller, staff: Caller, gateway: Any, tmp_path: Path
) -> None:
    from billing.recharge import runs

    saved_with = _book(tmp_path, "then", min_purchase_credits=10)  # 10 credits = 100 cents
    await add_card(admin, "pm_card_visa")
    async with in_transaction():
        await autorecharge.update_auto_recharge(
            saved_with,
            admin.account_id,
            autorecharge.AutoRechargeInput(
                enabled=True,
                trigger=AutoRechargeTrigger.THRESHOLD,
                threshold_credits=50,
                recharge_credits=10,
            ),
        )
    now = _book(tmp_path, "now", min_purchase_credits=10, cents_per_credit=1)  # 10 cents
    charges = gateway.charge_count
    result = await runs.run(gateway, now, admin.account_id, AutoRechargeTrigger.THRESHOLD)
    assert result.outcome.value == "paused" and gateway.charge_count == charges
    setting = await autorecharge.get_setting(admin.account_id)
    assert setting.paused_reason and "minimum" in setting.paused_reason


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_purchase_credits": 300_000_000}, "passes 2,147,483,647"),
        ({"credits_per_unit": 300_000}, "costs too much per unit"),
    ],
)
def test_a_price_book_whose_amounts_pass_int_is_refused(
    tmp_path: Path, values: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        _book(tmp_path, "big", **values)
