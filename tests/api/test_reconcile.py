"""Reconciliation (billing.reconcile, ``python -m runtime.reconcile``): clean accounts pass,
planted discrepancies are found (and the command exits non-zero), Stripe agrees with us,
and the whole shared test database, whatever the other tests did to it, reconciles."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import pytest
from tortoise.transactions import in_transaction

from billing import reconcile, sql
from billing.enums import PaymentKind, PaymentStatus, ProcessType, Role, TransactionType
from billing.models import Account, LedgerEntry, Payment
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, WEBHOOK_SECRET, Caller, MakeCaller
from tests.support.gateways import GatewayHarness
from tests.support.ops import AUTO_RECHARGE, add_card, buy, consume, grant


class _Rollback(Exception):
    """Raised to undo what a test planted (the ledger is append-only, even for tests)."""


async def activity(admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue) -> None:
    """Every kind of credit movement: a grant, spends, a card purchase, an auto-recharge."""
    await grant(staff, admin.account_id, 50)
    for process in ("POSTCARD", "PROSPECT_SEARCH"):
        assert (await consume(service, process))["errors"] == []
    await add_card(admin)
    bought = await buy(admin, 200)
    assert bought["payment"]["status"] == "SUCCEEDED", bought
    data = await admin.gql(
        AUTO_RECHARGE,
        {
            "input": {
                "enabled": True,
                "trigger": "THRESHOLD",
                "thresholdCredits": 1000,
                "rechargeCredits": 300,
            }
        },
    )
    assert data["updateAutoRecharge"]["errors"] == [], data
    await queue.drain()  # the balance was below the threshold: a recharge ran at once
    assert await LedgerEntry.filter(
        account_id=admin.account_id, type=TransactionType.AUTO_RECHARGE
    ).exists()


async def planted(
    plant: Callable[[], Awaitable[None]],
    account_ids: list[str] | None,
    stripe: Any = None,
) -> reconcile.Report:
    """Reconcile with ``plant`` applied, then roll it all back."""
    found: list[reconcile.Report] = []
    with pytest.raises(_Rollback):
        async with in_transaction():
            await plant()
            found.append(await reconcile.run(account_ids, stripe))
            raise _Rollback
    return found[0]


def checks(report: reconcile.Report) -> list[str]:
    return sorted(d.check for d in report.discrepancies)


def lines(report: reconcile.Report) -> str:
    return "\n".join(d.line() for d in report.discrepancies) or "(none)"


async def add_balance(account_id: str, credits: int) -> None:
    await sql.execute(
        "UPDATE credit_account SET balance = balance + ? WHERE id = ?", credits, account_id
    )


async def append_entry(
    account_id: str,
    credits: int,
    *,
    type: TransactionType = TransactionType.GRANT,
    payment_id: uuid.UUID | None = None,
    balance_after: int | None = None,
) -> None:
    """An entry written straight to the table after the account's last one."""
    account = await Account.get(id=account_id)
    last = await LedgerEntry.filter(account_id=account_id).order_by("-created_at").first()
    assert last is not None
    await LedgerEntry.create(
        id=uuid.uuid4(),
        account_id=account_id,
        created_at=last.created_at + timedelta(milliseconds=1),
        type=type,
        process_type=ProcessType.MANUAL_PURCHASE
        if type is TransactionType.PURCHASE
        else ProcessType.ADMINISTRATIVE,
        credits=credits,
        balance_after=account.balance + credits if balance_after is None else balance_after,
        description="planted",
        payment_id=payment_id,
    )


async def a_payment(account_id: str, *, status: PaymentStatus, credits: int = 100) -> Payment:
    now = sql.now()
    return await Payment.create(
        id=uuid.uuid4(),
        account_id=account_id,
        kind=PaymentKind.PURCHASE,
        status=status,
        credits=credits,
        amount_cents=credits * 10,
        currency="usd",
        created_at=now,
        updated_at=now,
    )


# ---------------------------------------------------------------- in process


