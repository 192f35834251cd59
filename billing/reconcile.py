"""Reconciliation: does the money add up? The checks; ``python -m runtime.reconcile``
(``make reconcile``) runs them from the command line.

Checks, for every account (or the ``--account`` ones):

- ``balance``: the stored balance equals the sum of the account's ledger entries;
- ``chain``: each entry's ``balance_after`` is the previous entry's plus its credits
  (entries are ordered by ``created_at``; entries sharing a timestamp may come in any
  order that chains);
- ``payment-entry``: every succeeded card payment that grants credits (kinds ``PURCHASE``
  and ``AUTO_RECHARGE``; refunded ones included) has exactly one credit entry;
- ``entry-payment``: every credit entry from a card (types ``PURCHASE`` and
  ``AUTO_RECHARGE``) has its payment: succeeded, of the same account, kind and credits;
- ``refund``: a refunded payment's REFUND entries take no more than the refunded share;
- ``idempotency``: no spend's key is left claimed by a spend that never happened (a
  refused spend whose withdrawal was lost, see ``billing.idempotency``);
- ``flagged``: accounts flagged because a gateway object contradicted their payment;
  ``gateway-event``: events that did not match our payment, or still pending after a day;
- ``stripe`` (with ``PAYMENT_GATEWAY=stripe``): each payment Stripe knows of is a
  PaymentIntent whose status, amount, currency, customer and refunded amount agree.

The database checks are a handful of set-based queries (``GROUP BY`` and window
functions), whatever the number of accounts; only an account whose chain looks broken is
read entry by entry, to tell a real break from entries that share a timestamp. On
PostgreSQL they read one snapshot (``REPEATABLE READ``), so work committed meanwhile
can't show up as a false discrepancy.

A ``Report`` holds the discrepancies and the errors (a check that could not run: Stripe
unreachable, say) and the command's exit code for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tortoise.transactions import in_transaction

from billing import idempotency, sql
from billing.enums import PaymentKind, PaymentStatus, TransactionType
from billing.payments.gateways import GatewayUnavailable
from billing.payments.gateways.stripe_gateway import StripeGateway
from billing.settlement.booking import REPORTED_FLAGS

CREDIT_KINDS = (PaymentKind.PURCHASE.value, PaymentKind.AUTO_RECHARGE.value)
CREDIT_TYPES = (TransactionType.PURCHASE.value, TransactionType.AUTO_RECHARGE.value)
# A refunded payment had succeeded: its credits were granted (the refund takes them back).
GRANTED = (PaymentStatus.SUCCEEDED.value, PaymentStatus.REFUNDED.value)
CHAIN_CHUNK = 5_000
STRIPE_PAGE = 200
MAX_BREAKS_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Discrepancy:
    check: str
    account_id: str
    detail: str

    def line(self) -> str:
        return f"{self.check}: account {self.account_id}: {self.detail}"


@dataclass
class Report:
    accounts: int = 0
    entries: int = 0
    card_payments: int = 0
    stripe_checked: int | None = None  # None: the Stripe check did not run
    discrepancies: list[Discrepancy] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # checks that could not be made

    @property
    def ok(self) -> bool:
        return not self.discrepancies and not self.errors

    def add(self, check: str, account_id: object, detail: str) -> None:
        self.discrepancies.append(Discrepancy(check, str(account_id), detail))

    def summary(self) -> str:
        stripe = (
            "Stripe not checked"
            if self.stripe_checked is None
            else f"{self.stripe_checked} payments checked at Stripe"
        )
        verdict = (
            "no discrepancies"
            if not self.discrepancies
            else f"{len(self.discrepancies)} discrepancies"
        )
        return (
            f"reconciled {self.accounts} accounts, {self.entries} ledger entries, "
            f"{self.card_payments} succeeded card payments; {stripe}: {verdict}"
        )

    def exit_code(self) -> int:
        if self.discrepancies:
            return 1
        return 2 if self.errors else 0


def _scope(column: str, account_ids: Sequence[str] | None) -> tuple[str, list[Any]]:
    """``column IN (...)`` for the given accounts, or no condition."""
    if account_ids is None:
        return "1 = 1", []
    if not account_ids:
        return "1 = 0", []
    return f"{column} IN ({', '.join('?' * len(account_ids))})", list(account_ids)


def _in(values: Sequence[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)  # our own enum values, never input


async def _count(query: str, params: list[Any]) -> int:
    rows = await sql.fetch(query, *params)
    return int(rows[0]["n"] or 0) if rows else 0


# ---------------------------------------------------------------- the database


async def _counts(report: Report, account_ids: Sequence[str] | None) -> None:
    where_a, pa = _scope("id", account_ids)
    where_e, pe = _scope("account_id", account_ids)
    report.accounts = await _count(f"SELECT COUNT(*) AS n FROM credit_account WHERE {where_a}", pa)
    report.entries = await _count(f"SELECT COUNT(*) AS n FROM ledger_entry WHERE {where_e}", pe)
    report.card_payments = await _count(
        f"SELECT COUNT(*) AS n FROM payment WHERE {where_e} "
        f"AND kind IN ({_in(CREDIT_KINDS)}) AND status IN ({_in(GRANTED)})",
        pe,
    )


async def _balances(report: Report, account_ids: Sequence[str] | None) -> None:
    where_a, pa = _scope("a.id", account_ids)
    where_e, pe = _scope("account_id", account_ids)
    rows = await sql.fetch(
        "SELECT a.id AS account_id, a.balance AS balance, COALESCE(s.total, 0) AS total, "
        "COALESCE(s.n, 0) AS n "
        "FROM credit_account a LEFT JOIN ("
        "  SELECT account_id, SUM(credits) AS total, COUNT(*) AS n FROM ledger_entry "
        f"  WHERE {where_e} GROUP BY account_id"
        f") s ON s.account_id = a.id WHERE {where_a} AND a.balance <> COALESCE(s.total, 0) "
        "ORDER BY a.id",
        *pe,
        *pa,
    )
    for r in rows:
        report.add(
            "balance",
            r["account_id"],
            f"stored balance {int(r['balance'])} but its {int(r['n'])} entries sum to "
            f"{int(r['total'])} (off by {int(r['balance']) - int(r['total'])})",
        )


async def _suspect_chains(account_ids: Sequence[str] | None) -> list[str]:
    """Accounts where, in (created_at, id) order, some entry doesn't chain."""
    where_e, pe = _scope("account_id", account_ids)
    rows = await sql.fetch(
        "SELECT account_id FROM ("
        "  SELECT account_id, credits, balance_after, "
        "    LAG(balance_after, 1, 0) OVER (PARTITION BY account_id ORDER BY created_at, id) "
        "      AS before"
        f"  FROM ledger_entry WHERE {where_e}"
        ") chained WHERE balance_after <> before + credits GROUP BY account_id ORDER BY account_id",
        *pe,
    )
    return [str(r["account_id"]) for r in rows]


