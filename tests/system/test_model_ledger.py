"""Model-based test of the ledger: Hypothesis drives random sequences of operations through
the GraphQL API (and the jobs) and checks them against a small in-memory model of what the
balance, the entries and the payments must be; DESIGN.md section 2's invariants are checked
after every step.

Operations: purchases (``pm_card_visa`` succeeds, ``pm_card_chargeCustomerFail`` declines),
spends of prepaid and free-quota processes, reversals, grants, adjustments (both signs),
metered usage, cards added, removed and made primary, auto-recharge settings, the threshold
job (delivered several times at once), the sweep, time passing (backoff), retries with the
same idempotency key (same and other parameters), and concurrent steps (one key sent
several times at once; several spends at once, across the threshold or over the balance).

How it runs: a ``RuleBasedStateMachine`` whose rules are synchronous and run each
coroutine on the session's event loop (``loop.run_until_complete``), which is free because
the test function itself is synchronous (its async fixtures were set up on that loop).
Each example is a fresh account; the clock is moved to the 5th of last month so a run never
crosses a month end (free quotas), and "time passes" moves it on by 13 hours at most 8 times.

Bounds: the default profile (``ci``) is small and derandomized, so CI runs are the same
every time. A bigger, random run:

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/system/test_model_ledger.py
    (add TEST_BACKEND=postgres TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/test)

What the model leaves out, on purpose: an auto-recharge amount below its threshold (then
how many recharges run depends on when the jobs run, so the model only draws amounts at or
above the threshold), and scheduled recharges (the model's schedule is 30 days, never due).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from billing import clock, reconcile
from billing.enums import Role
from billing.ledger.posting import balance_of
from billing.models import AutoRechargeSetting, FreeQuotaUsage, LedgerEntry, Payment
from billing.payments.gateways import ChargeRequest, ChargeResult
from runtime.queue import InProcessQueue
from tests.conftest import Caller, MakeCaller
from tests.support.ops import (
    ADD_CARD,
    ADJUST,
    AUTO_RECHARGE,
    CONSUME,
    GRANT,
    METERED,
    PURCHASE,
    REMOVE_CARD,
    REVERSE,
    SET_PRIMARY,
)

T = TypeVar("T")

_COMMON: dict[str, Any] = {
    "deadline": None,
    "database": None,  # nothing written to .hypothesis/
    "suppress_health_check": list(HealthCheck),
    "print_blob": False,
}
PROFILES = {
    # CI: small, and the same examples every run.
    "ci": settings(max_examples=25, stateful_step_count=40, derandomize=True, **_COMMON),
    # By hand, for a while: HYPOTHESIS_PROFILE=long
    "long": settings(max_examples=150, stateful_step_count=60, derandomize=False, **_COMMON),
}
PROFILE = PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "ci"), PROFILES["ci"])

PREPAID = {"POSTCARD": 12, "HANDWRITTEN_LETTER": 35, "ADVANCED_EMAIL_TEST": 5, "PROSPECT_SEARCH": 2}
FREE_QUOTA = {"SMART_MATCH": 500, "SOCIAL_MEDIA_APPEND": 1000}  # 1 credit a unit beyond
CARD_PM = {"visa": "pm_card_visa", "decline": "pm_card_chargeCustomerFail"}
MAX_WAITS = 8
WAIT = timedelta(hours=13)  # longer than any backoff (4 h, 12 h)


def _start_time() -> datetime:
    """The 5th of last month, midnight UTC: in the past, and 8 waits stay in that month."""
    first = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first - timedelta(days=1)).replace(day=5)


def key() -> str:
    return uuid.uuid4().hex


# ---------------------------------------------------------------- the model


@dataclass
class CardM:
    gid: str
    kind: str  # "visa" or "decline"
    primary: bool
    order: int
    removed: bool = False


@dataclass
class AutoRechargeM:
    enabled: bool = False
    trigger: str | None = None
    threshold: int | None = None
    credits: int | None = None
    pinned: str | None = None  # a card's gid when not the primary
    cap: int | None = None
    failures: int = 0
    paused: bool = False
    blocked: bool = False  # in backoff after a decline (until time passes)

    def level(self) -> int | None:
        """What the account's recharge threshold is while this is in force."""
        if self.enabled and self.trigger == "THRESHOLD" and not self.paused:
            return self.threshold
        return None


