"""The billing page in a real browser: headless Chromium (Debian's package) drives
``GET /billing`` served by a real ``python -m api`` on loopback (embedded default: SQLite,
sandbox gateway), doing each step of the help article as an account admin would.

Playwright drives the machine's ``/usr/bin/chromium`` (its own browser downloads are not
used). A screenshot of each state is kept under ``var/test-output/billing-page/`` (or
``$TEST_OUTPUT_DIR/billing-page/``). Skipped only when Chromium is absent; ``.ci/run``
installs it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from graphql import parse, specified_rules, validate
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Page,
    Request,
    Route,
    expect,
    sync_playwright,
)
from strawberry.extensions import MaxAliasesLimiter, QueryDepthLimiter

from api.auth import issue_token
from api.graphql.schema import MAX_ALIASES, MAX_QUERY_DEPTH, MAX_TOKENS, schema
from billing.enums import Role
from runtime.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, WEBHOOK_SECRET
from tests.support.embedded import serve_embedded
from tests.system.test_graphiql_browser import CHROMIUM, FLAGS

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed")
SHOTS = Path(os.environ.get("TEST_OUTPUT_DIR", ROOT / "var" / "test-output")) / "billing-page"
AXE = ROOT / "tests" / "vendor" / "axe.min.js"
TIMEOUT = 15_000
#: Every GraphQL document the page sent during these tests (checked against the limits).
SENT: set[str] = set()


def _serve(workdir: Path, **extra: str) -> Iterator[str]:
    """``python -m api`` on loopback (SQLite in ``workdir``, no cron), stopped afterwards."""
    yield from serve_embedded(workdir / "credits.sqlite3", PERIODIC_SECONDS="0", **extra)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded default: SQLite and the sandbox gateway."""
    yield from _serve(tmp_path_factory.mktemp("billing-page"))


@pytest.fixture(scope="module")
def stripe_server(tmp_path_factory: pytest.TempPathFactory, localstripe_url: str) -> Iterator[str]:
    """The Stripe gateway against localstripe, whose Stripe.js stand-in the page loads."""
    yield from _serve(
        tmp_path_factory.mktemp("billing-page-stripe"),
        PAYMENT_GATEWAY="stripe",
        STRIPE_API_KEY="sk_test_suite",
        STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
        STRIPE_API_BASE=localstripe_url,
        STRIPE_PUBLISHABLE_KEY="pk_test_suite",
        STRIPE_JS_URL=f"{localstripe_url}/js.stripe.com/v3/",
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def browser_context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1100, "height": 900})
    try:
        yield context
    finally:
        context.close()


def _token(account: str, *roles: Role, user: str = "ada", ttl: int = 3600) -> str:
    settings = Settings(credits_jwt_secret=TEST_SECRET, _env_file=None)
    return issue_token(
        settings,
        account_id=account,
        user_id=user,
        roles=roles or (Role.ADMIN,),
        email=f"{user}@example.com",
        name=user.title() + " Lovelace",
        ttl_seconds=ttl,
    )


class Billing:
    """One admin's page, with the problems the page logged."""

    def __init__(self, page: Page, server: str, account: str) -> None:
        self.page = page
        self.server = server
        self.account = account
        self.problems: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda e: self.problems.append(str(e)))
        page.on("dialog", lambda d: d.accept())  # "Remove this card?"
        page.on("request", self._record)
        page.on("request", self._elsewhere)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.problems.append(message.text)

    def _elsewhere(self, request: Request) -> None:
        if urlsplit(request.url).hostname not in ("127.0.0.1", None):
            self.problems.append(f"went elsewhere: {request.url}")

    def _record(self, request: Any) -> None:
        if request.method == "POST" and request.url.endswith("/graphql"):
            # The page sends trusted documents by hash (api/trusted.py): record their text.
            body = json.loads(request.post_data or "{}")
            digest = body.get("extensions", {}).get("persistedQuery", {}).get("sha256Hash")
            trusted = schema.trusted.by_hash.get(digest or "")
            if trusted is None:
                self.problems.append(f"sent a document that is not trusted: {body}")
            else:
                SENT.add(trusted.text)

    def open(self, token: str) -> None:
        self.page.goto(f"{self.server}/billing#token={token}")

    def ready(self) -> None:
        expect(self.page.locator("body")).to_have_attribute("data-ready", "true", timeout=TIMEOUT)

    def button(self, name: str) -> Any:
        return self.page.get_by_role("button", name=name, exact=True)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def add_card(self, label: str, **fields: str) -> None:
        self.button("Add Credit Card").click()
        dialog = self.page.locator("#card-dialog")
        dialog.get_by_label(label).check()
        for name, value in fields.items():
            dialog.get_by_label(name, exact=True).fill(value)
        self.button("Save").click()

    def balance(self) -> Any:
        return self.page.locator("#balance")

    def buy(self, credits: int, card: str | None = None) -> None:
        self.button("Buy Purchase Credits").click()
        dialog = self.page.locator("#buy-dialog")
        dialog.get_by_label("Number of credits").fill(str(credits))
        if card is not None:
            dialog.get_by_label("Card").select_option(label=card)
        expect(self.page.locator("#buy-price")).not_to_have_text("\u2013")
        self.button("Purchase").click()
        self.button("Confirm purchase").click()

    def outcome(self) -> Any:
        return self.page.locator("#buy-outcome")


