"""Part 3: auto-recharge on a threshold and on a schedule, declines, and the sweep."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, cast

import pytest

from billing import clock
from billing.enums import AutoRechargeTrigger
from billing.models import AutoRechargeSetting, LedgerEntry, Notification, Payment
from billing.recharge import runs
from runtime.queue import InProcessQueue
from tests.conftest import Caller
from tests.support.invariants import assert_ledger_consistent
from tests.support.ops import AUTO_RECHARGE, CONSUME, add_card, balance, grant, key

SETTING = """{ creditAccount { balance autoRecharge { enabled trigger nextRunAt lastRunAt
  consecutiveFailures pausedReason card { id } } } }"""


async def enable(admin: Caller, **fields: Any) -> dict[str, Any]:
    data = await admin.gql(AUTO_RECHARGE, {"input": {"enabled": True, **fields}})
    payload = data["updateAutoRecharge"]
    assert payload["errors"] == [], payload
    return cast("dict[str, Any]", payload["autoRecharge"])


async def spend(service: Caller, credits_of_letters: int = 1) -> dict[str, Any]:
    data = await service.gql(
        CONSUME,
        {
            "input": {
                "accountId": service.account_id,
                "userId": "u1",
                "processType": "POSTCARD",
                "quantity": credits_of_letters,
                "idempotencyKey": key(),
            }
        },
    )
    return cast("dict[str, Any]", data["consumeCredits"])


async def recharges(account_id: str) -> list[LedgerEntry]:
    return await LedgerEntry.filter(account_id=account_id, type="AUTO_RECHARGE")


async def attempts(account_id: str) -> list[Payment]:
    return await Payment.filter(account_id=account_id, kind="AUTO_RECHARGE").order_by("created_at")


async def notices(account_id: str, kind: str) -> int:
    return await Notification.filter(account_id=account_id, kind=kind).count()


# ---------------------------------------------------------------- threshold


async def test_fifty_concurrent_spends_across_one_threshold_charge_once(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    await enable(admin, trigger="THRESHOLD", thresholdCredits=900, rechargeCredits=500)
    charges = gateway.charge_count
    results = await asyncio.gather(*(spend(service) for _ in range(50)))  # 12 credits each
    assert all(r["errors"] == [] for r in results)
    # The job, delivered again and again (arq redelivery, the sweep) while it runs.
    job = queue.functions["threshold_recharge"]
    await asyncio.gather(*(job(queue.ctx, admin.account_id) for _ in range(5)))
    await queue.drain()
    assert gateway.charge_count == charges + 1
    assert [e.credits for e in await recharges(admin.account_id)] == [500]
    assert await assert_ledger_consistent(admin.account_id) == 1000 - 50 * 12 + 500


async def test_no_recharge_above_the_threshold(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    await enable(admin, trigger="THRESHOLD", thresholdCredits=100, rechargeCredits=500)
    await spend(service)
    await queue.drain()
    assert await recharges(admin.account_id) == []
    result = await queue.functions["threshold_recharge"](queue.ctx, admin.account_id)
    assert result == "not_needed"


async def test_each_new_crossing_recharges_again(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 110)
    await enable(admin, trigger="THRESHOLD", thresholdCredits=100, rechargeCredits=100)
    await spend(service)  # 98 < 100: first crossing
    await queue.drain()
    assert await balance(admin) == 198
    for _ in range(9):  # back under 100 again
        await spend(service)
    await queue.drain()
    assert [e.credits for e in await recharges(admin.account_id)] == [100, 100]
    await assert_ledger_consistent(admin.account_id)


async def test_enabling_below_the_threshold_recharges_at_once(
    admin: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    await enable(admin, trigger="THRESHOLD", thresholdCredits=25, rechargeCredits=500)
    await queue.drain()
    assert await balance(admin) == 500
    assert [e.credits for e in await recharges(admin.account_id)] == [500]


async def test_monthly_limit_caps_auto_recharges(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 110)
    await enable(
        admin,
        trigger="THRESHOLD",
        thresholdCredits=100,
        rechargeCredits=100,
        monthlyLimitCredits=150,
    )
    await spend(service)
    await queue.drain()
    for _ in range(9):
        await spend(service)
    await queue.drain()
    assert [e.credits for e in await recharges(admin.account_id)] == [100]
    # The capped crossing is closed: asking again finds nothing to serve...
    assert await queue.functions["threshold_recharge"](queue.ctx, admin.account_id) == (
        "not_needed"
    )
    # ...and saving the setting again (a new crossing, below the threshold) is capped too.
    await enable(
        admin,
        trigger="THRESHOLD",
        thresholdCredits=100,
        rechargeCredits=100,
        monthlyLimitCredits=150,
    )
    await queue.drain()
    assert [e.credits for e in await recharges(admin.account_id)] == [100]


async def test_pinned_secondary_card_is_charged(admin: Caller, queue: InProcessQueue) -> None:
    await add_card(admin, "pm_card_chargeCustomerFail")  # primary: would decline
    second = await add_card(admin, "pm_card_visa")
    await enable(
        admin,
        trigger="THRESHOLD",
        thresholdCredits=25,
        rechargeCredits=200,
        usePrimaryCard=False,
        cardId=second["id"],
    )
    await queue.drain()
    assert await balance(admin) == 200
    [payment] = await attempts(admin.account_id)
    assert str(payment.card_id) in str(await _card_uuid(second["id"]))


async def _card_uuid(global_id: str) -> Any:
    from api import ids

    return ids.decode("Card", global_id)


# ---------------------------------------------------------------- declines


async def test_three_declines_pause_and_send_one_email(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue, gateway: Any
) -> None:
    await admin.gql("{ viewer { userId } }")  # the admin's e-mail is known from the token
    await add_card(admin, "pm_card_chargeCustomerFail")
    await grant(staff, admin.account_id, 1000)
    await enable(admin, trigger="THRESHOLD", thresholdCredits=990, rechargeCredits=500)
    charges = gateway.charge_count
    await spend(service)
    await queue.drain()
    assert gateway.charge_count == charges + 1
    job = queue.functions["threshold_recharge"]
    # Straight away: backoff, the card is not hammered.
    assert await job(queue.ctx, admin.account_id) == "backoff"
    await spend(service)
    await queue.drain()
    assert gateway.charge_count == charges + 1
    now = clock.now()
    with clock.travel(now + timedelta(hours=4, minutes=1)):
        assert await job(queue.ctx, admin.account_id) == "declined"
    with clock.travel(now + timedelta(hours=16, minutes=2)):
        assert await job(queue.ctx, admin.account_id) == "paused"
        assert await job(queue.ctx, admin.account_id) == "paused"  # and stays so
    await queue.drain()
    assert gateway.charge_count == charges + 3
    state = (await admin.gql(SETTING))["creditAccount"]
    assert state["autoRecharge"]["pausedReason"].startswith("The card was declined 3 times")
    assert state["autoRecharge"]["consecutiveFailures"] == 3
    assert await notices(admin.account_id, "AUTO_RECHARGE_PAUSED") == 1
    assert await notices(admin.account_id, "RECHARGE_FAILED") == 0  # notify is off
    assert await recharges(admin.account_id) == []
    # The sweep does not pick a paused account up again.
    assert admin.account_id not in [a for a, _ in await runs.below_threshold()]


async def test_a_new_card_clears_the_pause(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_authenticationRequired")
    await enable(admin, trigger="THRESHOLD", thresholdCredits=25, rechargeCredits=300)
    await queue.drain()
    state = (await admin.gql(SETTING))["creditAccount"]["autoRecharge"]
    assert "authenticate" in state["pausedReason"]  # off-session can't do 3-D Secure
    await add_card(admin, "pm_card_visa", primary=True)
    state = (await admin.gql(SETTING))["creditAccount"]["autoRecharge"]
    assert state["pausedReason"] is None and state["consecutiveFailures"] == 0
    await grant(staff, admin.account_id, 30)
    await spend(service)  # 18 < 25
    await queue.drain()
    assert [e.credits for e in await recharges(admin.account_id)] == [300]


async def test_notify_sends_success_notices_to_the_chosen_addresses(
    admin: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    await enable(
        admin,
        trigger="THRESHOLD",
        thresholdCredits=25,
        rechargeCredits=300,
        notify=True,
        notifyEmails=["finance@example.com"],
    )
    await queue.drain()
    [note] = await Notification.filter(account_id=admin.account_id, kind="RECHARGE_SUCCEEDED")
    assert note.recipients == ["finance@example.com"]
    assert "300" in note.subject


# ---------------------------------------------------------------- schedule


async def test_schedule_due_three_times_charges_once_and_moves_on(
    admin: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    setting = await enable(admin, trigger="SCHEDULE", intervalDays=7, rechargeCredits=200)
    assert setting["nextRunAt"]
    first_due = (await AutoRechargeSetting.get(account_id=admin.account_id)).next_run_at
    assert first_due is not None
    later = first_due + timedelta(days=15, hours=1)  # due at +0, +7 and +14 days: missed
    with clock.travel(later):
        for _ in range(3):  # the cron keeps finding it until it runs
            await queue.functions["enqueue_due_schedules"](queue.ctx)
            await queue.drain()
        assert len(await attempts(admin.account_id)) == 1  # other accounts' runs aside
        after = await AutoRechargeSetting.get(account_id=admin.account_id)
        assert after.next_run_at == first_due + timedelta(days=21)
        assert after.last_run_at is not None and after.last_run_at >= later
        due = [a for a, _ in await runs.due_schedules()]
        assert admin.account_id not in due
    assert [e.credits for e in await recharges(admin.account_id)] == [200]


async def test_schedule_job_delivered_twice_charges_once(
    admin: Caller, queue: InProcessQueue, gateway: Any
) -> None:
    await add_card(admin, "pm_card_visa")
    await enable(admin, trigger="SCHEDULE", intervalDays=1, rechargeCredits=150)
    due = (await AutoRechargeSetting.get(account_id=admin.account_id)).next_run_at
    assert due is not None
    charges = gateway.charge_count
    job = queue.functions["scheduled_recharge"]
    with clock.travel(due + timedelta(minutes=1)):
        outcomes = await asyncio.gather(
            *(job(queue.ctx, admin.account_id, due.isoformat()) for _ in range(4))
        )
    assert sorted(outcomes).count("charged") == 1
    assert gateway.charge_count == charges + 1


async def test_due_schedules_is_an_indexed_range(app: Any, backend: str) -> None:
    from billing import sql

    if backend == "postgres":
        rows = await sql.fetch(
            "EXPLAIN SELECT account_id, next_run_at FROM auto_recharge_setting "
            "WHERE enabled = true AND trigger = 'SCHEDULE' AND next_run_at <= now() "
            "AND paused_reason IS NULL ORDER BY next_run_at LIMIT 1000"
        )
        plan = " ".join(str(next(iter(r.values()))) for r in rows)
    else:
        rows = await sql.fetch(
            "EXPLAIN QUERY PLAN SELECT account_id, next_run_at FROM auto_recharge_setting "
            "WHERE enabled = 1 AND trigger = 'SCHEDULE' AND next_run_at <= '2030-01-01' "
            "AND paused_reason IS NULL ORDER BY next_run_at LIMIT 1000"
        )
        plan = " ".join(str(r.get("detail")) for r in rows)
    # On a small table PostgreSQL may prefer a scan; what matters is that the index exists
    # for the planner and SQLite (which follows it) uses it.
    if backend == "sqlite":
        assert "idx_auto_rechar_enabled" in plan, plan


# ---------------------------------------------------------------- the sweep


async def test_sweep_recharges_what_a_lost_enqueue_left(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 40)
    await enable(admin, trigger="THRESHOLD", thresholdCredits=30, rechargeCredits=100)
    original = queue.enqueue

    async def lost(*args: Any, **kwargs: Any) -> bool:  # Redis down: nothing queued
        return False

    queue.enqueue = lost  # type: ignore[method-assign]
    try:
        assert (await spend(service))["errors"] == []  # the spend itself succeeds
    finally:
        queue.enqueue = original  # type: ignore[method-assign]
    await queue.drain()
    assert await recharges(admin.account_id) == []
    for _ in range(2):
        await queue.functions["sweep"](queue.ctx)
        await queue.drain()
    assert [e.credits for e in await recharges(admin.account_id)] == [100]


async def test_sweep_settles_a_payment_stuck_in_pending(
    admin: Caller, staff: Caller, queue: InProcessQueue, gateway: Any, gateway_name: str
) -> None:
    if gateway_name != "sandbox":
        pytest.skip("localstripe ignores Idempotency-Key, which this recovery relies on")
    await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 30)
    await enable(admin, trigger="THRESHOLD", thresholdCredits=25, rechargeCredits=100)
    await admin_spends_below(admin, staff, queue)
    # The worker dies after Stripe charged, before the outcome was written.
    crash = _CrashAfterCharge(gateway)
    result = await runs.run(
        crash,
        queue.ctx["book"],
        admin.account_id,
        AutoRechargeTrigger.THRESHOLD,
    )
    assert result.outcome == "pending" and crash.charged == 1
    [payment] = await attempts(admin.account_id)
    assert payment.status.value == "PENDING"
    assert await queue.functions["threshold_recharge"](queue.ctx, admin.account_id) == "in_flight"
    charges = gateway.charge_count
    with clock.travel(clock.now() + timedelta(minutes=6)):
        await queue.functions["sweep"](queue.ctx)
        await queue.drain()
    await payment.refresh_from_db()
    assert payment.status.value == "SUCCEEDED"
    assert gateway.charge_count == charges  # asked again with the same key: no new charge
    assert [e.credits for e in await recharges(admin.account_id)] == [100]


async def admin_spends_below(admin: Caller, staff: Caller, queue: InProcessQueue) -> None:
    """Take the balance under the threshold, its recharge job lost on the way."""
    original = queue.enqueue

    async def lost(*args: Any, **kwargs: Any) -> bool:
        return False

    queue.enqueue = lost  # type: ignore[method-assign]
    try:
        data = await staff.gql(
            "mutation($i: GrantCreditsInput!) { adjustCredits(input: $i) { errors { code } } }",
            {
                "i": {
                    "accountId": admin.account_id,
                    "credits": -10,
                    "reason": "test",
                    "idempotencyKey": key(),
                }
            },
        )
    finally:
        queue.enqueue = original  # type: ignore[method-assign]
    assert data["adjustCredits"]["errors"] == []


class _CrashAfterCharge:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.charged = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def charge(self, request: Any) -> Any:
        await self.inner.charge(request)
        self.charged += 1
        from billing.payments.gateways import GatewayUnavailable

        raise GatewayUnavailable("connection reset after the charge")


async def test_removing_the_pinned_card_falls_back_and_tells_the_admins(
    admin: Caller, queue: InProcessQueue, staff: Caller
) -> None:
    await admin.gql("{ viewer { userId } }")
    await add_card(admin, "pm_card_visa")
    second = await add_card(admin, "pm_card_visa")
    await grant(staff, admin.account_id, 1000)
    await enable(
        admin,
        trigger="THRESHOLD",
        thresholdCredits=25,
        rechargeCredits=100,
        usePrimaryCard=False,
        cardId=second["id"],
    )
    from tests.support.ops import REMOVE_CARD

    removed = await admin.gql(REMOVE_CARD, {"id": second["id"]})
    assert removed["removeCard"]["errors"] == []
    state = (await admin.gql(SETTING))["creditAccount"]["autoRecharge"]
    assert state["card"] is not None and state["card"]["id"] != second["id"]
    assert await notices(admin.account_id, "AUTO_RECHARGE_CARD_CHANGED") == 1


async def test_pause_email_reaches_the_smtp_server_exactly_once(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue, smtp: Any
) -> None:
    from runtime.mailer import SmtpMailer

    previous = queue.ctx.get("mailer")
    queue.ctx["mailer"] = SmtpMailer(smtp.url, mail_from="credits@example.test", timeout=10)
    try:
        await admin.gql("{ viewer { userId } }")  # admin@example.com, from the token
        await add_card(admin, "pm_card_chargeCustomerFail")
        await grant(staff, admin.account_id, 1000)
        await enable(admin, trigger="THRESHOLD", thresholdCredits=995, rechargeCredits=500)
        await spend(service)
        await queue.drain()
        job = queue.functions["threshold_recharge"]
        start = clock.now()
        for hours in (4.1, 16.2, 40.0):
            with clock.travel(start + timedelta(hours=hours)):
                await job(queue.ctx, admin.account_id)
                await queue.drain()
        for _ in range(2):  # the periodic delivery runs again: nothing is sent twice
            await queue.functions["deliver_pending_notifications"](queue.ctx)
            await queue.drain()
    finally:
        queue.ctx["mailer"] = previous
    from billing.notifications.outbox import message_id

    [notice] = await Notification.filter(account_id=admin.account_id, kind="AUTO_RECHARGE_PAUSED")
    received = smtp.inbox.with_id(message_id(notice.id))
    assert len(received) == 1
    assert received[0].rcpt_tos == ["admin@example.com"]
    assert received[0].message["Subject"] == "Auto-recharge is paused"