@dataclass
class Keyed:
    """A keyed call the service remembers, to be retried."""

    caller: str  # "admin", "service" or "staff"
    query: str
    variables: dict[str, Any]
    payload: dict[str, Any]
    other: dict[str, Any]  # the same key with other parameters


@dataclass
class Usage:
    gid: str
    credits: int  # spent (positive)
    reversed: bool = False


@dataclass
class Model:
    balance: int = 0
    entries: Counter[tuple[str, int]] = field(default_factory=Counter)
    payments: Counter[tuple[str, str, int]] = field(default_factory=Counter)
    quota_used: Counter[str] = field(default_factory=Counter)
    recharged: int = 0  # auto-recharged credits this month (the monthly cap counts them)
    cards: list[CardM] = field(default_factory=list)
    ar: AutoRechargeM = field(default_factory=AutoRechargeM)
    usages: list[Usage] = field(default_factory=list)
    other_entries: list[str] = field(default_factory=list)  # gids of non-usage entries
    keyed: list[Keyed] = field(default_factory=list)

    def active(self) -> list[CardM]:
        return [c for c in self.cards if not c.removed]

    def primary(self) -> CardM | None:
        return next((c for c in self.cards if c.primary and not c.removed), None)

    def card(self, gid: str) -> CardM:
        return next(c for c in self.cards if c.gid == gid)

    def post(self, type_: str, credits: int) -> None:
        self.balance += credits
        assert self.balance >= 0
        self.entries[(type_, credits)] += 1

    def recharge_card(self) -> CardM | None:
        if self.ar.pinned is not None and not self.card(self.ar.pinned).removed:
            return self.card(self.ar.pinned)
        return self.primary()

    def recharge_could_charge(self) -> bool:
        """Whether a threshold job run now could move money (then concurrent steps must
        not depend on when it runs)."""
        return self.ar.level() is not None and not self.ar.blocked

    def threshold_job(self) -> None:
        """What one threshold_recharge run does (``billing.recharge.runs``); R >= threshold."""
        ar = self.ar
        level = ar.level()
        if level is None or ar.blocked or self.balance >= level:
            return
        assert ar.credits is not None
        if ar.cap is not None and self.recharged + ar.credits > ar.cap:
            return  # capped
        card = self.recharge_card()
        if card is None:
            ar.paused = True  # "No card on file"
            return
        if card.kind == "visa":
            self.post("AUTO_RECHARGE", ar.credits)
            self.payments[("AUTO_RECHARGE", "SUCCEEDED", ar.credits)] += 1
            self.recharged += ar.credits
            ar.failures, ar.blocked = 0, False
            return
        self.payments[("AUTO_RECHARGE", "FAILED", ar.credits)] += 1
        ar.failures += 1
        if ar.failures >= 3:
            ar.paused, ar.blocked = True, False
        else:
            ar.blocked = True

    def after_debit(self) -> None:
        """The API queues the threshold job when a write leaves the balance under it."""
        level = self.ar.level()
        if level is not None and self.balance < level:
            self.threshold_job()


# ---------------------------------------------------------------- the harness


class ChargeLog:
    """Wraps the gateway's ``charge``: which idempotency keys each account was charged
    with, and how many times each."""

    def __init__(self, inner: Callable[[ChargeRequest], Awaitable[ChargeResult]]) -> None:
        self.inner = inner
        self.keys: dict[str, Counter[str]] = {}

    async def __call__(self, request: ChargeRequest) -> ChargeResult:
        account = request.metadata.get("account_id", "")
        self.keys.setdefault(account, Counter())[request.idempotency_key] += 1
        return await self.inner(request)


@dataclass
class Env:
    loop: asyncio.AbstractEventLoop
    caller: MakeCaller
    queue: InProcessQueue
    charges: ChargeLog
    stripe: Any  # the Stripe gateway, for reconciliation against Stripe (else None)


def _err_codes(payload: dict[str, Any]) -> list[str]:
    return [e["code"] for e in payload["errors"]]