async def test_clean_account_reconciles(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    await activity(admin, staff, service, queue)
    stripe = harness.gateway if harness.name == "stripe" else None
    report = await reconcile.run([admin.account_id], stripe)
    assert report.discrepancies == [], lines(report)
    assert report.ok and report.exit_code() == 0
    assert report.accounts == 1
    assert report.card_payments == 2  # the purchase and the recharge
    assert report.entries == await LedgerEntry.filter(account_id=admin.account_id).count()
    assert report.stripe_checked == (2 if stripe else None)
    assert "no discrepancies" in report.summary()


async def test_finds_a_balance_changed_directly(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue
) -> None:
    await activity(admin, staff, service, queue)
    report = await planted(lambda: add_balance(admin.account_id, 7), [admin.account_id])
    assert checks(report) == ["balance"], lines(report)
    assert "off by 7" in report.discrepancies[0].detail
    assert report.discrepancies[0].account_id == admin.account_id
    assert report.exit_code() == 1


async def test_finds_a_credit_entry_without_its_payment(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue
) -> None:
    await activity(admin, staff, service, queue)

    async def plant() -> None:  # the balance and the chain agree: only the payment is missing
        await append_entry(admin.account_id, 100, type=TransactionType.PURCHASE)
        await add_balance(admin.account_id, 100)

    report = await planted(plant, [admin.account_id])
    assert checks(report) == ["entry-payment"], lines(report)
    assert "has no payment" in report.discrepancies[0].detail

    failed = await a_payment(admin.account_id, status=PaymentStatus.FAILED)

    async def plant_failed() -> None:  # an entry for a payment that never succeeded
        await append_entry(
            admin.account_id, 100, type=TransactionType.PURCHASE, payment_id=failed.id
        )
        await add_balance(admin.account_id, 100)

    report = await planted(plant_failed, [admin.account_id])
    assert checks(report) == ["entry-payment"], lines(report)
    assert "FAILED" in report.discrepancies[0].detail
    await Payment.filter(id=failed.id).delete()


async def test_finds_a_succeeded_payment_without_entry(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue
) -> None:
    await activity(admin, staff, service, queue)

    async def plant() -> None:
        await a_payment(admin.account_id, status=PaymentStatus.SUCCEEDED)

    report = await planted(plant, [admin.account_id])
    assert checks(report) == ["payment-entry"], lines(report)
    assert "no credit entry" in report.discrepancies[0].detail

    payment = await Payment.filter(account_id=admin.account_id, kind=PaymentKind.PURCHASE).first()
    assert payment is not None

    async def twice() -> None:  # and one credited twice
        await append_entry(
            admin.account_id, payment.credits, type=TransactionType.PURCHASE, payment_id=payment.id
        )
        await add_balance(admin.account_id, payment.credits)

    report = await planted(twice, [admin.account_id])
    assert checks(report) == ["payment-entry"], lines(report)
    assert "2 credit entries" in report.discrepancies[0].detail


async def test_finds_a_broken_chain_but_not_entries_sharing_a_timestamp(
    admin: Caller, staff: Caller
) -> None:
    await grant(staff, admin.account_id, 10)

    async def broken() -> None:  # +5 that claims to leave 16 (and the balance says so too)
        await append_entry(admin.account_id, 5, balance_after=16)
        await add_balance(admin.account_id, 6)

    report = await planted(broken, [admin.account_id])
    assert checks(report) == ["balance", "chain"], lines(report)
    chain = next(d for d in report.discrepancies if d.check == "chain")
    assert "balance_after 16" in chain.detail and "was 10" in chain.detail

    async def tied() -> None:  # a chain through one timestamp, ids in any order
        last = await LedgerEntry.filter(account_id=admin.account_id).first()
        assert last is not None
        at = last.created_at + timedelta(milliseconds=5)
        for i in range(6):
            await LedgerEntry.create(
                id=uuid.uuid4(),
                account_id=admin.account_id,
                created_at=at,
                type=TransactionType.GRANT,
                process_type=ProcessType.ADMINISTRATIVE,
                credits=1 + i,
                balance_after=10 + sum(range(1, i + 2)),
                description=f"tied {i}",
            )
        await add_balance(admin.account_id, sum(range(1, 7)))

    report = await planted(tied, [admin.account_id])
    assert report.discrepancies == [], lines(report)


async def test_scoping_leaves_other_accounts_out(admin: Caller, caller: MakeCaller) -> None:
    other = f"acct-{uuid.uuid4().hex[:12]}"
    await caller(other, Role.ADMIN).gql("{ viewer { userId } }")

    async def plant() -> None:
        await add_balance(other, 3)

    report = await planted(plant, [admin.account_id])
    assert report.discrepancies == [], lines(report)
    report = await planted(plant, [admin.account_id, other])
    assert [d.account_id for d in report.discrepancies] == [other]
    report = await planted(plant, None)
    assert other in {d.account_id for d in report.discrepancies}


# ---------------------------------------------------------------- Stripe


async def test_stripe_agrees_and_disagreements_are_found(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    if harness.name != "stripe":
        pytest.skip("the Stripe check needs the Stripe gateway (localstripe)")
    await activity(admin, staff, service, queue)
    stripe = harness.gateway
    report = await reconcile.run([admin.account_id], stripe)
    assert report.discrepancies == [] and report.stripe_checked == 2, lines(report)

    purchase = await Payment.get(account_id=admin.account_id, kind=PaymentKind.PURCHASE)

    async def another_amount() -> None:
        await Payment.filter(id=purchase.id).update(amount_cents=purchase.amount_cents + 1)

    report = await planted(another_amount, [admin.account_id], stripe)
    assert checks(report) == ["stripe"], lines(report)
    detail = report.discrepancies[0].detail
    assert f"amount {purchase.amount_cents + 1} here, {purchase.amount_cents} at Stripe" in detail

    # a 3-D Secure payment still waiting at Stripe, that we (wrongly) booked as paid
    await add_card(admin, "pm_card_authenticationRequired", primary=True)
    waiting = await buy(admin, 150)
    assert waiting["payment"]["status"] == "REQUIRES_ACTION", waiting
    pending = await Payment.get(account_id=admin.account_id, status=PaymentStatus.REQUIRES_ACTION)
    assert pending.gateway_payment_id

    async def we_think_it_succeeded() -> None:
        await Payment.filter(id=pending.id).update(status=PaymentStatus.SUCCEEDED)
        await append_entry(
            admin.account_id, pending.credits, type=TransactionType.PURCHASE, payment_id=pending.id
        )
        await add_balance(admin.account_id, pending.credits)

    report = await planted(we_think_it_succeeded, [admin.account_id], stripe)
    assert checks(report) == ["stripe"], lines(report)
    assert "Stripe says requires_action" in report.discrepancies[0].detail

    async def unknown_intent() -> None:
        await Payment.filter(id=purchase.id).update(gateway_payment_id="pi_not_at_stripe")

    report = await planted(unknown_intent, [admin.account_id], stripe)
    assert checks(report) == ["stripe"], lines(report)
    assert "Stripe has no PaymentIntent pi_not_at_stripe" in report.discrepancies[0].detail


# ---------------------------------------------------------------- the command


def run_command(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "CREDITS_JWT_SECRET": TEST_SECRET,
        "CREDITS_ENV": "development",
        "PAYMENT_GATEWAY": settings.payment_gateway,
    }
    if settings.payment_gateway == "stripe":
        assert settings.stripe_api_base is not None
        env |= {
            "STRIPE_API_KEY": "sk_test_suite",
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "STRIPE_API_BASE": settings.stripe_api_base,
        }
    return subprocess.run(
        [sys.executable, "-m", "runtime.reconcile", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_command_exit_codes(
    admin: Caller,
    staff: Caller,
    service: Caller,
    queue: InProcessQueue,
    settings: Settings,
) -> None:
    await activity(admin, staff, service, queue)
    clean = run_command(settings, "--account", admin.account_id)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "reconciled 1 accounts" in clean.stdout and "no discrepancies" in clean.stdout
    if settings.payment_gateway == "stripe":
        assert "2 payments checked at Stripe" in clean.stdout

    # committed this time (another process reads it), and repaired afterwards
    await add_balance(admin.account_id, 7)
    payment = await a_payment(admin.account_id, status=PaymentStatus.SUCCEEDED)
    try:
        found = run_command(settings, "--account", f"{admin.account_id},nobody-else", "--no-stripe")
    finally:
        await add_balance(admin.account_id, -7)
        await Payment.filter(id=payment.id).delete()
    assert found.returncode == 1, found.stdout + found.stderr
    out = found.stdout.splitlines()
    assert len(out) == 2, found.stdout
    assert out[0].startswith(f"balance: account {admin.account_id}: ")
    assert out[1].startswith(f"payment-entry: account {admin.account_id}: ")
    assert str(payment.id) in out[1]
    assert "2 discrepancies" in found.stderr

    again = run_command(settings, "--account", admin.account_id)
    assert again.returncode == 0, again.stdout + again.stderr


# ---------------------------------------------------------------- the whole database


async def test_the_whole_test_database_reconciles(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue, settings: Settings
) -> None:
    """Unscoped: every account every other test made (before this one) adds up."""
    await activity(admin, staff, service, queue)
    await queue.drain()
    report = await reconcile.run(None)
    assert report.discrepancies == [], lines(report)
    assert report.accounts > 1 and report.entries > 0 and report.card_payments > 0
    command = run_command(settings, "--no-stripe")
    assert command.returncode == 0, command.stdout + command.stderr


# ---------------------------------------------------------------- issue 10's kinds


async def test_stripe_kinds_of_discrepancy_are_reported(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue, harness: GatewayHarness
) -> None:
    """A payment FAILED here that succeeded at Stripe, a customer that differs, a refund at
    Stripe without its REFUND entry: each is a ``stripe`` line."""
    if harness.name != "stripe":
        pytest.skip("the Stripe check needs the Stripe gateway (localstripe)")
    stripe = harness.gateway
    await activity(admin, staff, service, queue)
    await add_card(admin, "pm_card_authenticationRequired", primary=True)
    waiting = await buy(admin, 150)
    row = await Payment.get(account_id=admin.account_id, status=PaymentStatus.REQUIRES_ACTION)
    assert row.gateway_payment_id
    await harness.complete_3ds(row.gateway_payment_id, waiting["payment"]["clientSecret"])

    async def failed_here() -> None:
        await Payment.filter(id=row.id).update(status=PaymentStatus.FAILED)

    report = await planted(failed_here, [admin.account_id], stripe)
    assert checks(report) == ["stripe"], lines(report)
    assert "FAILED here but Stripe says succeeded" in report.discrepancies[0].detail

    async def another_customer() -> None:
        await Account.filter(id=admin.account_id).update(gateway_customer_id="cus_someone")

    report = await planted(another_customer, [admin.account_id], stripe)
    assert checks(report) and set(checks(report)) == {"stripe"}, lines(report)
    assert all("cus_someone here" in d.detail for d in report.discrepancies), lines(report)

    # The 3-D Secure payment is finished here too (as the page's confirm would).
    confirmed = await admin.gql(
        "mutation($id: ID!) { confirmPurchase(input: {paymentId: $id}) { payment { status } } }",
        {"id": waiting["payment"]["id"]},
    )
    assert confirmed["confirmPurchase"]["payment"]["status"] == "SUCCEEDED"
    purchase = await Payment.get(
        account_id=admin.account_id,
        kind=PaymentKind.PURCHASE,
        status=PaymentStatus.SUCCEEDED,
        credits=200,
    )
    assert purchase.gateway_payment_id
    found = await harness.http.get(  # type: ignore[attr-defined]
        f"/v1/payment_intents/{purchase.gateway_payment_id}",
        params={"expand[]": "latest_charge"},
    )
    charge_id = found.json()["latest_charge"]["id"]
    refunded = await harness.http.post(  # type: ignore[attr-defined]
        "/v1/refunds", data={"charge": charge_id, "amount": 500}
    )
    refunded.raise_for_status()
    report = await reconcile.run([admin.account_id], stripe)  # no charge.refunded came
    assert checks(report) == ["stripe"], lines(report)
    assert "refunded 0 here, 500 at Stripe" in report.discrepancies[0].detail
    # The event arrives: the REFUND entry is written and the books agree again.
    charge = (
        await harness.http.get(  # type: ignore[attr-defined]
            f"/v1/payment_intents/{purchase.gateway_payment_id}",
            params={"expand[]": "latest_charge"},
        )
    ).json()["latest_charge"]
    async with in_transaction():
        from billing.settlement import webhooks

        stored = await webhooks.record(
            "stripe",
            {
                "id": f"evt_{uuid.uuid4().hex[:12]}",
                "type": "charge.refunded",
                "data": {"object": charge},
            },
        )
        assert stored is not None
        await webhooks.process(stored)
    report = await reconcile.run([admin.account_id], stripe)
    assert report.discrepancies == [], lines(report)


async def test_events_that_mismatch_or_wait_too_long_are_reported(
    admin: Caller, staff: Caller, service: Caller, queue: InProcessQueue
) -> None:
    await activity(admin, staff, service, queue)
    old = f"evt_old_{uuid.uuid4().hex[:8]}"
    odd = f"evt_odd_{uuid.uuid4().hex[:8]}"

    async def plant() -> None:
        await sql.execute(
            "INSERT INTO gateway_event (source, external_id, type, payload, received_at, "
            "attempts, outcome, last_error) VALUES (?, ?, ?, ?, ?, 3, ?, ?)",
            "stripe",
            old,
            "charge.dispute.created",
            "{}",
            sql.now() - timedelta(days=2),
            "pending",
            "payment x is not paid yet",
        )
        await sql.execute(
            "INSERT INTO gateway_event (source, external_id, type, payload, received_at, "
            "processed_at, attempts, outcome, last_error) VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?)",
            "stripe",
            odd,
            "payment_intent.succeeded",
            "{}",
            sql.now(),
            sql.now(),
            "mismatch",
            "does not match payment y",
        )

    report = await planted(plant, None)
    found = [d.line() for d in report.discrepancies if d.check == "gateway-event"]
    assert any(old in line and "still pending" in line for line in found), found
    assert any(odd in line and "does not match" in line for line in found), found
