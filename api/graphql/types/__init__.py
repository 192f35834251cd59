"""GraphQL types, named exactly as in the shared contract: the enums, the resolver's
``info``, and the types every domain shares (``UserError``, ``PageInfo``, ``Member``).
The domains' types are in this package's modules: cards, payments, history, account."""

from __future__ import annotations

from collections.abc import Iterable

import strawberry
from strawberry.types import Info

from api.context import Context
from billing import enums, insights
from billing.errors import UserError as DomainError

# strawberry.enum registers each enum for GraphQL and returns the class itself: the
# names below are the domain's enums (so they type-check), as GraphQL knows them.
strawberry.enum(enums.Role)
strawberry.enum(enums.TransactionType)
strawberry.enum(enums.ProcessType)
strawberry.enum(enums.BillingMode)
strawberry.enum(enums.PaymentStatus)
strawberry.enum(enums.AutoRechargeTrigger)
strawberry.enum(enums.ErrorCode)
strawberry.enum(enums.InvoiceStatus)
strawberry.enum(
    enums.AutoRechargeStatus,
    description="OFF: not enabled (its configuration is kept); ACTIVE: will recharge; "
    "PAUSED: enabled but stopped (pausedReason says why; saving the setting resumes it).",
)
strawberry.enum(insights.UsageInterval)
Role = enums.Role
TransactionType = enums.TransactionType
ProcessType = enums.ProcessType
BillingMode = enums.BillingMode
PaymentStatus = enums.PaymentStatus
AutoRechargeTrigger = enums.AutoRechargeTrigger
ErrorCode = enums.ErrorCode
InvoiceStatus = enums.InvoiceStatus
AutoRechargeStatus = enums.AutoRechargeStatus
UsageInterval = insights.UsageInterval

CtxInfo = Info[Context, None]


@strawberry.type
class UserError:
    code: ErrorCode
    field: list[str] | None
    message: str

    @classmethod
    def of(cls, error: DomainError) -> UserError:
        return cls(
            code=error.code,
            field=list(error.field) if error.field else None,
            message=error.message,
        )


def user_errors(errors: Iterable[DomainError]) -> list[UserError]:
    """The one mapping of the domain's expected failures to a payload's ``errors``."""
    return [UserError.of(e) for e in errors]


@strawberry.type
class Member:
    user_id: strawberry.ID
    email: str | None
    name: str | None


@strawberry.type
class PageInfo:
    has_next_page: bool
    has_previous_page: bool
    start_cursor: str | None
    end_cursor: str | None
