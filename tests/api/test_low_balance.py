"""The low-balance alert: one BALANCE_LOW e-mail per fall below the admins' level."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from billing.models import Notification
from runtime.queue import InProcessQueue
from tests.conftest import Caller, MakeCaller
from tests.support.mailbox import SmtpServer
from tests.support.ops import ADJUST, CONSUME, ERRORS, consume, grant, key

ALERT = f"""mutation($input: LowBalanceAlertInput!) {{
  updateLowBalanceAlert(input: $input) {{
    lowBalanceAlert {{ enabled levelCredits isLow }} {ERRORS}
  }}
}}"""
SHOWN = "{ creditAccount { balance lowBalanceAlert { enabled levelCredits isLow } } }"
BATCH = f"""mutation($inputs: [ConsumeCreditsInput!]!) {{
  consumeCreditsBatch(inputs: $inputs) {{ balance {ERRORS} }}
}}"""


async def set_alert(admin: Caller, **fields: Any) -> dict[str, Any]:
    data = await admin.gql(ALERT, {"input": fields})
    payload: dict[str, Any] = data["updateLowBalanceAlert"]
    return payload


async def alert_at(admin: Caller, level: int) -> None:
    payload = await set_alert(admin, enabled=True, levelCredits=level)
    assert payload["errors"] == [], payload


async def notices(account_id: str) -> list[Notification]:
    return await Notification.filter(account_id=account_id, kind="BALANCE_LOW").order_by("id")


async def spend(service: Caller, quantity: int = 1) -> dict[str, Any]:
    result = await consume(service, "POSTCARD", quantity)  # 12 credits a postcard
    assert result["errors"] == [], result
    return result


@pytest.fixture
def mailed(queue: InProcessQueue, smtp: SmtpServer) -> Iterator[SmtpServer]:
    """The app's jobs send e-mail to an SMTP server on loopback for this test."""
    from runtime.mailer import SmtpMailer

    previous = queue.ctx.get("mailer")
    queue.ctx["mailer"] = SmtpMailer(smtp.url, mail_from="credits@test", timeout=10)
    yield smtp
    queue.ctx["mailer"] = previous


async def test_one_notice_per_crossing_however_many_spends_follow(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue, mailed: SmtpServer
) -> None:
    await grant(staff, admin.account_id, 1000)
    await alert_at(admin, 500)
    for _ in range(41):  # 1000 -> 508: above the level all along
        await spend(service)
    assert await notices(admin.account_id) == []
    await spend(service)  # 496: crossed
    for _ in range(30):  # 136: still low, nothing more
        await spend(service)
    await queue.drain()
    [notice] = await notices(admin.account_id)
    assert notice.recipients == ["admin@example.com"]
    assert "496" in notice.subject and "500" in notice.body
    assert notice.sent_at is not None  # sent after the spend's commit, not by the sweep
    [mail] = [m for m in mailed.inbox.messages if "balance is low" in m.message["Subject"]]
    assert mail.rcpt_tos == ["admin@example.com"]
    shown = (await admin.gql(SHOWN))["creditAccount"]
    assert shown == {
        "balance": 136,
        "lowBalanceAlert": {"enabled": True, "levelCredits": 500, "isLow": True},
    }


async def test_back_at_the_level_rearms_it(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 512)
    await alert_at(admin, 500)
    await spend(service)  # 500: at the level is not low
    assert await notices(admin.account_id) == []
    await spend(service)  # 488: first crossing
    await grant(staff, admin.account_id, 12)  # 500: back at the level
    await spend(service)  # 488: second crossing
    await spend(service)  # 476
    await grant(staff, admin.account_id, 11)  # 487: still below, not re-armed
    await spend(service)  # 475
    await queue.drain()
    assert len(await notices(admin.account_id)) == 2


async def test_a_debit_of_any_kind_crosses(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 600)
    await alert_at(admin, 500)
    data = await staff.gql(
        ADJUST,
        {
            "input": {
                "accountId": admin.account_id,
                "credits": -150,
                "reason": "correction",
                "idempotencyKey": key(),
            }
        },
    )
    assert data["adjustCredits"]["errors"] == []
    await queue.drain()
    assert len(await notices(admin.account_id)) == 1


