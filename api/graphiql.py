"""The GraphiQL page on ``GET /graphql`` (when ``Settings.show_graphiql``).

The real GraphiQL (the ``graphiql`` package with the React it runs on), pinned and
vendored under ``api/static/vendor/graphiql/`` (``VERSIONS`` names them;
``scripts/vendor.sh`` rebuilds them from npm), served from the service's own origin: it
loads nothing from anywhere else, so it works offline and behind strict egress rules, and
the Content-Security-Policy allows scripts from this origin only. The bearer token goes in
the page's Headers tab: ``{"Authorization": "Bearer <token>"}``; the page itself needs no
token and runs nothing.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

PAGE_PATH = Path(__file__).with_name("static") / "graphiql.html"

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        # GraphiQL's editors (CodeMirror) and popups position themselves with inline styles.
        "style-src 'self' 'unsafe-inline'",
        "font-src 'self' data:",
        "connect-src 'self'",
        "img-src 'self' data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


@cache
def _page() -> str:
    return PAGE_PATH.read_text(encoding="utf-8")


def graphiql_page(request: Request) -> Response:
    headers = {
        "Cache-Control": "no-store",
        "Referrer-Policy": "no-referrer",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Content-Security-Policy": CSP,
    }
    return HTMLResponse(_page(), headers=headers)
