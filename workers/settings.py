"""The arq worker: ``python -m workers`` (or ``arq workers.settings.WorkerSettings``)."""

from __future__ import annotations

from typing import Any

from arq import cron, func
from arq.connections import RedisSettings
from tortoise import Tortoise

from runtime.cron import PERIODIC
from runtime.db import tortoise_config
from runtime.jobmetrics import instrument
from runtime.jobmetrics import serve as serve_metrics
from runtime.live import RedisBroadcaster, channel_prefix
from runtime.queue import ArqQueue
from runtime.services import build, verify_gateway
from runtime.settings import Settings, get_settings
from workers.jobs import FUNCTIONS

KEEP_RESULT_SECONDS = 60  # job ids dedupe while a job runs; the database keeps the truth

#: Each job's time limit, sized to the job (arq's default is 300 s for all). A charge is one
#: gateway call (Stripe retries included, a few seconds) and a couple of short
#: transactions; a job cut off here leaves a PENDING payment the sweep settles. arq keeps
#: a job's in-progress key for the longest limit + 10 s; a job whose worker died is freed
#: sooner than that by ``runtime.resilience.reap_orphaned_jobs``.
JOB_TIMEOUTS: dict[str, float] = {
    "process_gateway_event": 30,
    "threshold_recharge": 30,
    "scheduled_recharge": 30,
    "charge_invoice": 30,
    "send_notification": 60,  # SMTP: 30 s per command
    "enqueue_due_schedules": 30,
    "sweep": 120,
    "deliver_pending_notifications": 120,
    "retry_due_invoices": 120,
    "close_monthly_invoices": 120,
}
DEFAULT_JOB_TIMEOUT = 60.0

#: Start-up waits this long for Redis (one try a second) before giving up.
REDIS_START_RETRIES = 60


async def bind_context(ctx: dict[str, Any], settings: Settings) -> None:
    """What every job finds in ``ctx`` (see workers.context.JobContext)."""
    services = build(
        settings,
        queue=ArqQueue(ctx["redis"]),
        # Balance changes go to the API processes' live subscriptions over Redis pub/sub.
        live=RedisBroadcaster(ctx["redis"], channel_prefix(settings.redis_url)),
    )
    await verify_gateway(services.gateway)
    ctx.update(services.job_context())


async def startup(ctx: dict[str, Any]) -> None:
    settings = get_settings()
    await Tortoise.init(config=tortoise_config(settings.database_url))
    await bind_context(ctx, settings)
    serve_metrics(settings.worker_metrics_port)


async def shutdown(ctx: dict[str, Any]) -> None:
    await Tortoise.close_connections()


def functions() -> list[Any]:
    return [
        func(
            instrument(name, f),  # type: ignore[arg-type]
            name=name,
            timeout=JOB_TIMEOUTS.get(name, DEFAULT_JOB_TIMEOUT),
        )
        for name, f in FUNCTIONS.items()
    ]


def cron_jobs() -> list[Any]:
    """arq's cron entries for ``runtime.cron.PERIODIC`` (the in-process ticker runs the same
    list in the embedded default)."""
    return [
        cron(
            instrument(job.name, FUNCTIONS[job.name]),  # type: ignore[arg-type]
            name=f"cron:{job.name}",
            minute=job.arq_minutes(),
            second=set(job.seconds),
            timeout=JOB_TIMEOUTS.get(job.name, DEFAULT_JOB_TIMEOUT),
        )
        for job in PERIODIC
    ]


def worker_redis_settings(redis_url: str) -> RedisSettings:
    settings = RedisSettings.from_dsn(redis_url)
    settings.conn_retries = REDIS_START_RETRIES
    settings.conn_retry_delay = 1
    return settings


class WorkerSettings:
    functions = functions()
    cron_jobs = cron_jobs()
    on_startup = startup
    on_shutdown = shutdown
    keep_result = KEEP_RESULT_SECONDS
    # On SIGTERM/SIGINT stop taking jobs and let running ones finish (then cancel them).
    job_completion_wait = get_settings().shutdown_grace_seconds
    max_tries = 5
    job_timeout = DEFAULT_JOB_TIMEOUT
    redis_settings = worker_redis_settings(get_settings().redis_url)
