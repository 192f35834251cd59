"""Bearer-token authentication: signed JWTs from the platform's identity service.

Two ways to sign, never mixed up:
- RS256 against the identity provider's JWKS (``CREDITS_JWKS_URL``): the production way.
- HS256 with the shared secret (``CREDITS_JWT_SECRET``): development, and production
  only when no JWKS is configured.

The token's ``alg`` header picks the path; each path accepts exactly its one algorithm
with its own kind of key (an RSA public key from the JWKS; the secret), so ``alg: none``
and algorithm confusion (an HS256 token "signed" with the RSA public key) are refused.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from billing import emails
from billing.accounts import valid_account_id
from billing.enums import Role
from runtime.settings import Settings

log = logging.getLogger(__name__)

ALGORITHMS = ["HS256"]  # the shared-secret path
JWKS_ALGORITHM = "RS256"  # the JWKS path
LEEWAY_SECONDS = 30
MIN_RSA_BITS = 2048
JWKS_FETCH_TIMEOUT_SECONDS = 5.0
# An unknown ``kid`` refetches the JWKS at most this often: made-up kids can't turn every
# request into a call to the identity provider.
JWKS_REFETCH_COOLDOWN_SECONDS = 10.0


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


def _email(claims: dict[str, object]) -> str | None:
    """The ``email`` claim if it is one valid address (it becomes a mail recipient);
    anything else is dropped (logged), not trusted."""
    raw = claims.get("email")
    if raw is None:
        return None
    address = emails.normalized(raw) if isinstance(raw, str) else None
    if address is None:
        log.info("ignored a token's email claim that is not a valid address")
    return address


def principal_from_claims(claims: dict[str, object]) -> Principal:
    raw_roles = claims.get("roles")
    if not isinstance(raw_roles, list) or not all(isinstance(r, str) for r in raw_roles):
        raise AuthError("token claim 'roles' must be a list of strings")
    known = {r.value for r in Role}
    roles = frozenset(Role(r) for r in raw_roles if r in known)
    sub = _claim_str(claims, "sub", 128, required=True)
    account_id = _claim_str(claims, "account_id", 64, required=True)
    assert sub is not None and account_id is not None
    if not valid_account_id(account_id):
        raise AuthError("token claim 'account_id' is missing or malformed")
    return Principal(
        user_id=sub,
        account_id=account_id,
        roles=roles,
        email=_email(claims),
        name=_claim_str(claims, "name", 200, required=False),
    )


class JwksKeys:
    """The identity provider's RS256 signing keys, held for the process.

    PyJWKClient fetches and parses the key set; this class decides when, so that a JWKS
    outage never takes down requests whose key is known (PyJWKClient's own cache forgets
    the whole set when it expires, and its key cache never forgets a revoked key):

    - a ``kid`` from the last good fetch is served from memory, with no I/O;
    - once the set is older than ``max_age`` it is refreshed in the background while
      requests go on with the keys at hand; a failed refresh keeps the last good set;
    - an unknown ``kid`` refetches at once (a rotation is picked up without a restart),
      at most once per ``cooldown`` seconds; a key the provider removed is refused once
      a fetch no longer lists it;
    - fetches run in a worker thread (PyJWKClient uses blocking urllib), one at a time.
    """

    def __init__(
        self,
        url: str,
        *,
        max_age: float = 300.0,
        cooldown: float = JWKS_REFETCH_COOLDOWN_SECONDS,
        timeout: float = JWKS_FETCH_TIMEOUT_SECONDS,
    ) -> None:
        self.url = url
        self.max_age = max_age
        self.cooldown = cooldown
        self._client = jwt.PyJWKClient(
            url,
            cache_jwk_set=False,  # cached here, see above
            timeout=timeout,
            headers={"User-Agent": "purchase-credits", "Accept": "application/json"},
        )
        self._keys: dict[str, RSAPublicKey] = {}
        self._fetched_at = -math.inf  # monotonic time of the last good fetch
        self._refetched_at = -math.inf  # ... of the last refetch for an unknown kid
        self._retry_at = -math.inf  # after a failed fetch, no background retry before this
        self._inflight: asyncio.Task[None] | None = None

    def cached(self, kid: str) -> RSAPublicKey | None:
        return self._keys.get(kid)

    def known(self, kid: str) -> RSAPublicKey | None:
        """The key named ``kid`` if it is in the set at hand (no I/O); once the set is
        older than ``max_age`` a refresh starts behind the caller (in the event loop)."""
        key = self._keys.get(kid)
        if key is not None:
            now = time.monotonic()
            if now - self._fetched_at > self.max_age and now >= self._retry_at:
                self._start_refresh()  # refresh behind the request
        return key

    async def key(self, kid: str) -> RSAPublicKey:
        """The public key named ``kid``; raises ``AuthError`` when there is none."""
        key = self.known(kid)
        if key is not None:
            return key
        now = time.monotonic()
        if now - self._refetched_at < self.cooldown:
            raise AuthError("unknown signing key")
        had_keys = bool(self._keys)  # the first fetch of the process is not a "refetch"
        try:
            await asyncio.shield(self._start_refresh())
        except Exception as exc:  # the provider is down or sent garbage
            self._refetched_at = now
            raise AuthError("the identity provider's signing keys are unavailable") from exc
        if had_keys:
            self._refetched_at = now
        key = self._keys.get(kid)
        if key is None:
            raise AuthError("unknown signing key")
        return key

    def _start_refresh(self) -> asyncio.Task[None]:
        """One fetch at a time: a refresh already under way is shared."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._fetched)
        return self._inflight

    def _fetched(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._retry_at = time.monotonic() + self.cooldown
            log.warning("JWKS fetch from %s failed (keeping the last good keys): %s", self.url, exc)

    async def _fetch(self) -> None:
        found = await asyncio.to_thread(self._client.get_signing_keys, True)
        keys: dict[str, RSAPublicKey] = {}
        for jwk in found:
            key = jwk.key
            if (
                jwk.key_id
                and jwk.key_type == "RSA"
                and jwk.algorithm_name == JWKS_ALGORITHM
                and isinstance(key, RSAPublicKey)
                and key.key_size >= MIN_RSA_BITS
            ):
                keys[jwk.key_id] = key
            else:
                log.info("JWKS key %r is not an RS256 public signing key: ignored", jwk.key_id)
        if not keys:
            raise jwt.PyJWKClientError("the JWKS holds no usable RS256 signing key")
        self._keys = keys
        self._fetched_at = time.monotonic()


_jwks: dict[tuple[str, float], JwksKeys] = {}


def jwks_keys(settings: Settings) -> JwksKeys | None:
    """The process's key store for the configured JWKS (``None`` without one)."""
    url = settings.credits_jwks_url
    if not url:
        return None
    ident = (url, settings.credits_jwks_cache_seconds)
    store = _jwks.get(ident)
    if store is None:
        store = _jwks[ident] = JwksKeys(url, max_age=settings.credits_jwks_cache_seconds)
    return store


def _header(token: str) -> tuple[str, str | None]:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from exc
    alg, kid = header.get("alg"), header.get("kid")
    if not isinstance(alg, str):
        raise AuthError("token header has no algorithm")
    if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= 256):
        raise AuthError("token header 'kid' is malformed")
    return alg, kid