@pytest.fixture
def billing(browser_context: BrowserContext, server: str) -> Iterator[Billing]:
    page = browser_context.new_page()
    b = Billing(page, server, f"acct-{uuid.uuid4().hex[:10]}")
    try:
        yield b
    finally:
        page.close()
    assert b.problems == []


def _gql(server: str, token: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{server}/graphql",
        json={"query": query, "variables": variables},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    body = response.json()
    assert response.status_code == 200 and "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


CONSUME = """mutation($input: ConsumeCreditsInput!) {
  consumeCredits(input: $input) { balance errors { code } } }"""


def _spend(server: str, account: str, process: str, quantity: int, user: str) -> int:
    token = _token(account, Role.SERVICE, user="svc")
    payload = _gql(
        server,
        token,
        CONSUME,
        {
            "input": {
                "accountId": account,
                "userId": user,
                "processType": process,
                "quantity": quantity,
                "idempotencyKey": uuid.uuid4().hex,
                "reference": f"ref-{process.lower()}",
            }
        },
    )["consumeCredits"]
    assert payload["errors"] == [], payload
    return int(payload["balance"])


# ---------------------------------------------------------------- the tests


def test_sign_in_link_moves_the_token_and_cards_are_managed(billing: Billing) -> None:
    page = billing.page
    billing.open(_token(billing.account))
    billing.ready()
    assert urlsplit(page.url).fragment == ""  # the token left the address bar
    assert page.evaluate("Object.keys(sessionStorage)") == ["purchase-credits.token"]
    billing.shot("01-empty")

    address = {"Address line 1": "1 Main St", "Country (2 letters)": "US"}
    billing.add_card("Visa 4242: works", **{"Name on card": "Ada Lovelace", **address})
    card = page.locator("#cards li[data-card]")
    expect(card).to_have_count(1)
    expect(card).to_contain_text("Visa ending 4242")
    expect(card).to_contain_text("Ada Lovelace")
    expect(card).to_contain_text("Primary")
    # the only card: the page says, before Remove is pressed, whom to contact
    expect(page.locator("#last-card-note")).to_be_visible()
    expect(page.locator("#last-card-note")).to_contain_text("contact accounting@leadliaison.com")

    billing.add_card("Mastercard 4444: works")
    expect(card).to_have_count(2)
    expect(page.locator("#last-card-note")).to_be_hidden()
    billing.add_card("Visa 0002: declined when added")
    expect(page.locator("#card-error")).to_contain_text("declined")
    page.locator("#card-dialog [data-close]").click()
    expect(card).to_have_count(2)

    # Edit Card: the expiry and the name
    master = page.get_by_role("listitem", name="Mastercard ending 4444")
    master.get_by_role("button", name="Edit Card").click()
    dialog = page.locator("#card-dialog")
    expect(dialog.get_by_role("heading")).to_have_text("Edit Card")
    dialog.get_by_label("Expiry year").fill("2031")
    dialog.get_by_label("Name on card").fill("Grace Hopper")
    billing.shot("02-edit-card")
    billing.button("Save").click()
    expect(master).to_contain_text("Expires 12/2031")
    expect(master).to_contain_text("Grace Hopper")

    # make primary, then remove the other card; the last one is refused
    master.get_by_role("button", name="Make Mastercard ending 4444 primary").click()
    expect(master).to_contain_text("Primary")
    page.get_by_role("button", name="Remove Visa ending 4242").click()
    expect(card).to_have_count(1)
    page.get_by_role("button", name="Remove Mastercard ending 4444").click()
    expect(page.locator("#cards-status")).to_contain_text("contact accounting@leadliaison.com")
    expect(card).to_have_count(1)
    billing.shot("03-last-card-refused")


def test_buy_with_confirm_a_decline_and_3ds_approved_then_failed_and_retried(
    billing: Billing,
) -> None:
    page = billing.page
    billing.open(_token(billing.account))
    billing.ready()
    billing.add_card("Visa 4242: works")
    expect(page.locator("#cards li[data-card]")).to_have_count(1)

    billing.button("Buy Purchase Credits").click()
    dialog = page.locator("#buy-dialog")
    dialog.get_by_label("Number of credits").fill("250")
    expect(page.locator("#buy-price")).to_have_text("$25.00")
    dialog.get_by_label("Number of credits").fill("50")  # under the price book's minimum
    billing.button("Purchase").click()
    expect(page.locator("#buy-error")).to_contain_text("from 100 to 1,000,000")
    dialog.get_by_label("Number of credits").fill("250")
    billing.button("Purchase").click()
    expect(page.locator("#buy-summary")).to_have_text(
        "Buy 250 credits for $25.00, charged to Visa ending 4242?"
    )
    billing.shot("04-confirm-purchase")
    billing.button("Confirm purchase").click()
    expect(billing.outcome()).to_contain_text("250 credits added")
    expect(billing.balance()).to_have_text("250")
    billing.shot("05-purchased")
    billing.button("Close").click()

    # a card declined when charged: the outcome in words, nothing added
    billing.add_card("Visa 0341: declined when charged")
    expect(page.locator("#cards li[data-card]")).to_have_count(2)
    billing.buy(300, card="Visa ending 0341")
    expect(billing.outcome()).to_contain_text("did not go through")
    expect(billing.outcome()).to_contain_text("declined")
    expect(billing.balance()).to_have_text("250")
    billing.shot("06-declined")
    billing.button("Close").click()

    # 3-D Secure, approved in the sandbox challenge
    billing.add_card("Visa 3155: needs 3-D Secure")
    expect(page.locator("#cards li[data-card]")).to_have_count(3)
    billing.buy(100, card="Visa ending 3155")
    expect(billing.button("Approve payment")).to_be_visible()
    billing.shot("07-3ds-challenge")
    billing.button("Approve payment").click()
    expect(billing.outcome()).to_contain_text("100 credits added")
    expect(billing.balance()).to_have_text("350")
    billing.button("Close").click()

    # failed, then retried as a new attempt that is approved
    billing.buy(200, card="Visa ending 3155")
    billing.button("Fail authentication").click()
    expect(billing.outcome()).to_contain_text("did not go through")
    expect(billing.balance()).to_have_text("350")
    billing.button("Close").click()
    billing.buy(200, card="Visa ending 3155")
    billing.button("Approve payment").click()
    expect(billing.outcome()).to_contain_text("200 credits added")
    expect(billing.balance()).to_have_text("550")
    billing.button("Close").click()

    # left waiting: listed on the page, finished later
    billing.buy(100, card="Visa ending 3155")
    expect(billing.button("Approve payment")).to_be_visible()
    page.keyboard.press("Escape")
    page.reload()
    billing.ready()
    waiting = page.locator("#waiting-list li")
    expect(waiting).to_have_count(1)
    waiting.get_by_role("button", name="Finish authentication").click()
    billing.button("Approve payment").click()
    expect(billing.outcome()).to_contain_text("100 credits added")
    expect(billing.balance()).to_have_text("650")


def test_gear_off_and_on_keeps_its_settings_and_a_threshold_recharge_shows_live(
    billing: Billing,
) -> None:
    page = billing.page
    billing.open(_token(billing.account))
    billing.ready()
    billing.add_card("Visa 4242: works")
    expect(page.locator("#cards li[data-card]")).to_have_count(1)
    billing.buy(300)
    expect(billing.balance()).to_have_text("300")
    billing.button("Close").click()

    page.get_by_role("button", name="Auto-recharge settings").click()
    gear = page.locator("#gear-dialog")
    gear.get_by_role("switch").check()
    gear.get_by_label("When the balance drops below").check()
    gear.get_by_label("Balance threshold in credits").fill("100")
    gear.get_by_label("Credits to add").fill("500")
    gear.get_by_label("Send a notification when it recharges").check()
    gear.get_by_label("Also notify (e-mails, comma-separated)").fill("ops@example.com")
    gear.get_by_label("Monthly cap in credits (empty: none)").fill("5000")
    billing.shot("08-gear")
    billing.button("Save").click()
    state = page.locator("#recharge-state")
    expect(state).to_contain_text("Auto-recharge is active: adds 500 credits when the balance")

    # off keeps the configuration; on again restores it
    page.get_by_role("button", name="Auto-recharge settings").click()
    gear.get_by_role("switch").uncheck()
    billing.button("Save").click()
    expect(state).to_have_text("Auto-recharge is off.")
    page.get_by_role("button", name="Auto-recharge settings").click()
    expect(gear.get_by_label("Balance threshold in credits")).to_have_value("100")
    expect(gear.get_by_label("Monthly cap in credits (empty: none)")).to_have_value("5000")
    expect(gear.get_by_label("Also notify (e-mails, comma-separated)")).to_have_value(
        "ops@example.com"
    )
    gear.get_by_role("switch").check()
    billing.button("Save").click()
    expect(state).to_contain_text("Auto-recharge is active")

    # the low-balance e-mail, beside the balance
    page.get_by_role("button", name="Change the low-balance e-mail").click()
    alert = page.locator("#alert-dialog")
    alert.get_by_label("E-mail the admins when the balance falls below a level").check()
    alert.get_by_label("Level in credits").fill("150")
    billing.button("Save").click()
    expect(page.locator("#low-alert")).to_have_text(
        "Admins are e-mailed when the balance falls below 150 credits."
    )

    # a spend crosses the threshold: the recharge lands, and the page shows it live
    assert _spend(billing.server, billing.account, "HANDWRITTEN_LETTER", 6, "ada") == 90
    expect(billing.balance()).to_have_text("590", timeout=TIMEOUT)
    billing.shot("09-recharged-live")


def test_report_filters_search_csv_and_chart(billing: Billing) -> None:
    page = billing.page
    token = _token(billing.account)
    billing.open(token)
    billing.ready()
    billing.add_card("Visa 4242: works")
    expect(page.locator("#cards li[data-card]")).to_have_count(1)
    billing.buy(1000)
    expect(billing.balance()).to_have_text("1,000")
    billing.button("Close").click()
    # two people spend; the report names them, not their ids
    _gql(billing.server, _token(billing.account, user="grace"), "{ viewer { userId } }", {})
    _spend(billing.server, billing.account, "POSTCARD", 2, "ada")  # 24
    _spend(billing.server, billing.account, "POSTCARD", 1, "grace")  # 12
    _spend(billing.server, billing.account, "HANDWRITTEN_LETTER", 1, "grace")  # 35
    _spend(billing.server, billing.account, "SMART_MATCH", 10, "grace")  # free
    expect(billing.balance()).to_have_text("929", timeout=TIMEOUT)

    billing.button("Manage Purchase Credits").click()
    rows = page.locator("#history tbody tr")
    expect(rows).to_have_count(4)  # a purchase and three paid spends (the free one has none)
    filters = page.locator("#filters")
    filters.get_by_label("Process type").select_option(label="Postcards")
    expect(rows).to_have_count(2)
    filters.get_by_label("User").select_option(label="Grace Lovelace (grace@example.com)")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("-12")
    filters.get_by_label("User").select_option(label="All users")
    filters.get_by_label("Process type").select_option(label="All processes")
    filters.get_by_label("Transaction type").select_option(label="Purchase")
    expect(rows).to_have_count(1)
    filters.get_by_label("Transaction type").select_option(label="All types")
    filters.get_by_label("Search", exact=True).fill("letter")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("Handwritten letter")
    billing.shot("10-report-search")

    with page.expect_download() as download:
        billing.button("Download CSV").click()
    text = Path(download.value.path()).read_text(encoding="utf-8")
    table = list(csv.DictReader(io.StringIO(text)))
    assert [(r["type"], r["processType"], r["credits"]) for r in table] == [
        ("USAGE", "HANDWRITTEN_LETTER", "-35")
    ]

    filters.get_by_label("Search", exact=True).fill("")
    expect(rows).to_have_count(4)
    usage = page.locator("#usage-table tbody tr")
    expect(usage).to_have_count(3)
    expect(page.locator("#usage-table tr[data-process='POSTCARD']")).to_contain_text("36")
    smart = page.locator("#usage-table tr[data-process='SMART_MATCH'] td")
    expect(smart.nth(1)).to_have_text("10")  # free units, though they cost nothing
    expect(page.locator("#usage-summary")).to_contain_text("71 credits spent")
    expect(page.locator("#chart svg rect")).to_have_count(3)
    billing.shot("11-report-and-chart")


def test_a_purchase_whose_answer_is_lost_is_retried_with_the_same_key(billing: Billing) -> None:
    """The purchase reaches the service but its answer never reaches the page (a dropped
    connection): the page offers to try again with the same idempotency key, and the card
    is charged once."""
    page = billing.page
    billing.open(_token(billing.account))
    billing.ready()
    billing.add_card("Visa 4242: works")
    expect(page.locator("#cards li[data-card]")).to_have_count(1)
    keys: list[str] = []

    def lose_the_answer(route: Route) -> None:
        body = route.request.post_data or ""
        if json.loads(body).get("operationName") != "PurchaseCredits":
            route.continue_()
            return
        keys.append(json.loads(body)["variables"]["input"]["idempotencyKey"])
        if len(keys) == 1:
            route.fetch()  # the service does the purchase...
            route.abort("connectionreset")  # ...and the page never hears of it
        else:
            route.continue_()

    page.route("**/graphql", lose_the_answer)
    billing.buy(300)
    expect(billing.outcome()).to_contain_text("try again")
    billing.problems[:] = [p for p in billing.problems if "ERR_CONNECTION_RESET" not in p]
    billing.button("Try again").click()
    expect(billing.outcome()).to_contain_text("300 credits added")
    assert len(keys) == 2 and keys[0] == keys[1]
    expect(billing.balance()).to_have_text("300")  # charged once
    page.unroute("**/graphql")
    billing.button("Close").click()
    page.reload()
    billing.ready()
    expect(billing.balance()).to_have_text("300")


def test_non_admin_and_expired_token_screens(billing: Billing) -> None:
    page = billing.page
    billing.open(_token(billing.account, Role.USER, user="bob"))
    expect(page.get_by_role("heading", name="Administrative rights needed")).to_be_visible()
    expect(page.locator("#noadmin")).to_contain_text("administrative rights")
    expect(page.locator("#noadmin")).to_contain_text("accounting@leadliaison.com")
    billing.shot("12-not-admin")

    billing.open(_token(billing.account, ttl=-60))
    page.reload()
    expect(page.get_by_role("heading", name="Sign in again")).to_be_visible(timeout=TIMEOUT)
    billing.shot("13-sign-in-again")
    billing.problems[:] = [p for p in billing.problems if "401" not in p]


def test_buying_by_keyboard_alone(billing: Billing) -> None:
    page = billing.page
    billing.open(_token(billing.account))
    billing.ready()
    billing.add_card("Visa 4242: works")
    expect(page.locator("#cards li[data-card]")).to_have_count(1)

    buy = billing.button("Buy Purchase Credits")
    for _ in range(30):  # Tab from the top until the button has the focus
        page.keyboard.press("Tab")
        if buy.evaluate("b => b === document.activeElement"):
            break
    else:
        raise AssertionError("Tab never reached Buy Purchase Credits")
    page.keyboard.press("Enter")
    amount = page.locator("#buy-dialog").get_by_label("Number of credits")
    expect(amount).to_be_focused()
    amount.press("Control+a")
    page.keyboard.type("400")
    page.keyboard.press("Enter")  # submits: Purchase
    expect(billing.button("Confirm purchase")).to_be_focused()
    page.keyboard.press("Enter")
    expect(billing.outcome()).to_contain_text("400 credits added")
    expect(billing.button("Close")).to_be_visible()
    page.keyboard.press("Escape")
    expect(buy).to_be_focused()
    expect(billing.balance()).to_have_text("400")


def test_no_serious_accessibility_violations(browser: Browser, server: str) -> None:
    """axe-core (vendored for the tests) on every state of the page, at phone width. Its
    script is injected, so this context alone bypasses the page's Content-Security-Policy."""
    context = browser.new_context(bypass_csp=True, viewport={"width": 390, "height": 844})
    found: list[str] = []
    try:
        page = context.new_page()
        account = f"acct-{uuid.uuid4().hex[:10]}"
        page.goto(f"{server}/billing#token={_token(account)}")
        expect(page.locator("body")).to_have_attribute("data-ready", "true", timeout=TIMEOUT)
        page.get_by_role("button", name="Add Credit Card").click()
        page.get_by_role("button", name="Save", exact=True).click()
        expect(page.locator("#cards li[data-card]")).to_have_count(1)
        page.get_by_role("button", name="Manage Purchase Credits", exact=True).click()
        expect(page.locator("#report-status")).to_contain_text("transactions")
        page.add_script_tag(content=AXE.read_text(encoding="utf-8"))

        def check(state: str) -> None:
            result = page.evaluate(
                "async () => (await axe.run(document, {resultTypes: ['violations']}))"
                ".violations.filter(v => ['serious', 'critical'].includes(v.impact))"
                ".map(v => v.id + ': ' + v.nodes.map(n => n.target.join(' ')).join(', '))"
            )
            found.extend(f"{state}: {v}" for v in result)

        check("page")
        page.get_by_role("button", name="Buy Purchase Credits", exact=True).click()
        check("buy dialog")
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Auto-recharge settings").click()
        check("gear dialog")
        page.keyboard.press("Escape")
        page.get_by_role("button", name="Add Credit Card", exact=True).click()
        check("card dialog")
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "14-phone-width.png"), full_page=True)
    finally:
        context.close()
    assert found == []