async def _entries_in_time_order(account_id: str) -> AsyncIterator[list[dict[str, Any]]]:
    """The account's entries oldest first, in chunks (keyset over (created_at, id))."""
    after: tuple[Any, Any] | None = None
    while True:
        if after is None:
            rows = await sql.fetch(
                "SELECT id, created_at, credits, balance_after FROM ledger_entry "
                "WHERE account_id = ? ORDER BY created_at, id LIMIT ?",
                account_id,
                CHAIN_CHUNK,
            )
        else:
            rows = await sql.fetch(
                "SELECT id, created_at, credits, balance_after FROM ledger_entry "
                "WHERE account_id = ? AND (created_at > ? OR (created_at = ? AND id > ?)) "
                "ORDER BY created_at, id LIMIT ?",
                account_id,
                after[0],
                after[0],
                after[1],
                CHAIN_CHUNK,
            )
        if rows:
            yield rows
        if len(rows) < CHAIN_CHUNK:
            return
        after = (rows[-1]["created_at"], rows[-1]["id"])


def _chain_group(balance: int, group: list[dict[str, Any]], breaks: list[str]) -> int:
    """Follow the chain through entries sharing one timestamp, in whatever order chains;
    returns the balance after them. A break resumes from the breaking entry's own
    ``balance_after``, so one bad entry is reported once, not with everything after it."""
    remaining = list(group)
    while remaining:
        follows = next(
            (e for e in remaining if int(e["balance_after"]) - int(e["credits"]) == balance),
            None,
        )
        if follows is None:
            follows = remaining[0]
            breaks.append(
                f"entry {follows['id']} at {follows['created_at']}: balance_after "
                f"{int(follows['balance_after'])} but the balance before it was {balance} "
                f"and it moved {int(follows['credits'])} credits"
            )
        balance = int(follows["balance_after"])
        remaining.remove(follows)
    return balance