async def test_a_batch_crossing_sends_one_notice(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 530)
    await alert_at(admin, 500)
    item = {
        "accountId": admin.account_id,
        "userId": "u1",
        "processType": "POSTCARD",
        "quantity": 1,
    }
    data = await service.gql(
        BATCH, {"inputs": [{**item, "idempotencyKey": key()} for _ in range(10)]}
    )
    assert [r["balance"] for r in data["consumeCreditsBatch"]] == [518 - 12 * i for i in range(10)]
    await queue.drain()
    [notice] = await notices(admin.account_id)
    assert "410" in notice.subject  # the balance the batch left


async def test_concurrent_spends_across_the_level_send_one_notice(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 600)
    await alert_at(admin, 500)
    results = await asyncio.gather(*(consume(service, "POSTCARD", 1) for _ in range(30)))
    assert all(r["errors"] == [] for r in results)
    await queue.drain()
    assert len(await notices(admin.account_id)) == 1


async def test_setting_a_level_above_the_balance_tells_at_once_but_once(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 300)
    payload = await set_alert(admin, enabled=True, levelCredits=500)
    assert payload == {
        "lowBalanceAlert": {"enabled": True, "levelCredits": 500, "isLow": True},
        "errors": [],
    }
    assert len(await notices(admin.account_id)) == 1
    await alert_at(admin, 400)  # still low under the new level: nothing new
    await spend(service)
    assert len(await notices(admin.account_id)) == 1
    await alert_at(admin, 200)  # 288: not low any more
    await spend(service, 8)  # 192: crossed the new level
    await queue.drain()
    assert len(await notices(admin.account_id)) == 2


async def test_turned_off_it_sends_nothing(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 520)
    await alert_at(admin, 500)
    payload = await set_alert(admin, enabled=False)
    assert payload == {
        "lowBalanceAlert": {"enabled": False, "levelCredits": None, "isLow": False},
        "errors": [],
    }
    await spend(service, 5)
    await queue.drain()
    assert await notices(admin.account_id) == []
    shown = (await admin.gql(SHOWN))["creditAccount"]["lowBalanceAlert"]
    assert shown == {"enabled": False, "levelCredits": None, "isLow": False}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"enabled": True}, "required"),
        ({"enabled": True, "levelCredits": None}, "required"),
        ({"enabled": True, "levelCredits": 0}, "1 to"),
        ({"enabled": True, "levelCredits": -5}, "1 to"),
        ({"enabled": True, "levelCredits": 1_000_001}, "1 to"),
        ({"enabled": False, "levelCredits": 0}, "1 to"),
    ],
)
async def test_setting_validation(
    admin: Caller, fields: dict[str, Any], message: str, account_id: str
) -> None:
    payload = await set_alert(admin, **fields)
    assert payload["lowBalanceAlert"] is None
    assert len(payload["errors"]) == 1
    [error] = payload["errors"]
    assert (error["code"], error["field"]) == ("VALIDATION", ["levelCredits"])
    assert message in error["message"]
    shown = (await admin.gql(SHOWN))["creditAccount"]["lowBalanceAlert"]
    assert shown["enabled"] is False  # nothing written


async def test_only_admins_set_it(caller: MakeCaller, account_id: str) -> None:
    from billing.enums import Role

    for role in (Role.USER, Role.SERVICE, Role.BILLING_STAFF):
        error = await caller(account_id, role).gql_error(
            ALERT, {"input": {"enabled": True, "levelCredits": 10}}
        )
        assert error["extensions"]["code"] == "FORBIDDEN"


async def test_a_refused_spend_sends_nothing(
    admin: Caller, service: Caller, staff: Caller, queue: InProcessQueue
) -> None:
    await grant(staff, admin.account_id, 505)
    await alert_at(admin, 500)
    data = await service.gql(
        CONSUME,
        {
            "input": {
                "accountId": admin.account_id,
                "userId": "u1",
                "processType": "POSTCARD",
                "quantity": 50,
                "idempotencyKey": key(),
            }
        },
    )
    assert [e["code"] for e in data["consumeCredits"]["errors"]] == ["INSUFFICIENT_CREDITS"]
    await queue.drain()
    assert await notices(admin.account_id) == []
