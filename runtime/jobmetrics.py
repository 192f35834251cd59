"""Prometheus metrics of the jobs: duration and failures per job, recharges by outcome.

In the embedded default the jobs run in the API process and ``GET /metrics`` shows these;
an arq worker serves them itself on ``WORKER_METRICS_PORT`` when that is set.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

from prometheus_client import Counter, Histogram, start_http_server

from runtime import logs
from runtime.queue import JobFunction

log = logging.getLogger(__name__)

JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

JOB_DURATION = Histogram(
    "credits_job_duration_seconds",
    "Job runs by job function (failed runs included).",
    ["job"],
    buckets=JOB_BUCKETS,
)
JOB_FAILURES = Counter("credits_job_failures", "Job runs that raised (arq retries them).", ["job"])
RECHARGES = Counter(
    "credits_recharges",
    "Auto-recharge job runs by trigger and outcome (charged, declined, paused, not_needed, ...).",
    ["trigger", "outcome"],
)


def instrument(name: str, function: JobFunction) -> JobFunction:
    """``function`` timed and counted under ``name``; its log lines carry the job id."""

    @functools.wraps(function)
    async def run(ctx: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        job_id = ctx.get("job_id") if isinstance(ctx, dict) else None
        try:
            with logs.bind(job=name, **({"job_id": str(job_id)} if job_id else {})):
                return await function(ctx, *args, **kwargs)
        except BaseException:
            JOB_FAILURES.labels(name).inc()
            raise
        finally:
            JOB_DURATION.labels(name).observe(time.perf_counter() - started)

    return run


def count_recharge(trigger: str, outcome: str) -> None:
    RECHARGES.labels(trigger, outcome).inc()


def serve(port: int | None) -> None:
    """Expose the worker's metrics on ``port`` (a no-op when it is not set)."""
    if port:
        start_http_server(port)
        log.info("worker metrics on :%d/metrics", port)