async def _chain(report: Report, account_id: str) -> None:
    breaks: list[str] = []
    balance = 0
    group: list[dict[str, Any]] = []
    async for rows in _entries_in_time_order(account_id):
        for row in rows:
            if group and row["created_at"] != group[0]["created_at"]:
                balance = _chain_group(balance, group, breaks)
                group = []
            group.append(row)
    if group:
        _chain_group(balance, group, breaks)
    for detail in breaks[:MAX_BREAKS_SHOWN]:
        report.add("chain", account_id, detail)
    if len(breaks) > MAX_BREAKS_SHOWN:
        report.add("chain", account_id, f"... and {len(breaks) - MAX_BREAKS_SHOWN} more breaks")


async def _payments_without_one_entry(report: Report, account_ids: Sequence[str] | None) -> None:
    where_p, pp = _scope("p.account_id", account_ids)
    where_e, pe = _scope("account_id", account_ids)
    rows = await sql.fetch(
        "SELECT p.id AS payment_id, p.account_id AS account_id, p.kind AS kind, "
        "p.status AS status, p.credits AS credits, COALESCE(c.n, 0) AS n "
        "FROM payment p LEFT JOIN ("
        "  SELECT payment_id, COUNT(*) AS n FROM ledger_entry "
        f"  WHERE type IN ({_in(CREDIT_TYPES)}) AND payment_id IS NOT NULL AND {where_e} "
        "  GROUP BY payment_id"
        ") c ON c.payment_id = p.id "
        f"WHERE {where_p} AND p.kind IN ({_in(CREDIT_KINDS)}) AND p.status IN ({_in(GRANTED)}) "
        "AND COALESCE(c.n, 0) <> 1 "
        # Paid, not credited (the credits could not be held), and refunded in full: the
        # money went back, nothing is owed either way.
        "AND NOT (COALESCE(c.n, 0) = 0 AND p.refunded_cents >= p.amount_cents) "
        "ORDER BY p.account_id, p.id",
        *pe,
        *pp,
    )
    for r in rows:
        n = int(r["n"])
        what = "no credit entry" if n == 0 else f"{n} credit entries"
        report.add(
            "payment-entry",
            r["account_id"],
            f"{r['status']} {r['kind']} payment {r['payment_id']} of {int(r['credits'])} "
            f"credits has {what} (expected exactly one)",
        )


async def _entries_without_payment(report: Report, account_ids: Sequence[str] | None) -> None:
    where_e, pe = _scope("e.account_id", account_ids)
    rows = await sql.fetch(
        "SELECT e.id AS entry_id, e.account_id AS account_id, e.type AS type, "
        "e.credits AS credits, e.payment_id AS payment_id, p.id AS found, "
        "p.account_id AS payment_account, p.status AS status, p.kind AS kind, "
        "p.credits AS payment_credits "
        "FROM ledger_entry e LEFT JOIN payment p ON p.id = e.payment_id "
        f"WHERE {where_e} AND e.type IN ({_in(CREDIT_TYPES)}) AND ("
        f"  p.id IS NULL OR p.status NOT IN ({_in(GRANTED)}) OR p.account_id <> e.account_id "
        "  OR p.kind <> e.type OR p.credits <> e.credits"
        ") ORDER BY e.account_id, e.id",
        *pe,
    )
    for r in rows:
        head = f"{r['type']} entry {r['entry_id']} of {int(r['credits'])} credits"
        if r["payment_id"] is None:
            problem = "has no payment"
        elif r["found"] is None:
            problem = f"names payment {r['payment_id']}, which does not exist"
        elif r["payment_account"] != r["account_id"]:
            problem = f"names payment {r['payment_id']} of account {r['payment_account']}"
        elif r["status"] not in GRANTED:
            problem = f"names payment {r['payment_id']}, which is {r['status']}"
        elif r["kind"] != r["type"]:
            problem = f"names payment {r['payment_id']}, a {r['kind']} payment"
        else:
            problem = f"names payment {r['payment_id']} of {int(r['payment_credits'])} credits"
        report.add("entry-payment", r["account_id"], f"{head} {problem}")


async def check_database(account_ids: Sequence[str] | None = None) -> Report:
    """Every database check (in the caller's transaction, if any)."""
    report = Report()
    await _counts(report, account_ids)
    await _balances(report, account_ids)
    for account_id in await _suspect_chains(account_ids):
        await _chain(report, account_id)
    await _payments_without_one_entry(report, account_ids)
    await _entries_without_payment(report, account_ids)
    await _refund_entries(report, account_ids)
    for account_id, key in await idempotency.orphaned(list(account_ids) if account_ids else None):
        report.add(
            "idempotency",
            account_id,
            f"key {key!r} is claimed by a spend that never happened (its withdrawal was "
            "lost; the next request with the key withdraws it)",
        )
    await _flagged(report, account_ids)
    if account_ids is None:
        await _gateway_events(report)
    return report


