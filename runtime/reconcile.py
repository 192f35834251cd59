"""Reconciliation from the command line: ``python -m runtime.reconcile`` (``make reconcile``).

Connects to the database (and, with ``PAYMENT_GATEWAY=stripe``, to Stripe) the settings name
and runs ``billing.reconcile``'s checks. Prints one line per discrepancy and exits 1 when there
is any; prints a summary and exits 0 when there is none; exits 2 when a check could not run
(the database or Stripe unreachable, say).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from tortoise import Tortoise

from billing.payments.gateways.stripe_gateway import StripeGateway
from billing.reconcile import Report, check_database, check_stripe, snapshot
from runtime.db import tortoise_config
from runtime.factory import make_gateway
from runtime.settings import get_settings


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m runtime.reconcile",
        description="Check that balances, ledger entries, payments (and Stripe) agree.",
    )
    parser.add_argument(
        "--account",
        action="append",
        dest="accounts",
        metavar="ID",
        help="check only this account (repeat, or comma-separate, for several)",
    )
    parser.add_argument(
        "--no-stripe",
        action="store_true",
        help="skip the Stripe check even with PAYMENT_GATEWAY=stripe",
    )
    parser.add_argument(
        "--stripe-concurrency", type=int, default=8, help="PaymentIntents read at once (default 8)"
    )
    return parser.parse_args(argv)


async def _main(args: argparse.Namespace) -> Report:
    settings = get_settings()
    accounts = (
        [a.strip() for raw in args.accounts for a in raw.split(",") if a.strip()]
        if args.accounts
        else None
    )
    await Tortoise.init(config=tortoise_config(settings.database_url))
    try:
        async with snapshot():
            report = await check_database(accounts)
        if settings.payment_gateway == "stripe" and not args.no_stripe:
            gateway = make_gateway(settings)
            assert isinstance(gateway, StripeGateway)
            await check_stripe(report, gateway, accounts, max(1, args.stripe_concurrency))
        return report
    finally:
        await Tortoise.close_connections()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        report = asyncio.run(_main(args))
    except Exception as exc:  # the database is unreachable, say: no verdict
        print(f"error: could not reconcile: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    for discrepancy in report.discrepancies:
        print(discrepancy.line())
    for error in report.errors:
        print(f"error: {error}", file=sys.stderr)
    print(report.summary(), file=sys.stderr if report.discrepancies else sys.stdout)
    return report.exit_code()


if __name__ == "__main__":
    raise SystemExit(main())
