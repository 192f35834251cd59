"""Per-request context: who is calling, the gateway, the price book and the data loaders."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from graphql import GraphQLError
from strawberry.dataloader import DataLoader

from api import permissions
from api.auth import Principal
from api.permissions import Reach
from billing.models import Card, Member, Payment
from billing.payments.gateways import PaymentGateway
from billing.pricing import PriceBook
from runtime.live import Broadcaster
from runtime.queue import JobQueue
from runtime.settings import Settings


def forbidden(message: str = "You may not do this.") -> GraphQLError:
    return GraphQLError(message, extensions={"code": "FORBIDDEN"})


def bad_input(message: str) -> GraphQLError:
    return GraphQLError(message, extensions={"code": "BAD_USER_INPUT"})


async def _load_cards(ids: Sequence[uuid.UUID]) -> list[Card | None]:
    found = {c.id: c for c in await Card.filter(id__in=list(set(ids)))}
    return [found.get(i) for i in ids]


async def _load_payments(ids: Sequence[uuid.UUID]) -> list[Payment | None]:
    found = {p.id: p for p in await Payment.filter(id__in=list(set(ids)))}
    return [found.get(i) for i in ids]


async def _load_members(keys: Sequence[tuple[str, str]]) -> list[Member | None]:
    accounts = {a for a, _ in keys}
    users = {u for _, u in keys}
    rows = await Member.filter(account_id__in=list(accounts), user_id__in=list(users))
    found = {(m.account_id, m.user_id): m for m in rows}
    return [found.get(k) for k in keys]


@dataclass
class Services:
    """What the app holds for its lifetime (typed, instead of loose ``app.state`` keys)."""

    settings: Settings
    gateway: PaymentGateway
    book: PriceBook
    queue: JobQueue
    live: Broadcaster  # in process in the embedded default; Redis pub/sub with arq


@dataclass
class Context:
    principal: Principal
    settings: Settings
    gateway: PaymentGateway
    book: PriceBook
    queue: JobQueue
    live: Broadcaster  # live balance updates (``creditBalanceChanged``)
    request: Any = None
    response: Any = None
    #: Over a websocket: what ``connection_init`` carried (Strawberry sets it) and when the
    #: token it authenticated with expires (epoch seconds).
    connection_params: dict[str, Any] | None = None
    token_expires_at: float | None = None
    #: The request's variables as sent (``RawVariables``), before defaults are filled in.
    raw_variables: dict[str, Any] | None = None
    cards: DataLoader[uuid.UUID, Card | None] = field(
        default_factory=lambda: DataLoader(load_fn=_load_cards)
    )
    payments: DataLoader[uuid.UUID, Payment | None] = field(
        default_factory=lambda: DataLoader(load_fn=_load_payments)
    )
    members: DataLoader[tuple[str, str], Member | None] = field(
        default_factory=lambda: DataLoader(load_fn=_load_members)
    )

    def fresh_loaders(self) -> None:
        """Forget what the loaders cached (a websocket's context outlives many results)."""
        self.cards = DataLoader(load_fn=_load_cards)
        self.payments = DataLoader(load_fn=_load_payments)
        self.members = DataLoader(load_fn=_load_members)

    def permitted(self, operation: str) -> Reach:
        """The account scope ``api.permissions.TABLE`` gives the caller for ``operation``
        (``api.guards.Guards`` refused the operation already otherwise: the backstop)."""
        scope = permissions.reach(self.principal, operation)
        if scope is None:
            raise permissions.forbidden(operation)
        return scope

    def own_account_or_forbidden(self, account_id: str, scope: Reach) -> None:
        """With ``OWN`` reach, a caller acts only on the account its token names."""
        if scope is Reach.OWN and account_id != self.principal.account_id:
            raise forbidden("You may act only on your own account.")
