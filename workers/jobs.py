"""Job functions. Each owns its transaction and calls one ``billing`` function."""

from __future__ import annotations

from typing import Any

from tortoise.transactions import in_transaction

from billing import webhooks


async def process_gateway_event(ctx: dict[str, Any], event_id: int) -> bool:
    """Apply a stored gateway (Stripe) event; a no-op if it was already applied."""
    async with in_transaction():
        return await webhooks.process(event_id)


FUNCTIONS = {
    "process_gateway_event": process_gateway_event,
}
