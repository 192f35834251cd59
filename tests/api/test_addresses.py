"""E-mail addresses and account ids: each checked by one rule wherever it enters, and a
read never creates an account."""

from __future__ import annotations

import uuid

import httpx
import pytest

from api.auth import issue_token
from billing.enums import Role
from billing.models import Account
from runtime.mailer import build_message
from runtime.settings import Settings
from tests.conftest import Caller, MakeCaller


async def test_a_tokens_email_claim_is_checked_before_it_becomes_a_recipient(
    caller: MakeCaller, account_id: str
) -> None:
    bad = caller(account_id, Role.ADMIN, email="admin@example.com\nBcc: spy@example.net")
    data = await bad.gql("{ viewer { email } }")
    assert data["viewer"]["email"] is None
    good = caller(account_id, Role.ADMIN, email="Admin@Example.com")
    assert (await good.gql("{ viewer { email } }"))["viewer"]["email"] == "Admin@example.com"


def test_a_message_never_carries_an_unchecked_address() -> None:
    message = build_message(
        mail_from="Credits <credits@example.com>",
        to=["ok@example.com", "a@b.com\nSubject: owned", "x,y<z>@b.com"],
        subject="Balance low\r\nBcc: spy@example.net",
        body="hello",
        message_id="<m-1@example.com>",
    )
    assert message["To"] == "ok@example.com"
    assert message["Subject"] == "Balance low Bcc: spy@example.net"  # one line
    assert message["Bcc"] is None
    with pytest.raises(ValueError):
        build_message(
            mail_from="c@example.com", to=["a@b.com\n"], subject="s", body="b", message_id="<m>"
        )


async def stored(account_id: str) -> int:
    if len(account_id) > 64:  # the column could not hold it anyway
        return 0
    return await Account.filter(id=account_id).count()


BAD_IDS = [" new\u0001acct", " padded", "x" * 65, "tab\there"]


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_staff_reading_a_bad_account_id_is_refused_and_creates_nothing(
    staff: Caller, bad: str
) -> None:
    error = await staff.gql_error(
        "query($a: ID) { creditAccount(accountId: $a) { balance } }", {"a": bad}
    )
    assert error["extensions"]["code"] == "BAD_USER_INPUT"
    assert await stored(bad) == 0


async def test_reading_an_unseen_account_creates_nothing(staff: Caller) -> None:
    unseen = f"unseen-{uuid.uuid4().hex[:8]}"
    data = await staff.gql(
        "query($a: ID) { creditAccount(accountId: $a) { id balance cards { id } } }", {"a": unseen}
    )
    assert data["creditAccount"] == {"id": unseen, "balance": 0, "cards": []}
    assert await Account.filter(id=unseen).count() == 0


@pytest.mark.parametrize("bad", BAD_IDS)
async def test_the_report_applies_the_same_account_id_rule(
    http: httpx.AsyncClient, staff: Caller, bad: str
) -> None:
    response = await http.get(
        "/reports/transactions.csv",
        params={"accountId": bad},
        headers={"Authorization": f"Bearer {staff.token}"},
    )
    assert response.status_code == 400
    assert await stored(bad) == 0


async def test_a_token_naming_a_bad_account_id_is_refused(
    http: httpx.AsyncClient, settings: Settings
) -> None:
    token = issue_token(settings, account_id=" padded", user_id="u", roles=[Role.ADMIN])
    response = await http.post(
        "/graphql",
        json={"query": "{ viewer { userId } }"},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 401
    assert await Account.filter(id=" padded").count() == 0
