"""Request ids, the access log, HTTP latency and the readiness checks behind ``/readyz``."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from billing import sql
from runtime import logs
from runtime.settings import Settings

log = logging.getLogger("api.access")
readiness_log = logging.getLogger("api.readiness")

REQUEST_ID_HEADER = "X-Request-ID"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes: access log at DEBUG


def request_id_from(scope: Scope) -> str:
    """The caller's X-Request-ID when it is a sane token, else a new one."""
    for name, value in scope.get("headers") or ():
        if name == b"x-request-id":
            try:
                candidate = value.decode("ascii")
            except UnicodeDecodeError:
                break
            if _REQUEST_ID.match(candidate):
                return candidate
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI: every request gets an id (the caller's ``X-Request-ID`` or a new one),
    echoed in the response, bound to every log line written while it runs, and kept in
    ``scope["state"]["request_id"]``. Also writes the access log and the HTTP latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["type"] == "websocket":
            with logs.bind(request_id=request_id):
                await self.app(scope, receive, send)
            return

        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        with logs.bind(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                elapsed = time.perf_counter() - started
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.observe_http(scope["method"], route, status, elapsed)
                path = scope.get("path", "")
                log.log(
                    logging.DEBUG if path in QUIET_PATHS else logging.INFO,
                    "%s %s %s",
                    scope["method"],
                    path,
                    status,
                    extra={
                        "method": scope["method"],
                        "path": path,
                        "status": status,
                        "duration_ms": round(elapsed * 1000, 2),
                    },
                )


_failing: set[str] = set()  # checks failing now: logged once per outage, not per probe


async def _check(name: str, probe: Any, seconds: float) -> tuple[str, str]:
    try:
        async with asyncio.timeout(seconds):
            await probe
    except Exception as exc:  # any failure (or a hang) means down
        if name not in _failing:
            _failing.add(name)
            readiness_log.warning("readiness check %s failed: %s", name, exc or type(exc).__name__)
        return name, "down"
    if name in _failing:
        _failing.discard(name)
        readiness_log.info("readiness check %s passes again", name)
    return name, "up"


async def _ping_redis(queue: object, redis_url: str) -> None:
    ping = getattr(queue, "ping", None)
    if ping is not None:
        await ping()
        return
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        await client.ping()
    finally:
        await client.aclose()


async def readiness(settings: Settings, queue: object) -> dict[str, str]:
    """``{"database": "up" | "down", "redis": ...}``: Redis only when jobs go through arq."""
    timeout = settings.readiness_timeout_seconds
    probes = [_check("database", sql.fetch("SELECT 1 AS ok"), timeout)]
    if settings.job_queue == "arq":
        probes.append(_check("redis", _ping_redis(queue, settings.redis_url), timeout))
    return dict(await asyncio.gather(*probes))
