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

Role = strawberry.enum(enums.Role)
TransactionType = strawberry.enum(enums.TransactionType)
ProcessType = strawberry.enum(enums.ProcessType)
BillingMode = strawberry.enum(enums.BillingMode)
PaymentStatus = strawberry.enum(enums.PaymentStatus)
AutoRechargeTrigger = strawberry.enum(enums.AutoRechargeTrigger)
ErrorCode = strawberry.enum(enums.ErrorCode)
InvoiceStatus = strawberry.enum(enums.InvoiceStatus)
AutoRechargeStatus = strawberry.enum(
    enums.AutoRechargeStatus,
    description="OFF: not enabled (its configuration is kept); ACTIVE: will recharge; "
    "PAUSED: enabled but stopped (pausedReason says why; saving the setting resumes it).",
)
UsageInterval = strawberry.enum(insights.UsageInterval)

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
