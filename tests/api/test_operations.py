"""Operations: /metrics after spends, purchases and jobs; the request id (echoed, and on
every log line of its request); /readyz with the database and Redis; graceful shutdown
of a real server (an in-flight request finishes)."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families

from api.observability import readiness
from api.permissions import TABLE
from runtime import logs
from runtime.queue import ArqQueue, InProcessQueue
from runtime.settings import Settings
from tests.conftest import ROOT, TEST_SECRET, Caller, MakeCaller
from tests.support.gateways import free_port
from tests.support.ops import add_card, buy, consume, grant

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(s: Samples, name: str, **labels: str) -> float:
    return s.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return samples(response.text)


# ---------------------------------------------------------------- /metrics


async def test_metrics_count_spends_purchases_operations_and_jobs(
    http: httpx.AsyncClient,
    admin: Caller,
    staff: Caller,
    service: Caller,
    queue: InProcessQueue,
) -> None:
    before = await scrape(http)

    await admin.gql("query BalanceProbe { creditAccount { balance } }")
    await grant(staff, admin.account_id, 20)
    assert (await consume(service, "POSTCARD"))["errors"] == []
    short = await consume(service, "HANDWRITTEN_LETTER")  # 35 credits: the balance is 8
    assert [e["code"] for e in short["errors"]] == ["INSUFFICIENT_CREDITS"]
    await add_card(admin)
    assert (await buy(admin, 100))["payment"]["status"] == "SUCCEEDED"
    nothing = await buy(admin, 5)  # below the minimum: refused before any payment
    assert nothing["payment"] is None

    await queue.enqueue("threshold_recharge", admin.account_id, job_id=f"m:{uuid.uuid4()}")
    await queue.enqueue("scheduled_recharge", admin.account_id, "not a time", job_id="m:bad")
    await queue.drain()

    after = await scrape(http)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        delta = value(after, name, **labels) - value(before, name, **labels)
        assert delta == by, (name, labels, delta)

    grew("credits_spends_total", process_type="POSTCARD", outcome="spent")
    grew("credits_spends_total", process_type="HANDWRITTEN_LETTER", outcome="INSUFFICIENT_CREDITS")
    grew("credits_spent_credits_total", 12, process_type="POSTCARD")
    grew("credits_purchases_total", outcome="SUCCEEDED")
    grew("credits_purchases_total", outcome="INVALID_AMOUNT")
    grew(
        "credits_graphql_request_duration_seconds_count",
        operation="creditAccount",  # the root field: a label set the schema bounds
        operation_type="query",
    )
    grew("credits_job_duration_seconds_count", job="threshold_recharge")
    grew("credits_job_failures_total", job="scheduled_recharge")
    grew("credits_job_duration_seconds_count", job="scheduled_recharge")
    grew("credits_recharges_total", trigger="THRESHOLD", outcome="disabled")
    posts = value(after, "credits_http_request_duration_seconds_count", **_graphql_200()) - value(
        before, "credits_http_request_duration_seconds_count", **_graphql_200()
    )
    assert posts >= 7
    assert value(after, "credits_graphql_request_duration_seconds_count", **_anon_mutation()) > 0


def _graphql_200() -> dict[str, str]:
    return {"method": "POST", "route": "/graphql", "status": "200"}


def _anon_mutation() -> dict[str, str]:
    return {"operation": "consumeCredits", "operation_type": "mutation"}


async def test_operation_labels_are_a_bounded_known_set(
    http: httpx.AsyncClient, caller: MakeCaller
) -> None:
    """Any token could fill the 200 operation-name slots with junk names, after which real
    operations were counted as ``other``: the label is now the root field, from the schema."""
    nobody = caller(f"acct-{uuid.uuid4().hex[:8]}")
    for i in range(250):
        await nobody.raw(f"query Junk{i}x{uuid.uuid4().hex} {{ viewer {{ userId }} }}")
    await nobody.raw("query Real { creditPricing { currency } }")
    await nobody.raw("{ viewer { userId } creditPricing { currency } }")
    after = await scrape(http)
    labels = {
        dict(labels)["operation"]
        for (name, labels) in after
        if name == "credits_graphql_request_duration_seconds_count"
    }
    assert not [label for label in labels if label.startswith("Junk")]
    assert {"viewer", "creditPricing", "multiple"} <= labels
    known = {"multiple", "other", *(op.split(".")[1] for op in TABLE if "." in op)}
    assert labels <= known, labels - known
    # Nor can the HTTP method fill its label.
    await http.request("BREW", "/healthz")
    methods = {
        dict(labels)["method"]
        for (name, labels) in await scrape(http)
        if name == "credits_http_request_duration_seconds_count"
    }
    assert "BREW" not in methods


# ---------------------------------------------------------------- request ids and logs


async def test_request_id_is_echoed_or_made(http: httpx.AsyncClient) -> None:
    given = await http.get("/healthz", headers={"X-Request-ID": "req-abc.123"})
    assert given.headers["x-request-id"] == "req-abc.123"
    made = await http.get("/healthz")
    assert len(made.headers["x-request-id"]) == 32
    other = await http.get("/healthz")
    assert other.headers["x-request-id"] != made.headers["x-request-id"]
    for bad in ("has spaces in it", "x" * 200, "semi;colon"):
        replaced = await http.get("/healthz", headers={"X-Request-ID": bad})
        assert replaced.headers["x-request-id"] != bad
        assert len(replaced.headers["x-request-id"]) == 32
    unauthenticated = await http.post("/graphql", json={"query": "{ viewer { userId } }"})
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["x-request-id"]


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The service's JSON log handler on the root logger, writing to a buffer."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.json_formatter())
    handler.addFilter(logs.ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_every_log_line_of_a_request_carries_its_id(
    admin: Caller, json_log: io.StringIO
) -> None:
    request_id = f"log-check-{uuid.uuid4().hex[:8]}"
    response = await admin.http.post(
        "/graphql",
        json={"query": "query Broken { creditAccount { noSuchField } }"},
        headers={"Authorization": f"Bearer {admin.token}", "X-Request-ID": request_id},
    )
    assert response.status_code == 200 and response.json()["errors"]
    assert response.headers["x-request-id"] == request_id
    await admin.http.get("/healthz", headers={"X-Request-ID": "another-request"})

    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    mine = [r for r in records if r.get("request_id") == request_id]
    loggers = {r["logger"] for r in mine}
    assert "api.access" in loggers  # the access line
    assert "api.graphql" in loggers, records  # the client's error, at INFO
    (error,) = [r for r in mine if r["logger"] == "api.graphql"]
    assert error["level"] == "INFO" and "noSuchField" in error["message"]
    access = next(r for r in mine if r["logger"] == "api.access")
    assert access["status"] == 200 and access["path"] == "/graphql"
    assert access["level"] == "INFO" and access["time"].endswith("+00:00")
    # every line written while the request ran has its id, and no other request's
    during = [r for r in records if r["logger"].startswith(("strawberry", "api"))]
    assert {r.get("request_id") for r in during} <= {request_id, "another-request"}
    assert all(r.get("request_id") for r in during)


def test_text_logs_carry_the_request_id() -> None:
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    with logs.bind(request_id="r-1"):
        logs.ContextFilter().filter(record)
    assert logs.formatter("text").format(record).endswith("hello [request_id=r-1]")


# ---------------------------------------------------------------- /readyz


async def test_readyz_in_process(http: httpx.AsyncClient) -> None:
    response = await http.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "database": "up"}


async def test_readiness_checks_redis_when_jobs_go_through_arq(settings: Settings) -> None:
    arq_settings = settings.model_copy(update={"job_queue": "arq"})
    live = await ArqQueue.connect("redis://127.0.0.1:6379/0")
    try:
        assert await readiness(arq_settings, live) == {"database": "up", "redis": "up"}
    finally:
        await live.close()
    gone = ArqQueue(ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1))
    try:
        assert await readiness(arq_settings, gone) == {"database": "up", "redis": "down"}
    finally:
        await gone.close()
    # not configured for arq: Redis is none of the API's business
    assert await readiness(settings, gone) == {"database": "up"}


async def test_readyz_reports_redis_down_as_degraded_not_unready(
    app: Any, settings: Settings, harness: Any
) -> None:
    """With Redis gone every request still succeeds (jobs are queued again by the sweep):
    /readyz says so in its body and its metric, and stays 200, so a load balancer keeps
    every replica in."""
    from api.asgi import create_app
    from runtime.live import InProcessBroadcaster

    arq_settings = settings.model_copy(update={"job_queue": "arq"})
    gone = ArqQueue(ArqRedis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1))
    application = create_app(
        arq_settings, gateway=harness.gateway, queue=gone, live=InProcessBroadcaster()
    )
    try:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.get("/readyz")
            assert response.status_code == 200
            assert response.json() == {"status": "degraded", "database": "up", "redis": "down"}
            metrics = (await client.get("/metrics")).text
    finally:
        await gone.close()
    assert 'credits_dependency_up{dependency="redis"} 0.0' in metrics
    assert 'credits_dependency_up{dependency="database"} 1.0' in metrics


# ---------------------------------------------------------------- a real server


class Server:
    def __init__(self, env: dict[str, str]) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api", "--no-migrate"],
            cwd=ROOT,
            env={
                **os.environ,
                "PORT": str(self.port),
                "CREDITS_JWT_SECRET": TEST_SECRET,
                "CREDITS_ENV": "development",
                "PAYMENT_GATEWAY": "sandbox",
                "PERIODIC_SECONDS": "0",
                "LOG_LEVEL": "INFO",
                "LOG_FORMAT": "json",
                **env,
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited: {self.finish()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start: {self.finish()}")
            time.sleep(0.1)

    def finish(self, sig: int = signal.SIGTERM) -> str:
        """Stop the server; its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def assert_clean_exit(server: Server, log: str) -> None:
    # uvicorn shuts down gracefully, then re-raises the signal it caught
    assert server.proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete." in log and "Finished server process" in log


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def test_readyz_fails_when_the_database_is_unreachable() -> None:
    """A server whose PostgreSQL refuses connections (nothing listens on the port): alive,
    not ready; Redis (the arq queue) is fine and says so. Its JSON log names the request."""
    server = Server(
        {
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{free_port()}/nothing",
            "JOB_QUEUE": "arq",
            "REDIS_URL": "redis://127.0.0.1:6379/0",
        }
    )
    try:
        assert httpx.get(f"{server.base}/healthz", timeout=10).status_code == 200
        response = httpx.get(
            f"{server.base}/readyz", headers={"X-Request-ID": "ready-probe-1"}, timeout=10
        )
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "database": "down", "redis": "up"}
        assert response.headers["x-request-id"] == "ready-probe-1"
    finally:
        log = server.finish()
    assert_clean_exit(server, log)
    lines = json_lines(log)
    failed = [r for r in lines if "readiness check database failed" in r.get("message", "")]
    assert failed and failed[0]["request_id"] == "ready-probe-1", log
    assert failed[0]["level"] == "WARNING"
    assert not any(r.get("logger") == "uvicorn.access" for r in lines)  # ours replaces it