async def _refund_entries(report: Report, account_ids: Sequence[str] | None) -> None:
    """A refunded payment's ``REFUND`` entries take at most the refunded share of the
    credits it granted (less, and the account is flagged, when the balance was short)."""
    where_p, pp = _scope("p.account_id", account_ids)
    rows = await sql.fetch(
        "SELECT p.id AS payment_id, p.account_id AS account_id, p.amount_cents AS amount, "
        "p.refunded_cents AS refunded, "
        "COALESCE((SELECT SUM(e.credits) FROM ledger_entry e WHERE e.payment_id = p.id "
        f"  AND e.type IN ({_in(CREDIT_TYPES)})), 0) AS credited, "
        "COALESCE((SELECT -SUM(e.credits) FROM ledger_entry e WHERE e.payment_id = p.id "
        f"  AND e.type = '{TransactionType.REFUND.value}'), 0) AS taken "
        f"FROM payment p WHERE {where_p} AND p.kind IN ({_in(CREDIT_KINDS)}) "
        "AND (p.refunded_cents > 0 OR EXISTS (SELECT 1 FROM ledger_entry r "
        f"  WHERE r.payment_id = p.id AND r.type = '{TransactionType.REFUND.value}')) "
        "ORDER BY p.account_id, p.id",
        *pp,
    )
    for r in rows:
        share = int(r["credited"]) * int(r["refunded"]) // int(r["amount"])
        if int(r["taken"]) > share:
            report.add(
                "refund",
                r["account_id"],
                f"payment {r['payment_id']} refunded {int(r['refunded'])} of "
                f"{int(r['amount'])} cents: its REFUND entries take {int(r['taken'])} credits, "
                f"more than the refunded share ({share}) of the {int(r['credited'])} granted",
            )


#: A gateway event still waiting this long for the state it needs is reported.
PENDING_EVENT_AGE = timedelta(days=1)


async def _flagged(report: Report, account_ids: Sequence[str] | None) -> None:
    """Accounts flagged because a gateway object contradicted one of their payments (seen by
    a confirm, a run or the sweep; a webhook's is also a ``gateway-event`` line), or because
    an invoice was paid twice."""
    where_a, pa = _scope("id", account_ids)
    likes = " OR ".join("flag_reason LIKE ?" for _ in REPORTED_FLAGS)
    rows = await sql.fetch(
        f"SELECT id, flag_reason FROM credit_account WHERE {where_a} AND ({likes}) ORDER BY id",
        *pa,
        *[f"%{prefix}%" for prefix in REPORTED_FLAGS],
    )
    for r in rows:
        report.add("flagged", r["id"], str(r["flag_reason"]))


async def _gateway_events(report: Report) -> None:
    """Events that contradicted our payments, and events pending for over a day."""
    rows = await sql.fetch(
        "SELECT external_id, type, outcome, last_error, received_at FROM gateway_event "
        "WHERE outcome = ? OR (processed_at IS NULL AND received_at < ?) ORDER BY id",
        "mismatch",
        sql.now() - PENDING_EVENT_AGE,
    )
    for r in rows:
        state = "does not match" if r["outcome"] == "mismatch" else "still pending"
        report.add(
            "gateway-event",
            "-",
            f"event {r['external_id']} ({r['type']}) {state}: {r['last_error'] or ''}".rstrip(),
        )


# ---------------------------------------------------------------- Stripe


async def _gateway_payments(
    account_ids: Sequence[str] | None,
) -> AsyncIterator[list[dict[str, Any]]]:
    """Our payments the gateway knows of (a gateway reference), and succeeded ones (which
    must have one), a page at a time (keyset over id)."""
    where_p, pp = _scope("p.account_id", account_ids)
    base = (
        "SELECT p.id AS id, p.account_id AS account_id, p.kind AS kind, p.status AS status, "
        "p.amount_cents AS amount_cents, p.currency AS currency, "
        "p.refunded_cents AS refunded_cents, p.gateway_payment_id AS gateway_payment_id, "
        "a.gateway_customer_id AS customer_id, "
        "(SELECT COUNT(*) FROM ledger_entry d WHERE d.payment_id = p.id "
        "  AND d.reference LIKE 'dispute:%') AS dispute_entries "
        "FROM payment p JOIN credit_account a ON a.id = p.account_id "
        f"WHERE {where_p} AND (p.status IN ({_in(GRANTED)}) OR p.gateway_payment_id IS NOT NULL)"
    )
    after: Any = None
    while True:
        if after is None:
            rows = await sql.fetch(f"{base} ORDER BY p.id LIMIT ?", *pp, STRIPE_PAGE)
        else:
            rows = await sql.fetch(
                f"{base} AND p.id > ? ORDER BY p.id LIMIT ?", *pp, after, STRIPE_PAGE
            )
        if rows:
            yield rows
        if len(rows) < STRIPE_PAGE:
            return
        after = rows[-1]["id"]


