"""GraphQL operations and small helpers the tests share (written against the contract)."""

from __future__ import annotations

import uuid
from typing import Any, cast

from billing.enums import Role
from tests.conftest import Caller

CARD_FIELDS = (
    "id brand last4 expMonth expYear cardholderName isPrimary createdAt "
    "billingAddress { line1 line2 city state postalCode country }"
)
TX_FIELDS = (
    "id createdAt type processType credits balanceAfter description reference "
    "user { userId email name } payment { id status credits amountCents }"
)
ERRORS = "errors { code field message }"

ADD_CARD = f"""mutation($pm: String!, $primary: Boolean) {{
  addCard(input: {{paymentMethodId: $pm, makePrimary: $primary}}) {{
    card {{ {CARD_FIELDS} }} {ERRORS}
  }}
}}"""

UPDATE_CARD = f"""mutation($input: UpdateCardInput!) {{
  updateCard(input: $input) {{ card {{ {CARD_FIELDS} }} {ERRORS} }}
}}"""

SET_PRIMARY = f"""mutation($id: ID!) {{
  setPrimaryCard(input: {{cardId: $id}}) {{ card {{ {CARD_FIELDS} }} {ERRORS} }}
}}"""

REMOVE_CARD = f"""mutation($id: ID!) {{
  removeCard(input: {{cardId: $id}}) {{ removedCardId primaryCard {{ {CARD_FIELDS} }} {ERRORS} }}
}}"""

PURCHASE = f"""mutation($input: PurchaseCreditsInput!) {{
  purchaseCredits(input: $input) {{
    payment {{ id status credits amountCents currency clientSecret failureMessage
      card {{ id last4 }} }}
    transaction {{ {TX_FIELDS} }} balance {ERRORS}
  }}
}}"""

CONSUME = f"""mutation($input: ConsumeCreditsInput!) {{
  consumeCredits(input: $input) {{
    transaction {{ {TX_FIELDS} }} balance freeUnitsApplied {ERRORS}
  }}
}}"""

REVERSE = f"""mutation($input: ReverseUsageInput!) {{
  reverseUsage(input: $input) {{ transaction {{ {TX_FIELDS} }} balance {ERRORS} }}
}}"""

METERED = f"""mutation($input: RecordMeteredUsageInput!) {{
  recordMeteredUsage(input: $input) {{
    usage {{ id processType quantity amountCents createdAt }} {ERRORS}
  }}
}}"""

GRANT = f"""mutation($input: GrantCreditsInput!) {{
  grantCredits(input: $input) {{ transaction {{ {TX_FIELDS} }} balance {ERRORS} }}
}}"""

ADJUST = f"""mutation($input: GrantCreditsInput!) {{
  adjustCredits(input: $input) {{ transaction {{ {TX_FIELDS} }} balance {ERRORS} }}
}}"""

AUTO_RECHARGE = f"""mutation($input: AutoRechargeInput!) {{
  updateAutoRecharge(input: $input) {{
    autoRecharge {{ enabled trigger intervalDays thresholdCredits rechargeCredits usePrimaryCard
      card {{ id last4 }} notify notifyEmails monthlyLimitCredits nextRunAt lastRunAt
      consecutiveFailures pausedReason }}
    {ERRORS}
  }}
}}"""

ACCOUNT = f"""query($accountId: ID) {{
  creditAccount(accountId: $accountId) {{
    id balance cards {{ {CARD_FIELDS} }}
    autoRecharge {{ enabled trigger thresholdCredits rechargeCredits usePrimaryCard card {{ id }} }}
    freeQuotas {{ processType allowance used periodStart periodEnd }}
  }}
}}"""

HISTORY = f"""query($filter: TransactionFilter, $first: Int, $after: String, $accountId: ID) {{
  creditAccount(accountId: $accountId) {{
    transactions(filter: $filter, first: $first, after: $after) {{
      edges {{ cursor node {{ {TX_FIELDS} }} }}
      pageInfo {{ hasNextPage hasPreviousPage startCursor endCursor }}
    }}
  }}
}}"""

BALANCE = "{ creditAccount { balance } }"


def key() -> str:
    return uuid.uuid4().hex


async def add_card(
    admin: Caller, pm: str = "pm_card_visa", primary: bool = False
) -> dict[str, Any]:
    data = await admin.gql(ADD_CARD, {"pm": pm, "primary": primary})
    assert data["addCard"]["errors"] == [], data
    return cast("dict[str, Any]", data["addCard"]["card"])


async def buy(admin: Caller, credits: int, **extra: Any) -> dict[str, Any]:
    data = await admin.gql(
        PURCHASE, {"input": {"credits": credits, "idempotencyKey": key(), **extra}}
    )
    return cast("dict[str, Any]", data["purchaseCredits"])


async def grant(staff: Caller, account_id: str, credits: int) -> dict[str, Any]:
    data = await staff.gql(
        GRANT,
        {
            "input": {
                "accountId": account_id,
                "credits": credits,
                "reason": "test funds",
                "idempotencyKey": key(),
            }
        },
    )
    assert data["grantCredits"]["errors"] == [], data
    return cast("dict[str, Any]", data["grantCredits"])


async def consume(
    service: Caller, process: str = "POSTCARD", quantity: int = 1, **extra: Any
) -> dict[str, Any]:
    payload = {
        "accountId": service.account_id,
        "userId": "user-1",
        "processType": process,
        "quantity": quantity,
        "idempotencyKey": key(),
        **extra,
    }
    data = await service.gql(CONSUME, {"input": payload})
    return cast("dict[str, Any]", data["consumeCredits"])


async def balance(admin: Caller) -> int:
    return cast("int", (await admin.gql(BALANCE))["creditAccount"]["balance"])


def codes(payload: dict[str, Any]) -> list[str]:
    return [e["code"] for e in payload["errors"]]


__all__ = ["Role"]