def _decode(
    token: str, key: Any, algorithm: str, settings: Settings
) -> tuple[Principal, dict[str, Any]]:
    audience, issuer = settings.credits_jwt_audience, settings.credits_jwt_issuer
    required = ["exp", "sub"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=[algorithm],
            audience=audience,
            issuer=issuer,
            options={"require": required, "enforce_minimum_key_length": True},
            leeway=LEEWAY_SECONDS,
        )
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from exc
    return principal_from_claims(claims), claims


def _refuse(alg: str, settings: Settings) -> AuthError:
    accepted = [
        a
        for a, on in (("RS256", bool(settings.credits_jwks_url)), ("HS256", settings.hs256_enabled))
        if on
    ]
    return AuthError(f"token algorithm {alg[:20]!r} is not accepted (only {', '.join(accepted)})")


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token whose signature and claims were verified, and what it was verified with."""

    principal: Principal
    expires_at: float  # its ``exp``
    alg: str
    kid: str | None
    key: object  # the RSA public key, or the shared secret
    audience: str | None
    issuer: str | None


#: Tokens verified, by their text (a bounded LRU): a client sends the same token with
#: every request until it expires, and a signature check costs more than the rest of a
#: small request's authentication.
TOKEN_CACHE_SIZE = 4096
_verified: OrderedDict[str, _Verified] = OrderedDict()


def _key_for(alg: str, kid: str | None, settings: Settings, *, refresh: bool) -> object | None:
    """The key a token with this header is verified with now (None: it is refused).
    With ``refresh``, a JWKS older than its ``max_age`` is refreshed behind the caller,
    as a verification would (so a key the provider removed stops being accepted)."""
    store = jwks_keys(settings)
    if alg == JWKS_ALGORITHM and store is not None:
        if kid is None:
            return None
        return store.known(kid) if refresh else store.cached(kid)
    if alg == "HS256" and settings.hs256_enabled:
        return settings.jwt_secret
    return None


def _remembered(token: str, settings: Settings, *, refresh: bool = True) -> Principal | None:
    """The principal of a token verified before, if nothing it was verified against has
    changed since: it has not expired (with the same leeway), the key that verified it is
    still the one its header names (a key the JWKS no longer lists, a new shared secret:
    verified again, so refused), the audience and the issuer asked for are the same."""
    hit = _verified.get(token)
    if hit is None:
        return None
    fresh = time.time() < hit.expires_at + LEEWAY_SECONDS
    key = _key_for(hit.alg, hit.kid, settings, refresh=refresh) if fresh else None
    if (
        key is None
        or not (key is hit.key or key == hit.key)
        or hit.audience != settings.credits_jwt_audience
        or hit.issuer != settings.credits_jwt_issuer
    ):
        del _verified[token]
        return None
    _verified.move_to_end(token)
    return hit.principal


def _remember(token: str, alg: str, kid: str | None, key: object, settings: Settings) -> Principal:
    principal, claims = _decode(token, key, alg, settings)
    exp = claims.get("exp")
    if isinstance(exp, int | float):  # required: always
        _verified[token] = _Verified(
            principal,
            float(exp),
            alg,
            kid,
            key,
            settings.credits_jwt_audience,
            settings.credits_jwt_issuer,
        )
        if len(_verified) > TOKEN_CACHE_SIZE:
            _verified.popitem(last=False)
    return principal


def forget_verified_tokens() -> None:
    _verified.clear()


async def authenticate(token: str, settings: Settings) -> Principal:
    """Verify signature, expiry and (when configured) audience and issuer; return who is
    calling. Raises ``AuthError`` (HTTP 401). May fetch the JWKS, off the event loop.
    A token verified before is not verified again while it is valid (``_remembered``)."""
    known = _remembered(token, settings)
    if known is not None:
        return known
    alg, kid = _header(token)
    store = jwks_keys(settings)
    if alg == JWKS_ALGORITHM and store is not None:
        if kid is None:
            raise AuthError("token header has no 'kid'")
        return _remember(token, alg, kid, await store.key(kid), settings)
    if alg == "HS256" and settings.hs256_enabled:
        return _remember(token, alg, kid, settings.jwt_secret, settings)
    raise _refuse(alg, settings)


def verify_token(token: str, settings: Settings) -> Principal:
    """``authenticate`` for code that can't await: HS256, and RS256 only with a key that
    is already cached (it never fetches the JWKS). Prefer ``authenticate``."""
    known = _remembered(token, settings, refresh=False)
    if known is not None:
        return known
    alg, kid = _header(token)
    store = jwks_keys(settings)
    if alg == JWKS_ALGORITHM and store is not None:
        key = store.cached(kid) if kid is not None else None
        if key is None:
            raise AuthError("unknown signing key")
        return _remember(token, alg, kid, key, settings)
    if alg == "HS256" and settings.hs256_enabled:
        return _remember(token, alg, kid, settings.jwt_secret, settings)
    raise _refuse(alg, settings)


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
    if settings.credits_jwt_audience:
        claims["aud"] = settings.credits_jwt_audience
    if settings.credits_jwt_issuer:
        claims["iss"] = settings.credits_jwt_issuer
    return jwt.encode(claims, settings.jwt_secret, algorithm="HS256")