def _ref(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("id")
    return str(value) if value else None


def _status_problems(payment: dict[str, Any], intent: dict[str, Any]) -> list[str]:
    granted = payment["status"] in GRANTED
    at_stripe = intent.get("status")
    if granted and at_stripe != "succeeded":
        return [f"Stripe says {at_stripe}"]
    if not granted and at_stripe == "succeeded":
        return [f"{payment['status']} here but Stripe says succeeded"]
    return []


def _charge_problems(payment: dict[str, Any], charge: Any) -> list[str]:
    """How the PaymentIntent's latest charge (expanded) differs: a dispute, a refund."""
    if not isinstance(charge, dict):
        return []
    problems = []
    if charge.get("disputed") and not payment["dispute_entries"]:
        problems.append("disputed at Stripe, no dispute booked here")
    if charge.get("amount_refunded") is not None:
        refunded = int(charge["amount_refunded"])
        if refunded != int(payment["refunded_cents"] or 0):
            problems.append(
                f"refunded {int(payment['refunded_cents'] or 0)} here, {refunded} at Stripe"
            )
    return problems


def _intent_problems(payment: dict[str, Any], intent: dict[str, Any]) -> list[str]:
    """How Stripe's PaymentIntent (``latest_charge`` expanded) differs from our payment."""
    problems = _status_problems(payment, intent)
    if int(intent.get("amount") or 0) != int(payment["amount_cents"]):
        problems.append(
            f"amount {int(payment['amount_cents'])} here, {intent.get('amount')} at Stripe"
        )
    if str(intent.get("currency") or "").lower() != str(payment["currency"]).lower():
        problems.append(f"currency {payment['currency']} here, {intent.get('currency')} at Stripe")
    customer = _ref(intent.get("customer"))
    if customer and payment["customer_id"] and customer != payment["customer_id"]:
        problems.append(f"customer {payment['customer_id']} here, {customer} at Stripe")
    return problems + _charge_problems(payment, intent.get("latest_charge"))


async def _check_intent(
    report: Report, gateway: StripeGateway, payment: dict[str, Any], limit: asyncio.Semaphore
) -> None:
    what = f"{payment['status']} {payment['kind']} payment {payment['id']}"
    intent_id = payment["gateway_payment_id"]
    if not intent_id:
        report.add("stripe", payment["account_id"], f"{what} has no PaymentIntent id")
        return
    try:
        async with limit:
            intent = await gateway.retrieve_intent(str(intent_id))
    except GatewayUnavailable as exc:
        report.errors.append(f"stripe: could not read PaymentIntent {intent_id}: {exc}")
        return
    if intent is None:
        if payment["status"] in GRANTED:
            report.add(
                "stripe", payment["account_id"], f"{what}: Stripe has no PaymentIntent {intent_id}"
            )
        return
    problems = _intent_problems(payment, intent)
    if problems:
        report.add(
            "stripe",
            payment["account_id"],
            f"{what} (PaymentIntent {intent_id}): " + "; ".join(problems),
        )


async def check_stripe(
    report: Report,
    gateway: StripeGateway,
    account_ids: Sequence[str] | None = None,
    concurrency: int = 8,
) -> None:
    """Compare every payment Stripe knows of with its PaymentIntent at Stripe: status (a
    payment FAILED here that succeeded there, or the reverse), amount, currency, customer,
    refunded amount."""
    limit = asyncio.Semaphore(concurrency)
    report.stripe_checked = 0
    async for page in _gateway_payments(account_ids):
        await asyncio.gather(*(_check_intent(report, gateway, p, limit) for p in page))
        report.stripe_checked += len(page)


async def run(
    account_ids: Sequence[str] | None = None, stripe: StripeGateway | None = None
) -> Report:
    """Every check: the database's, then (given a Stripe gateway) Stripe's."""
    report = await check_database(account_ids)
    if stripe is not None:
        await check_stripe(report, stripe, account_ids)
    return report


@asynccontextmanager
async def snapshot() -> AsyncIterator[None]:
    """One consistent view for all the database checks (PostgreSQL)."""
    if not sql.is_postgres(sql.connection()):
        yield  # SQLite: a long read transaction would hold up writers; run it when idle
        return
    async with in_transaction():
        await sql.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        yield
