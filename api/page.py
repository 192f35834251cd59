"""The billing page (``GET /billing``): static files written against the public GraphQL API,
served from the service's own origin with no build step (``api/static/billing/``), plus the
sandbox gateway's 3-D Secure challenge the page answers under ``PAYMENT_GATEWAY=sandbox``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from billing.payments.gateways.sandbox import SandboxGateway

if TYPE_CHECKING:
    from api.context import Services

STATIC = Path(__file__).with_name("static")
PAGE_DIR = STATIC / "billing"

_CSP = "; ".join(
    [
        "default-src 'self'",
        # Stripe.js must come from Stripe (PCI); localstripe's stand-in in tests.
        "script-src 'self' {stripe}",
        "frame-src {stripe}",
        "connect-src 'self' {stripe}",  # 'self' covers the same origin's websocket
        "img-src 'self' data:",
        "style-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors {ancestors}",
    ]
)


def _page_config(services: Services) -> dict[str, object]:
    s = services.settings
    stripe_js = None
    if s.payment_gateway == "stripe":
        base = (s.stripe_js_url or "https://js.stripe.com/v3/").rstrip("/") + "/"
        stripe_js = base
    return {
        "gateway": s.payment_gateway,
        "stripePublishableKey": s.stripe_publishable_key,
        "stripeJs": stripe_js,
        "support": s.support_contact,
    }


def _render(services: Services) -> tuple[str, str]:
    """The page with its configuration inlined (a JSON data block, which runs nothing),
    and its Content-Security-Policy."""
    config = _page_config(services)
    html = (PAGE_DIR / "index.html").read_text(encoding="utf-8")
    html = html.replace(
        "<!--config-->",
        '<script type="application/json" id="config">'
        + json.dumps(config).replace("<", "\\u003c")
        + "</script>",
    )
    stripe_origin = ""
    if isinstance(config["stripeJs"], str):
        parts = urlsplit(config["stripeJs"])
        stripe_origin = f"{parts.scheme}://{parts.netloc}"
    csp = _CSP.format(
        stripe=stripe_origin,
        ancestors=services.settings.page_frame_ancestors or "'none'",
    ).replace("frame-src ;", "frame-src 'none';")
    return html, csp


async def billing_page(request: Request) -> Response:
    services: Services = request.app.state.services
    rendered = getattr(request.app.state, "billing_page", None)
    if rendered is None:  # once per app: the settings don't change while it runs
        rendered = request.app.state.billing_page = _render(services)
    html, csp = rendered
    return HTMLResponse(
        html,
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )


async def home(request: Request) -> Response:
    return RedirectResponse("/billing", status_code=307)


async def sandbox_authenticate(request: Request) -> Response:
    """The sandbox's stand-in for the bank's 3-D Secure page: ``{"clientSecret": ...,
    "approve": true|false}``. The client secret is the proof, as with Stripe.js."""
    services: Services = request.app.state.services
    gateway = services.gateway
    if not isinstance(gateway, SandboxGateway):
        return JSONResponse({"error": "the sandbox gateway is not in use"}, status_code=404)
    try:
        body = await request.json()
        secret = body["clientSecret"]
        approve = body["approve"]
        if not isinstance(secret, str) or not isinstance(approve, bool) or len(secret) > 255:
            raise ValueError
    except (ValueError, KeyError, TypeError):
        return JSONResponse(
            {"error": 'send {"clientSecret": "...", "approve": true|false}'}, status_code=400
        )
    if not gateway.authenticate(secret, approve=approve):
        return JSONResponse({"error": "no payment awaits authentication"}, status_code=404)
    return JSONResponse({"authenticated": approve})


def routes() -> list[Route | Mount]:
    return [
        Route("/", home),
        Route("/billing", billing_page),
        Mount("/billing/static", StaticFiles(directory=PAGE_DIR), name="billing-static"),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),  # GraphiQL's files
        Route("/sandbox/authenticate", sandbox_authenticate, methods=["POST"]),
    ]
