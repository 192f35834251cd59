"""Bearer-token authentication: signed JWTs from the platform's identity service."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import jwt

from billing.enums import Role
from billing.settings import Settings

ALGORITHMS = ["HS256"]
LEEWAY_SECONDS = 30


class AuthError(Exception):
    """The request carries no valid token (HTTP 401)."""


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    account_id: str
    roles: frozenset[Role]
    email: str | None = None
    name: str | None = None

    def has(self, *roles: Role) -> bool:
        return any(role in self.roles for role in roles)


def _claim_str(claims: dict[str, object], name: str, limit: int, *, required: bool) -> str | None:
    value = claims.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise AuthError(f"token claim {name!r} is missing or malformed")
    return value


def principal_from_claims(claims: dict[str, object]) -> Principal:
    raw_roles = claims.get("roles")
    if not isinstance(raw_roles, list) or not all(isinstance(r, str) for r in raw_roles):
        raise AuthError("token claim 'roles' must be a list of strings")
    known = {r.value for r in Role}
    roles = frozenset(Role(r) for r in raw_roles if r in known)
    sub = _claim_str(claims, "sub", 128, required=True)
    account_id = _claim_str(claims, "account_id", 64, required=True)
    assert sub is not None and account_id is not None
    return Principal(
        user_id=sub,
        account_id=account_id,
        roles=roles,
        email=_claim_str(claims, "email", 320, required=False),
        name=_claim_str(claims, "name", 200, required=False),
    )


def verify_token(token: str, settings: Settings) -> Principal:
    """Verify signature and expiry; return who is calling. Raises ``AuthError``."""
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=ALGORITHMS,
            options={"require": ["exp", "sub"]},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from exc
    return principal_from_claims(claims)


def bearer_token(header: str | None) -> str:
    if not header:
        raise AuthError("missing Authorization header")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization must be 'Bearer <token>'")
    return token.strip()


def issue_token(
    settings: Settings,
    *,
    account_id: str,
    user_id: str,
    roles: Iterable[Role | str],
    email: str | None = None,
    name: str | None = None,
    ttl_seconds: int = 12 * 3600,
) -> str:
    """Sign a development token (HS256 with the configured secret)."""
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": user_id,
        "account_id": account_id,
        "roles": [Role(r).value for r in roles],
        "iat": now,
        "exp": now + ttl_seconds,
    }
    if email:
        claims["email"] = email
    if name:
        claims["name"] = name
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