def test_stripe_gateway_page_with_elements_setup_intents_and_3ds(
    browser_context: BrowserContext, stripe_server: str
) -> None:
    """Under PAYMENT_GATEWAY=stripe the card is typed into Stripe Elements (localstripe's
    stand-in for Stripe.js), saved with a SetupIntent, and 3-D Secure is Stripe.js's."""
    page = browser_context.new_page()
    billing = Billing(page, stripe_server, f"acct-{uuid.uuid4().hex[:10]}")
    try:
        billing.open(_token(billing.account))
        billing.ready()

        def add(number: str, *, authenticate: bool = False) -> None:
            billing.button("Add Credit Card").click()
            element = page.locator("#card-element")
            expect(element.get_by_placeholder("number")).to_be_visible(timeout=TIMEOUT)
            for field, value in (
                ("number", number),
                ("exp_month", "12"),
                ("exp_year", "34"),
                ("cvc", "123"),
                ("postal_code", "75240"),
            ):
                element.get_by_placeholder(field, exact=True).fill(value)
            page.locator("#card-dialog").get_by_label("Name on card").fill("Ada Lovelace")
            billing.button("Save").click()
            if authenticate:  # the bank's challenge, shown by Stripe.js over the page
                billing.button("Complete authentication").click()

        add("4242424242424242")
        cards = page.locator("#cards li[data-card]")
        expect(cards).to_have_count(1, timeout=TIMEOUT)
        expect(cards.first).to_contain_text("ending 4242")
        expect(cards.first).to_contain_text("Ada Lovelace")
        billing.shot("15-stripe-elements-card")

        billing.buy(200)
        expect(billing.outcome()).to_contain_text("200 credits added", timeout=TIMEOUT)
        expect(billing.balance()).to_have_text("200")
        billing.button("Close").click()

        add("4000002500003155", authenticate=True)
        expect(cards).to_have_count(2, timeout=TIMEOUT)
        billing.buy(100, card="Visa ending 3155")
        billing.button("Complete authentication").click()  # Stripe.js confirmCardPayment
        expect(billing.outcome()).to_contain_text("100 credits added", timeout=TIMEOUT)
        expect(billing.balance()).to_have_text("300")
        billing.shot("16-stripe-3ds-purchased")
    finally:
        page.close()
    assert billing.problems == []


def test_zz_every_operation_the_page_sent_fits_well_under_the_limits() -> None:
    """Like tests/api/test_hardening.py for the platform's operations: half the tokens and
    aliases, two levels of depth to spare. (Named to run after the page's tests.)"""
    if not SENT:
        pytest.skip("run with the page's tests")
    half = [
        *QueryDepthLimiter(max_depth=MAX_QUERY_DEPTH - 2).validation_rules,
        *MaxAliasesLimiter(max_alias_count=MAX_ALIASES // 2).validation_rules,
    ]
    for query in sorted(SENT):
        document = parse(query, max_tokens=MAX_TOKENS // 2)
        assert validate(schema._schema, document, [*specified_rules, *half]) == [], query


def test_root_redirects_to_the_page(server: str) -> None:
    response = httpx.get(f"{server}/", follow_redirects=False, timeout=5)
    assert response.status_code == 307 and response.headers["location"] == "/billing"
    page = httpx.get(f"{server}/billing", timeout=5)
    assert page.status_code == 200
    assert re.search(r"script-src 'self'", page.headers["content-security-policy"])
