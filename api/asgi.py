"""The composition root: wires the jobs (``workers``) and the in-process cron into the
app. ASGI entry point for uvicorn: ``uvicorn api.asgi:app``. The only module of ``api``
that imports ``workers``."""

from __future__ import annotations

import logging
from typing import Any

from starlette.applications import Starlette

from api import app as assembly
from api.heap import settle_heap
from runtime import cron
from runtime.queue import InProcessQueue
from runtime.settings import Settings
from workers.jobs import all_functions

log = logging.getLogger(__name__)


async def run_periodic(queue: InProcessQueue, settings: Settings) -> None:
    """The embedded default's cron: ``runtime.cron``'s list on the in-process queue, a tick
    every ``settings.periodic_seconds``."""
    await cron.run_periodic(queue, settings.periodic_seconds)


def create_app(settings: Settings | None = None, **parts: Any) -> Starlette:
    """``api.app.create_app`` with the jobs and the cron wired in (``parts``: gateway,
    queue, live, as there)."""
    return assembly.create_app(settings, jobs=all_functions(), cron=run_periodic, **parts)


def __getattr__(name: str) -> Starlette:
    """``app``, made on first use (uvicorn reads it; importing ``create_app`` makes none)."""
    if name != "app":
        raise AttributeError(name)
    application = create_app()
    settle_heap()  # what exists now lives as long as the process: api/heap.py
    globals()["app"] = application
    return application