class LedgerMachine(RuleBasedStateMachine):
    env: Env  # set on a subclass by the test

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.waits = 0
        self.stack = ExitStack()
        self.stack.enter_context(clock.travel(_start_time()))
        self.account = f"model-{uuid.uuid4().hex[:12]}"
        make = self.env.caller
        self.admin = make(self.account, Role.ADMIN, email="admin@example.com")
        self.service = make(self.account, Role.SERVICE, user="svc-model")
        self.staff = make("vendor", Role.BILLING_STAFF, user="staff-model")
        self.run(self.admin.gql("{ creditAccount { balance } }"))  # provisions the account

    # -- plumbing

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.env.loop.run_until_complete(coro)

    def who(self, name: str) -> Caller:
        return {"admin": self.admin, "service": self.service, "staff": self.staff}[name]

    async def call(self, who: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        data = await self.who(who).gql(query, variables)
        return next(iter(data.values()))

    def call_and_drain(self, who: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            payload = await self.call(who, query, variables)
            await self.env.queue.drain()
            return payload

        return self.run(go())

    def remember(
        self,
        who: str,
        query: str,
        variables: dict[str, Any],
        payload: dict[str, Any],
        other: dict[str, Any],
    ) -> None:
        self.model.keyed.append(Keyed(who, query, variables, payload, other))

    def teardown(self) -> None:
        try:
            self.run(self.env.queue.drain())
            if self.env.stripe is not None:
                report = self.run(reconcile.run([self.account], stripe=self.env.stripe))
                assert report.ok, [d.line() for d in report.discrepancies] + report.errors
        finally:
            self.stack.close()

    # -- cards

    @precondition(lambda self: len(self.model.active()) < 4)
    @rule(kind=st.sampled_from(["visa", "visa", "decline"]), primary=st.booleans())
    def add_card(self, kind: str, primary: bool) -> None:
        m = self.model
        payload = self.call_and_drain("admin", ADD_CARD, {"pm": CARD_PM[kind], "primary": primary})
        assert payload["errors"] == [], payload
        card = payload["card"]
        becomes_primary = primary or m.primary() is None
        if becomes_primary:
            for c in m.cards:
                c.primary = False
        m.cards.append(CardM(card["id"], kind, becomes_primary, len(m.cards)))
        assert card["isPrimary"] is becomes_primary
        if m.ar.paused:  # a new card clears a pause
            m.ar.paused, m.ar.failures, m.ar.blocked = False, 0, False

    @precondition(lambda self: bool(self.model.active()))
    @rule(pick=st.integers(0, 7), as_staff=st.booleans())
    def remove_card(self, pick: int, as_staff: bool) -> None:
        m = self.model
        active = m.active()
        card = active[pick % len(active)]
        who = "staff" if as_staff else "admin"
        payload = self.call_and_drain(who, REMOVE_CARD, {"id": card.gid})
        if len(active) == 1 and not as_staff:
            assert _err_codes(payload) == ["LAST_CARD"], payload
            return
        assert payload["errors"] == [], payload
        card.removed = True
        if card.primary:
            card.primary = False
            remaining = m.active()
            if remaining:
                max(remaining, key=lambda c: c.order).primary = True
        if m.ar.pinned == card.gid:
            m.ar.pinned = None
        primary = m.primary()
        assert (payload["primaryCard"] or {}).get("id") == (primary.gid if primary else None)

    @precondition(lambda self: bool(self.model.active()))
    @rule(pick=st.integers(0, 7))
    def set_primary(self, pick: int) -> None:
        m = self.model
        active = m.active()
        card = active[pick % len(active)]
        payload = self.call_and_drain("admin", SET_PRIMARY, {"id": card.gid})
        assert payload["errors"] == [], payload
        for c in m.cards:
            c.primary = c is card

    # -- purchases

    def _purchase_expectation(self, credits: int, card_gid: str | None) -> tuple[str, CardM | None]:
        m = self.model
        if not 100 <= credits <= 1_000_000:
            return "INVALID_AMOUNT", None
        if card_gid is None:
            card = m.primary()
            return ("ok", card) if card else ("NO_CARD_ON_FILE", None)
        card = m.card(card_gid)
        return ("NOT_FOUND", None) if card.removed else ("ok", card)

    def _apply_purchase(self, credits: int, card: CardM, payload: dict[str, Any]) -> None:
        m = self.model
        if card.kind == "visa":
            m.post("PURCHASE", credits)
            m.payments[("PURCHASE", "SUCCEEDED", credits)] += 1
            assert payload["errors"] == [], payload
            assert payload["payment"]["status"] == "SUCCEEDED"
            assert payload["transaction"]["credits"] == credits
            assert payload["balance"] == m.balance
            m.other_entries.append(payload["transaction"]["id"])
        else:
            m.payments[("PURCHASE", "FAILED", credits)] += 1
            assert payload["payment"]["status"] == "FAILED", payload
            assert _err_codes(payload) == ["CARD_DECLINED"]
            assert payload["transaction"] is None

    def _purchase_variables(self, credits: int, pick: int | None) -> dict[str, Any]:
        cards = self.model.cards
        variables: dict[str, Any] = {"credits": credits, "idempotencyKey": key()}
        if pick is not None and cards:
            variables["cardId"] = cards[pick % len(cards)].gid
        return variables

    @rule(credits=st.sampled_from([100, 250, 1000, 50]), pick=st.none() | st.integers(0, 7))
    def purchase(self, credits: int, pick: int | None) -> None:
        variables = self._purchase_variables(credits, pick)
        expected, card = self._purchase_expectation(credits, variables.get("cardId"))
        payload = self.call_and_drain("admin", PURCHASE, {"input": variables})
        if expected != "ok":
            assert _err_codes(payload) == [expected], payload
            assert payload["payment"] is None
            return
        assert card is not None
        self._apply_purchase(credits, card, payload)
        other = {**variables, "credits": credits + 1}
        self.remember("admin", PURCHASE, {"input": variables}, payload, {"input": other})

    # -- spends

    def _spend_cost(self, process: str, quantity: int) -> tuple[int, int]:
        """(credits, free units) the spend would take."""
        if process in PREPAID:
            return quantity * PREPAID[process], 0
        free = max(0, min(quantity, FREE_QUOTA[process] - self.model.quota_used[process]))
        return quantity - free, free

    def _spend_variables(self, process: str, quantity: int) -> dict[str, Any]:
        return {
            "accountId": self.account,
            "userId": "user-1",
            "processType": process,
            "quantity": quantity,
            "idempotencyKey": key(),
        }

    def _apply_spend(self, process: str, quantity: int, payload: dict[str, Any]) -> bool:
        """Check a spend's payload against the model and apply it; False if refused."""
        m = self.model
        cost, free = self._spend_cost(process, quantity)
        if cost > m.balance:
            assert _err_codes(payload) == ["INSUFFICIENT_CREDITS"], payload
            return False
        assert payload["errors"] == [], payload
        assert payload["freeUnitsApplied"] == free
        m.quota_used[process] += free
        if cost == 0:
            assert payload["transaction"] is None
            assert payload["balance"] == m.balance
            return True
        m.post("USAGE", -cost)
        tx = payload["transaction"]
        assert tx["credits"] == -cost and tx["type"] == "USAGE", tx
        m.usages.append(Usage(tx["id"], cost))
        return True

    @rule(
        process=st.sampled_from([*PREPAID, *FREE_QUOTA]),
        quantity=st.integers(1, 40) | st.integers(100, 400),
    )
    def spend(self, process: str, quantity: int) -> None:
        if process in PREPAID:
            quantity = min(quantity, 40)
        variables = self._spend_variables(process, quantity)
        cost, _ = self._spend_cost(process, quantity)
        payload = self.call_and_drain("service", CONSUME, {"input": variables})
        if self._apply_spend(process, quantity, payload):
            if cost:
                assert payload["balance"] == self.model.balance
                self.model.after_debit()
            other = {**variables, "reference": "another"}
            self.remember("service", CONSUME, {"input": variables}, payload, {"input": other})

    @rule(quantity=st.integers(1, 5))
    def metered(self, quantity: int) -> None:
        variables = {
            "accountId": self.account,
            "userId": "user-1",
            "processType": "PREMIUM_AUDIO_TRANSCRIPTION",
            "quantity": quantity,
            "idempotencyKey": key(),
        }
        payload = self.call_and_drain("service", METERED, {"input": variables})
        if not self.model.active():
            assert _err_codes(payload) == ["NO_CARD_ON_FILE"], payload
            return
        assert payload["errors"] == [] and payload["usage"]["amountCents"] == 25 * quantity

    # -- corrections

    @precondition(lambda self: bool(self.model.usages or self.model.other_entries))
    @rule(pick=st.integers(0, 50), as_staff=st.booleans(), usage=st.booleans())
    def reverse(self, pick: int, as_staff: bool, usage: bool) -> None:
        m = self.model
        target: Usage | None = None
        if (usage and m.usages) or not m.other_entries:
            target = m.usages[pick % len(m.usages)]
            gid = target.gid
        else:
            gid = m.other_entries[pick % len(m.other_entries)]
        variables = {"transactionId": gid, "reason": "model reversal", "idempotencyKey": key()}
        who = "staff" if as_staff else "service"
        payload = self.call_and_drain(who, REVERSE, {"input": variables})
        if target is None or target.reversed:
            assert _err_codes(payload) == ["VALIDATION"], payload
            return
        assert payload["errors"] == [], payload
        target.reversed = True
        m.post("REVERSAL", target.credits)
        assert payload["transaction"]["credits"] == target.credits
        assert payload["balance"] == m.balance
        m.other_entries.append(payload["transaction"]["id"])
        other = {**variables, "reason": "another reason"}
        self.remember(who, REVERSE, {"input": variables}, payload, {"input": other})

    def _staff_variables(self, credits: int) -> dict[str, Any]:
        return {
            "accountId": self.account,
            "credits": credits,
            "reason": "model",
            "idempotencyKey": key(),
        }

    @rule(credits=st.integers(1, 1500))
    def grant(self, credits: int) -> None:
        variables = self._staff_variables(credits)
        payload = self.call_and_drain("staff", GRANT, {"input": variables})
        assert payload["errors"] == [], payload
        self.model.post("GRANT", credits)
        assert payload["balance"] == self.model.balance
        self.model.other_entries.append(payload["transaction"]["id"])
        self.model.after_debit()
        other = {**variables, "reason": "other"}
        self.remember("staff", GRANT, {"input": variables}, payload, {"input": other})

    @rule(credits=st.integers(-600, 600).filter(bool))
    def adjust(self, credits: int) -> None:
        m = self.model
        variables = self._staff_variables(credits)
        payload = self.call_and_drain("staff", ADJUST, {"input": variables})
        if m.balance + credits < 0:
            assert _err_codes(payload) == ["INSUFFICIENT_CREDITS"], payload
            return
        assert payload["errors"] == [], payload
        m.post("ADJUSTMENT", credits)
        assert payload["balance"] == m.balance
        m.other_entries.append(payload["transaction"]["id"])
        m.after_debit()
        other = {**variables, "reason": "other"}
        self.remember("staff", ADJUST, {"input": variables}, payload, {"input": other})

    # -- auto-recharge

    @rule(
        enabled=st.booleans(),
        trigger=st.sampled_from(["THRESHOLD", "THRESHOLD", "SCHEDULE"]),
        threshold=st.sampled_from([50, 200, 500]),
        extra=st.sampled_from([0, 300, 1000]),
        pick=st.none() | st.integers(0, 7),
        cap=st.none() | st.sampled_from([1, 2, 5]),
    )
    def auto_recharge(
        self,
        enabled: bool,
        trigger: str,
        threshold: int,
        extra: int,
        pick: int | None,
        cap: int | None,
    ) -> None:
        m = self.model
        credits = max(100, threshold + extra)  # at or above the threshold (see above)
        # Every field, so the setting is replaced as a whole (an omitted one would be kept).
        variables: dict[str, Any] = {
            "enabled": enabled,
            "trigger": None,
            "intervalDays": None,
            "thresholdCredits": None,
            "rechargeCredits": None,
            "usePrimaryCard": True,
            "cardId": None,
            "notify": False,
            "notifyEmails": None,
            "monthlyLimitCredits": None,
        }
        pinned: CardM | None = None
        if enabled:
            variables |= {"trigger": trigger, "rechargeCredits": credits}
            if trigger == "THRESHOLD":
                variables["thresholdCredits"] = threshold
            else:
                variables["intervalDays"] = 30  # never due within an example
            if cap is not None:
                variables["monthlyLimitCredits"] = cap * credits
            if pick is not None and m.cards:
                pinned = m.cards[pick % len(m.cards)]
                variables |= {"usePrimaryCard": False, "cardId": pinned.gid}
        payload = self.call_and_drain("admin", AUTO_RECHARGE, {"input": variables})
        if pinned is not None and pinned.removed:
            assert _err_codes(payload) == ["NOT_FOUND"], payload
            return
        if enabled and pinned is None and m.primary() is None:
            assert _err_codes(payload) == ["NO_CARD_ON_FILE"], payload
            return
        assert payload["errors"] == [], payload
        m.ar = AutoRechargeM(
            enabled=enabled,
            trigger=trigger if enabled else None,
            threshold=threshold if enabled and trigger == "THRESHOLD" else None,
            credits=credits if enabled else None,
            pinned=pinned.gid if pinned else None,
            cap=cap * credits if enabled and cap is not None else None,
        )
        m.after_debit()  # enabling below the threshold recharges at once

    @rule(copies=st.integers(1, 3))
    def threshold_job(self, copies: int) -> None:
        """The job, delivered ``copies`` times at once (arq redelivery, the sweep)."""
        queue = self.env.queue

        async def go() -> None:
            job = queue.functions["threshold_recharge"]
            await asyncio.gather(*(job(queue.ctx, self.account) for _ in range(copies)))
            await queue.drain()

        self.run(go())
        self.model.threshold_job()

    @rule()
    def sweep(self) -> None:
        queue = self.env.queue

        async def go() -> None:
            await queue.functions["sweep"](queue.ctx)
            await queue.drain()

        self.run(go())
        self.model.threshold_job()  # the sweep finds an account under its threshold

    @precondition(lambda self: self.waits < MAX_WAITS)
    @rule()
    def time_passes(self) -> None:
        self.waits += 1
        self.stack.enter_context(clock.travel(clock.now() + WAIT))
        self.model.ar.blocked = False  # every backoff is over

    # -- retries

    @precondition(lambda self: bool(self.model.keyed))
    @rule(pick=st.integers(0, 100), same=st.booleans(), copies=st.integers(1, 3))
    def retry(self, pick: int, same: bool, copies: int) -> None:
        """The same key again: the same parameters replay the first answer (several at
        once, too); other parameters are refused. Nothing moves either way."""
        first = self.model.keyed[pick % len(self.model.keyed)]
        variables = first.variables if same else first.other

        async def go() -> list[dict[str, Any]]:
            calls = [self.call(first.caller, first.query, variables) for _ in range(copies)]
            payloads = await asyncio.gather(*calls)
            await self.env.queue.drain()
            return list(payloads)

        for payload in self.run(go()):
            if same:
                expected = first.payload
                if first.query is PURCHASE and payload["transaction"] is None:
                    # A purchase replay describes its payment as it stands; without a
                    # credit entry (declined) its balance is the balance now.
                    expected = {**expected, "balance": self.model.balance}
                assert payload == expected, (payload, expected)
            else:
                assert _err_codes(payload) == ["IDEMPOTENCY_KEY_REUSED"], payload

    # -- concurrency

    @rule(
        what=st.sampled_from(["spend", "grant", "purchase"]),
        copies=st.integers(2, 4),
        quantity=st.integers(1, 30),
    )
    def same_key_at_once(self, what: str, copies: int, quantity: int) -> None:
        """One request sent several times at once with one key: it happens once."""
        m = self.model
        if what == "spend":
            variables = self._spend_variables("POSTCARD", quantity)
            query, who = CONSUME, "service"
        elif what == "grant":
            variables = self._staff_variables(quantity * 10)
            query, who = GRANT, "staff"
        else:
            variables = self._purchase_variables(100 + quantity, None)
            query, who = PURCHASE, "admin"

        async def go() -> list[dict[str, Any]]:
            calls = [self.call(who, query, {"input": variables}) for _ in range(copies)]
            payloads = await asyncio.gather(*calls)
            await self.env.queue.drain()
            return list(payloads)

        payloads = self.run(go())
        if what == "spend":
            if self._apply_spend("POSTCARD", quantity, payloads[0]):
                m.after_debit()
                self.remember(
                    "service",
                    query,
                    {"input": variables},
                    payloads[0],
                    {"input": {**variables, "reference": "another"}},
                )
            assert all(p == payloads[0] for p in payloads), payloads
        elif what == "grant":
            m.post("GRANT", quantity * 10)
            m.other_entries.append(payloads[0]["transaction"]["id"])
            m.after_debit()
            assert all(p == payloads[0] for p in payloads), payloads
        else:
            expected, card = self._purchase_expectation(100 + quantity, None)
            if expected != "ok":
                assert all(_err_codes(p) == [expected] for p in payloads), payloads
                return
            assert card is not None
            # A twin that arrived while the first was at the bank sees it PENDING; every
            # answer is the same payment, and it is charged and credited once.
            settled = [p for p in payloads if p["payment"]["status"] != "PENDING"]
            assert settled, payloads
            assert len({p["payment"]["id"] for p in payloads}) == 1, payloads
            assert all(p == settled[0] for p in settled), payloads
            self._apply_purchase(100 + quantity, card, settled[0])

    @rule(
        copies=st.integers(2, 5),
        process=st.sampled_from(list(PREPAID)),
        quantity=st.integers(1, 20),
        grant=st.none() | st.integers(1, 500),
    )
    def spends_at_once(self, copies: int, process: str, quantity: int, grant: int | None) -> None:
        """Several spends at once (and maybe a grant). Concurrent spends never overdraw;
        across the threshold they cause one recharge."""
        m = self.model
        cost = PREPAID[process] * quantity
        fits = cost * copies <= m.balance
        if not fits and m.recharge_could_charge():
            # Over the balance, which spends win would depend on when the recharge lands.
            copies = max(1, m.balance // cost)
            fits = cost * copies <= m.balance
        if m.ar.level() is not None or not fits:
            grant = None  # a grant racing the job (or the spends) would not be determined
        spends = [self._spend_variables(process, quantity) for _ in range(copies)]
        grant_vars = self._staff_variables(grant) if grant else None

        async def go() -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
            calls: list[Awaitable[dict[str, Any]]] = [
                self.call("service", CONSUME, {"input": v}) for v in spends
            ]
            if grant_vars is not None:
                calls.append(self.call("staff", GRANT, {"input": grant_vars}))
            results = await asyncio.gather(*calls)
            await self.env.queue.drain()
            return list(results[:copies]), (results[copies] if grant_vars else None)

        payloads, granted = self.run(go())
        if granted is not None:
            assert granted["errors"] == [], granted
            m.post("GRANT", grant or 0)
            m.other_entries.append(granted["transaction"]["id"])
        ok = [p for p in payloads if p["errors"] == []]
        refused = [p for p in payloads if p["errors"]]
        assert all(_err_codes(p) == ["INSUFFICIENT_CREDITS"] for p in refused), refused
        start = m.balance
        assert len(ok) == min(copies, start // cost), (len(ok), copies, start, cost)
        for p in ok:
            m.post("USAGE", -cost)
            m.usages.append(Usage(p["transaction"]["id"], cost))
        if (
            granted is None and m.ar.level() is None
        ):  # else the grant or a recharge may land between
            assert sorted(p["balance"] for p in ok) == [
                start - cost * (i + 1) for i in reversed(range(len(ok)))
            ]
        if ok:
            m.after_debit()

    # -- the invariants, after every step

    @invariant()
    def matches_the_model(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        m = self.model
        report = await reconcile.check_database([self.account])
        assert report.ok, [d.line() for d in report.discrepancies]
        entries = await LedgerEntry.filter(account_id=self.account)
        assert Counter((e.type.value, e.credits) for e in entries) == m.entries
        assert all(e.balance_after >= 0 for e in entries)
        assert await balance_of(self.account) == m.balance
        payments = await Payment.filter(account_id=self.account)
        assert Counter((p.kind.value, p.status.value, p.credits) for p in payments) == m.payments
        # Every payment reached the bank once, under its own key; nothing else was charged.
        charged = self.env.charges.keys.get(self.account, Counter())
        assert all(n == 1 for n in charged.values()), charged
        assert len(charged) == len(payments), (charged, payments)
        quotas = await FreeQuotaUsage.filter(account_id=self.account)
        assert {q.process_type.value: q.used for q in quotas if q.used} == {
            k: v for k, v in m.quota_used.items() if v
        }
        setting = await AutoRechargeSetting.get_or_none(account_id=self.account)
        if setting is not None:
            assert (setting.paused_reason is not None) == m.ar.paused, setting.paused_reason
            assert setting.consecutive_failures == m.ar.failures


# ---------------------------------------------------------------- the test


@pytest_asyncio.fixture
async def session_loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()


@pytest.mark.timeout(120 if PROFILE is PROFILES["ci"] else 6 * 3600)
def test_ledger_follows_the_model(
    session_loop: asyncio.AbstractEventLoop,
    caller: MakeCaller,
    queue: InProcessQueue,
    gateway: Any,
    gateway_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    charges = ChargeLog(gateway.charge)
    monkeypatch.setattr(gateway, "charge", charges)
    session_loop.run_until_complete(queue.drain())
    stripe = gateway if gateway_name == "stripe" else None

    class Machine(LedgerMachine):
        env = Env(session_loop, caller, queue, charges, stripe)

    run_state_machine_as_test(Machine, settings=PROFILE)
