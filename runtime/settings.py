"""Configuration from environment variables, validated once at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import billing

DEV_JWT_SECRET = "development-only-secret-change-me-0123456789"
MIN_SECRET_BYTES = 32


class Settings(BaseSettings):
    """Every setting of the service; read from the environment (and ``.env`` if present)."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    credits_env: Literal["development", "production"] = "development"
    database_url: str = "sqlite://var/credits.sqlite3"
    redis_url: str = "redis://127.0.0.1:6379/0"
    credits_jwt_secret: SecretStr | None = None
    payment_gateway: Literal["sandbox", "stripe"] = "sandbox"
    stripe_api_key: SecretStr | None = None
    stripe_webhook_secret: SecretStr | None = None
    stripe_api_base: str | None = None
    # The billing page (GET /billing): Stripe Elements under the stripe gateway needs the
    # publishable key; Stripe.js loads from Stripe (STRIPE_JS_URL only for a test stand-in).
    stripe_publishable_key: str | None = None
    stripe_js_url: str | None = None
    support_contact: str = "accounting@leadliaison.com"  # whom the page says to ask
    page_frame_ancestors: str | None = None  # origins that may embed the page (CSP)
    job_queue: Literal["inprocess", "arq"] = "inprocess"
    periodic_seconds: float = 60.0  # in-process cron (embedded default); 0 turns it off
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    price_book_path: Path = Path(billing.__file__).with_name("pricebook.toml")
    graphiql_enabled: bool | None = None
    graphql_introspection: bool | None = None  # None: on in development, off in production
    credits_jwks_url: str | None = None  # the identity provider's JWKS (RS256 tokens)
    credits_jwks_cache_seconds: float = Field(default=300.0, ge=1, le=86_400)
    credits_jwt_audience: str | None = None  # when set, tokens must carry this `aud`
    credits_jwt_issuer: str | None = None  # when set, tokens must carry this `iss`
    log_level: str = "INFO"
    # JSON lines with the request id; "auto": readable lines when stderr is a terminal
    log_format: Literal["json", "text", "auto"] = "auto"
    readiness_timeout_seconds: float = Field(default=2.0, gt=0, le=60)  # per /readyz check
    shutdown_grace_seconds: int = Field(default=30, ge=0, le=3600)  # finish in-flight work
    # POST /graphql bodies larger than this are refused with 413 (never read in full).
    max_body_bytes: int = Field(default=1_000_000, ge=1_024, le=100_000_000)
    # Every GraphQL query or mutation (HTTP or websocket) is stopped after this long.
    operation_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # GraphQL's "Did you mean …?" hints (None: on in development, off in production).
    graphql_suggestions: bool | None = None
    # A request's line and headers larger than this are refused (uvicorn's h11).
    max_header_bytes: int = Field(default=32_768, ge=4_096, le=1_048_576)
    # A request's line and headers not received within this long: the connection is closed.
    header_timeout_seconds: float = Field(default=10.0, gt=0, le=300)
    # A keep-alive connection idle this long is closed.
    keep_alive_seconds: float = Field(default=5.0, gt=0, le=300)
    # A request body not received in full within this long is refused with 408.
    body_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # GET /metrics needs this bearer token when set; in production without it, /metrics
    # is not served on the public listener at all.
    metrics_token: SecretStr | None = None
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)  # arq /metrics
    smtp_url: str | None = None  # None: e-mails are written to the log (runtime.mailer)
    mail_from: str = "Purchase Credits <credits@localhost>"

    @model_validator(mode="after")
    def _check_secret(self) -> Settings:
        secret = self.credits_jwt_secret
        if secret is None:
            if self.credits_env == "production":
                if not self.credits_jwks_url:
                    raise ValueError(
                        "CREDITS_JWKS_URL (RS256) or CREDITS_JWT_SECRET (HS256) is required "
                        "when CREDITS_ENV=production"
                    )
            else:
                self.credits_jwt_secret = SecretStr(DEV_JWT_SECRET)
        elif len(secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"CREDITS_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        elif self.credits_env == "production" and secret.get_secret_value() == DEV_JWT_SECRET:
            raise ValueError("the development JWT secret cannot be used in production")
        return self

    @model_validator(mode="after")
    def _check_jwks(self) -> Settings:
        self.credits_jwt_audience = self.credits_jwt_audience or None  # empty: not checked
        self.credits_jwt_issuer = self.credits_jwt_issuer or None
        url = self.credits_jwks_url
        if not url:
            self.credits_jwks_url = None
            return self
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("CREDITS_JWKS_URL must be an http(s) URL")
        loopback = parts.hostname in ("localhost", "127.0.0.1", "::1")
        if self.is_production and parts.scheme != "https" and not loopback:
            raise ValueError("CREDITS_JWKS_URL must use https when CREDITS_ENV=production")
        return self

    @model_validator(mode="after")
    def _check_gateway(self) -> Settings:
        if self.payment_gateway == "stripe":
            missing = [
                name
                for name, value in (
                    ("STRIPE_API_KEY", self.stripe_api_key),
                    ("STRIPE_WEBHOOK_SECRET", self.stripe_webhook_secret),
                )
                if value is None or not value.get_secret_value()
            ]
            if missing:
                raise ValueError(f"PAYMENT_GATEWAY=stripe needs {' and '.join(missing)}")
        elif self.is_production:
            raise ValueError("PAYMENT_GATEWAY=sandbox is not allowed with CREDITS_ENV=production")
        return self

    @property
    def jwt_secret(self) -> str:
        assert self.credits_jwt_secret is not None
        return self.credits_jwt_secret.get_secret_value()

    @property
    def hs256_enabled(self) -> bool:
        """HS256 tokens (the shared secret) are accepted: always in development, and in
        production only when no JWKS is configured (then RS256 alone is accepted)."""
        return self.credits_jwt_secret is not None and not (
            self.is_production and self.credits_jwks_url
        )

    @property
    def introspection_enabled(self) -> bool:
        if self.graphql_introspection is not None:
            return self.graphql_introspection
        return not self.is_production

    @property
    def suggestions_enabled(self) -> bool:
        if self.graphql_suggestions is not None:
            return self.graphql_suggestions
        return not self.is_production

    @property
    def is_production(self) -> bool:
        return self.credits_env == "production"

    @property
    def show_graphiql(self) -> bool:
        if self.graphiql_enabled is not None:
            return self.graphiql_enabled
        return not self.is_production


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
