"""Configuration from environment variables, validated once at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

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
    job_queue: Literal["inprocess", "arq"] = "inprocess"
    periodic_seconds: float = 60.0  # in-process cron (embedded default); 0 turns it off
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    price_book_path: Path = Path(__file__).with_name("pricebook.toml")
    graphiql_enabled: bool | None = None
    log_level: str = "INFO"
    smtp_url: str | None = None  # None: e-mails are written to the log (billing.mailer)
    mail_from: str = "Purchase Credits <credits@localhost>"

    @model_validator(mode="after")
    def _check_secret(self) -> Settings:
        secret = self.credits_jwt_secret
        if secret is None:
            if self.credits_env == "production":
                raise ValueError("CREDITS_JWT_SECRET is required when CREDITS_ENV=production")
            self.credits_jwt_secret = SecretStr(DEV_JWT_SECRET)
        elif len(secret.get_secret_value().encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"CREDITS_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        elif self.credits_env == "production" and secret.get_secret_value() == DEV_JWT_SECRET:
            raise ValueError("the development JWT secret cannot be used in production")
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
