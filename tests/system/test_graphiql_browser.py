"""GraphiQL in a real browser: headless Chromium (Debian's package) opens the page served by
a real ``python -m api`` on loopback, puts the bearer token in GraphiQL's Headers tab, runs
the balance query and reads the answer off the page.

Playwright drives the machine's ``/usr/bin/chromium`` (its own browser downloads are not
used). Skipped only when Chromium is absent; ``.ci/run`` installs it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import ConsoleMessage, Request, Response, expect, sync_playwright

from api.auth import issue_token
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import TEST_SECRET
from tests.support.embedded import serve_embedded

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from serve_embedded(tmp_path_factory.mktemp("graphiql") / "credits.sqlite3")


def _admin_token(account: str) -> str:
    settings = Settings(credits_jwt_secret=TEST_SECRET, _env_file=None)
    return issue_token(settings, account_id=account, user_id="ada", roles=[Role.ADMIN])


def _buy(base: str, token: str, credits: int) -> None:
    """Put credits on the account over plain HTTP, so the balance is worth reading."""
    for query in (
        'mutation { addCard(input: {paymentMethodId: "pm_card_visa"}) { errors { code } } }',
        f'mutation {{ purchaseCredits(input: {{credits: {credits}, idempotencyKey: "b-1"}}) '
        "{ balance errors { code } } }",
    ):
        response = httpx.post(
            f"{base}/graphql",
            json={"query": query},
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert response.status_code == 200 and "errors" not in response.json(), response.text
        payload = next(iter(response.json()["data"].values()))
        assert payload["errors"] == [], payload


def _answer_to(operation: str) -> Callable[[Response], bool]:
    """Matches the response to the POST of ``operation`` (not GraphiQL's schema fetches)."""

    def match(r: Response) -> bool:
        return r.request.method == "POST" and operation in (r.request.post_data or "")

    return match


def test_graphiql_runs_the_balance_query_with_a_bearer_token(server: str, tmp_path: Path) -> None:
    """The real GraphiQL (vendored): the token typed in its Headers tab, the balance query
    run, the schema fetched for the docs explorer, all from the service's own origin."""
    token = _admin_token("acct-browser")
    _buy(server, token, 750)
    problems: list[str] = []
    elsewhere: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh --user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=FLAGS,
            viewport={"width": 1280, "height": 800},
        )
        try:
            page = context.new_page()

            def console(m: ConsoleMessage) -> None:
                # the schema fetch before a token is typed in, on purpose
                if m.type == "error" and "status of 401" not in m.text:
                    problems.append(m.text)

            def request(r: Request) -> None:
                if urlsplit(r.url).hostname != "127.0.0.1":
                    elsewhere.append(r.url)

            page.on("console", console)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("request", request)
            page.goto(f"{server}/graphql")
            expect(page.locator(".graphiql-container")).to_be_visible(timeout=15_000)
            assert page.title() == "Purchase Credits · GraphiQL"
            expect(page.get_by_role("button", name="Balance")).to_be_visible()  # example tabs

            # The token goes in the Headers tab (inserted, as a paste would).
            page.get_by_role("button", name="Headers", exact=True).click()
            page.locator(".graphiql-editor-tool .graphiql-editor").last.click()
            page.keyboard.press("Control+a")
            page.keyboard.insert_text(json.dumps({"Authorization": f"Bearer {token}"}))

            with page.expect_response(_answer_to("query Balance")) as answer:
                page.get_by_role("button", name="Execute query (Ctrl-Enter)").click()
            assert answer.value.json() == {"data": {"creditAccount": {"balance": 750}}}
            expect(page.locator(".graphiql-response")).to_contain_text('"balance": 750')

            # With the token, the schema loads: the docs explorer lists the root types.
            page.get_by_role("button", name="Re-fetch GraphQL schema").click()
            page.get_by_role("button", name="Show Documentation Explorer").click()
            docs = page.locator(".graphiql-doc-explorer")
            expect(docs).to_contain_text("Query", timeout=15_000)
            docs.get_by_role("link", name="Query").first.click()
            expect(docs).to_contain_text("creditAccount")

            # The History example, run with Ctrl-Enter from its editor.
            page.get_by_role("button", name="History", exact=True).first.click()
            page.locator(".graphiql-query-editor .CodeMirror").click()
            page.keyboard.press("Control+Enter")
            result = page.locator(".graphiql-response")
            expect(result).to_contain_text('"transactions"')
            expect(result).to_contain_text('"credits": 750')
            expect(result).to_contain_text('"hasNextPage": false')
            page.screenshot(path=str(tmp_path / "graphiql.png"))
        finally:
            context.close()
    assert problems == []  # no script errors, no Content-Security-Policy violations
    assert elsewhere == []  # nothing was loaded from anywhere but the service
