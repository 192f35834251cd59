"""The arq worker: ``python -m workers`` (or ``arq workers.settings.WorkerSettings``)."""

from __future__ import annotations

from typing import Any

from arq import cron, func
from arq.connections import RedisSettings
from tortoise import Tortoise

from billing.db import tortoise_config
from billing.gateways.factory import make_gateway
from billing.pricing import load_price_book
from billing.settings import Settings, get_settings
from workers.jobs import FUNCTIONS, PERIODIC
from workers.live import RedisBroadcaster, channel_prefix
from workers.metrics import instrument
from workers.metrics import serve as serve_metrics
from workers.queue import ArqQueue

KEEP_RESULT_SECONDS = 60  # job ids dedupe while a job runs; the database keeps the truth


async def bind_context(ctx: dict[str, Any], settings: Settings) -> None:
    """What every job finds in ``ctx`` (see workers.context.JobContext)."""
    from billing.mailer import make_mailer

    gateway = make_gateway(settings)
    verify = getattr(gateway, "verify", None)
    if verify is not None:
        await verify()
    ctx.update(
        settings=settings,
        gateway=gateway,
        book=load_price_book(settings.price_book_path),
        mailer=make_mailer(settings),
        queue=ArqQueue(ctx["redis"]),
        # Balance changes go to the API processes' live subscriptions over Redis pub/sub.
        live=RedisBroadcaster(ctx["redis"], channel_prefix(settings.redis_url)),
    )


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    await Tortoise.init(config=tortoise_config(settings.database_url))
    await bind_context(ctx, settings)
    serve_metrics(settings.worker_metrics_port)


async def shutdown(ctx: dict[str, Any]) -> None:
    await Tortoise.close_connections()


def functions() -> list[Any]:
    return [func(instrument(name, f), name=name) for name, f in FUNCTIONS.items()]  # type: ignore[arg-type]


def cron_jobs() -> list[Any]:
    jobs = []
    for name, minutes in PERIODIC.items():
        at = {5} if minutes >= 60 else set(range(0, 60, minutes))
        job = instrument(name, FUNCTIONS[name])
        jobs.append(cron(job, name=f"cron:{name}", minute=at, second=0))  # type: ignore[arg-type]
    return jobs


class WorkerSettings:
    functions = functions()
    cron_jobs = cron_jobs()
    on_startup = startup
    on_shutdown = shutdown
    keep_result = KEEP_RESULT_SECONDS
    # On SIGTERM/SIGINT stop taking jobs and let running ones finish (then cancel them).
    job_completion_wait = get_settings().shutdown_grace_seconds
    max_tries = 5
    redis_settings = RedisSettings.from_dsn(get_settings().redis_url)
