"""``POST /webhooks/stripe``: verify the signature on the raw body, store the event once,
and process it in a job."""

from __future__ import annotations

import json
import logging

import stripe
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.context import Services
from billing.settlement import webhooks
from runtime import jobids

log = logging.getLogger(__name__)


async def stripe_webhook(request: Request) -> Response:
    """Verify the signature on the raw body, store the event once, process it in a job."""
    services: Services = request.app.state.services
    secret = services.settings.stripe_webhook_secret
    if services.settings.payment_gateway != "stripe" or secret is None:
        return JSONResponse({"error": "the Stripe gateway is not configured"}, status_code=404)
    payload = await request.body()  # already read, within its bounds: api.bodies
    try:
        text = payload.decode("utf-8")
        stripe.WebhookSignature.verify_header(
            text,
            request.headers.get("stripe-signature"),
            secret.get_secret_value(),
            tolerance=WEBHOOK_TOLERANCE_SECONDS,
        )
        event = json.loads(text)
        if not isinstance(event, dict) or not _event_id_ok(event.get("id")):
            raise ValueError("not an event (an id of 1 to 255 printable characters)")
    except (stripe.SignatureVerificationError, UnicodeDecodeError, ValueError) as exc:
        log.info("refused a Stripe webhook: %s", exc)
        return JSONResponse({"error": "invalid signature or payload"}, status_code=400)
    data = event.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
        # Signed by Stripe but not an event we could ever apply: kept as rejected, not
        # queued (its job would fail on every retry).
        await webhooks.record("stripe", event, rejected="data.object is not an object")
        log.info("refused a Stripe webhook %s: data.object is not an object", event["id"])
        return JSONResponse({"error": "data.object must be an object"}, status_code=400)
    stored = await webhooks.record("stripe", event)
    if stored is not None:
        await services.queue.enqueue(
            "process_gateway_event", stored, job_id=jobids.gateway_event(stored)
        )
    return JSONResponse({"received": True, "duplicate": stored is None})


WEBHOOK_TOLERANCE_SECONDS = 300


def _event_id_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 255 and value.isprintable()
