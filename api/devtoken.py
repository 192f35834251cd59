"""Print a development bearer token: ``python -m api.devtoken --account acme --roles ADMIN``."""

from __future__ import annotations

import argparse
import json
import sys

from api.auth import issue_token
from billing.enums import Role
from runtime.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--account", default="acme", help="account id (claim account_id)")
    parser.add_argument("--user", default="admin-1", help="user id (claim sub)")
    parser.add_argument(
        "--roles",
        default="ADMIN",
        help="comma-separated roles: " + ", ".join(r.value for r in Role),
    )
    parser.add_argument("--email", default=None)
    parser.add_argument("--name", default=None)
    parser.add_argument("--hours", type=float, default=12.0, help="lifetime in hours")
    parser.add_argument(
        "--headers", action="store_true", help="print GraphiQL's Headers JSON instead"
    )
    args = parser.parse_args(argv)
    settings = get_settings()
    if settings.is_production:
        print("refusing to mint tokens with CREDITS_ENV=production", file=sys.stderr)
        return 2
    try:
        roles = [Role(r.strip().upper()) for r in args.roles.split(",") if r.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    token = issue_token(
        settings,
        account_id=args.account,
        user_id=args.user,
        roles=roles,
        email=args.email,
        name=args.name,
        ttl_seconds=int(args.hours * 3600),
    )
    print(json.dumps({"Authorization": f"Bearer {token}"}) if args.headers else token)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