@pytest.fixture
def silent_database() -> Iterator[int]:
    """A port on loopback that accepts connections and never answers (a hung database)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        listener.close()


def test_readyz_times_out_and_shutdown_lets_it_finish(silent_database: int) -> None:
    """A hung database fails /readyz after READINESS_TIMEOUT_SECONDS, not never; and a
    SIGTERM while that request is in flight lets it finish before the server exits."""
    server = Server(
        {
            "DATABASE_URL": f"postgres://postgres@127.0.0.1:{silent_database}/nothing",
            "READINESS_TIMEOUT_SECONDS": "3",
            "SHUTDOWN_GRACE_SECONDS": "20",
        }
    )
    result: dict[str, Any] = {}

    def probe() -> None:
        started = time.monotonic()
        try:
            result["response"] = httpx.get(f"{server.base}/readyz", timeout=30)
        except httpx.HTTPError as exc:
            result["error"] = exc
        result["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=probe)
    try:
        thread.start()
        time.sleep(1.0)  # the request is in flight, waiting on the database
        server.proc.send_signal(signal.SIGTERM)
        thread.join(30)
    finally:
        log = server.finish()
    assert "error" not in result, (result, log)
    response = result["response"]
    assert response.status_code == 503, log
    assert response.json()["database"] == "down"
    assert result["seconds"] >= 2.5
    assert_clean_exit(server, log)


def test_shutdown_and_logging_settings_reach_uvicorn_and_arq() -> None:
    from api.__main__ import uvicorn_options
    from workers.settings import WorkerSettings

    settings = Settings(
        credits_jwt_secret=TEST_SECRET,
        shutdown_grace_seconds=7,
        log_format="text",
        _env_file=None,
    )
    options = uvicorn_options(settings, workers=2)
    assert options["timeout_graceful_shutdown"] == 7
    assert options["access_log"] is False  # the API's own access line has the request id
    assert options["workers"] == 2
    handler = options["log_config"]["handlers"]["default"]
    assert handler["filters"] == ["context"]
    assert options["log_config"]["formatters"]["default"]["kind"] == "text"
    assert WorkerSettings.job_completion_wait == Settings().shutdown_grace_seconds
    assert all(f.coroutine.__wrapped__ for f in WorkerSettings.functions)  # timed and counted
