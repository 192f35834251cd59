"""The GraphiQL page on ``GET /graphql`` (when ``Settings.show_graphiql``).

By default a small page of our own (``api/static/graphiql.html``): it loads nothing from
anywhere else, so it works offline and behind strict egress rules, and its scripts are
pinned by hash in a Content-Security-Policy. ``?ide=graphiql`` serves Strawberry's full
GraphiQL instead, whose scripts come from a public CDN (for browsers that can reach it).
Either way the bearer token goes in the page's Headers tab:
``{"Authorization": "Bearer <token>"}``; the page itself needs no token and runs nothing.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from strawberry.http.ides import get_graphql_ide_html

PAGE_PATH = Path(__file__).with_name("static") / "graphiql.html"


def _hashes(html: str, tag: str) -> list[str]:
    """CSP hashes of the page's inline ``<tag>`` blocks (JSON data blocks don't run)."""
    found = re.findall(rf"<{tag}(?![^>]*application/json)[^>]*>(.*?)</{tag}>", html, re.S)
    return [
        "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"
        for body in found
    ]


@cache
def _page() -> tuple[str, str]:
    html = PAGE_PATH.read_text(encoding="utf-8")
    csp = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_hashes(html, "script")),
            "style-src " + " ".join(_hashes(html, "style")),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, csp


def graphiql_page(request: Request) -> Response:
    headers = {
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
    }
    if request.query_params.get("ide") == "graphiql":
        return HTMLResponse(get_graphql_ide_html(graphql_ide="graphiql"), headers=headers)
    html, csp = _page()
    return HTMLResponse(html, headers={**headers, "Content-Security-Policy": csp})
