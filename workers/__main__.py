"""Start the arq worker: ``python -m workers``."""

from __future__ import annotations

import logging
import os

from arq.worker import get_kwargs

from runtime import logs
from runtime.resilience import ResilientWorker
from runtime.settings import get_settings
from workers.settings import WorkerSettings


def main() -> None:
    settings = get_settings()
    logs.configure(settings.log_level, settings.log_format)
    # arq's worker, made to ride out Redis outages and to free the jobs of dead workers.
    ResilientWorker(**get_kwargs(WorkerSettings)).run()  # type: ignore[arg-type]
    # arq has finished its jobs and closed the ORM. Tortoise may still hold a connection
    # opened from a job's task context (aiosqlite keeps a non-daemon thread per
    # connection), which would keep the process alive after a clean shutdown: leave now.
    logging.shutdown()
    os._exit(0)


if __name__ == "__main__":
    main()
