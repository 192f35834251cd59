"""docker-compose.yml, the Dockerfile and .env.example, checked without a Docker engine.

No engine runs on our machines, and nothing here needs one (nor `docker compose config`):
the compose file is validated against the Compose Specification's JSON schema that
check-jsonschema ships (no download), and every command, health check and variable is
checked against the app's real entry points and settings. The API and worker commands are
then run as processes on loopback with the compose environment (SQLite and a private Redis
instead of the postgres and redis containers), and the health checks are run against them.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import importlib
import importlib.resources
import importlib.util
import inspect
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import jsonschema  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from dotenv import dotenv_values

from runtime.settings import DEV_JWT_SECRET, Settings
from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
ENV_EXAMPLE = ROOT / ".env.example"

APP_SERVICES = ("migrate", "api", "worker")
# The app's own settings, by environment variable name (pydantic-settings, case-insensitive).
SETTING_VARS = {name.upper() for name in Settings.model_fields}
# Read by the official postgres image, not by the app.
POSTGRES_IMAGE_VARS = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
# Read by Python and pip themselves (the Dockerfile's ENV).
PYTHON_VARS = {
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "PIP_ROOT_USER_ACTION",
}
ENTRY_POINTS = {"api", "workers"}  # python -m api, python -m workers
PLACEHOLDER = re.compile(r"change-me|replace-me")

BLOCK_NETWORK = (
    "import socket\n"
    "def _offline(*args, **kwargs):\n"
    "    raise OSError('this check must work offline')\n"
    "socket.socket.connect = _offline\n"
    "socket.create_connection = _offline\n"
    "socket.getaddrinfo = _offline\n"
)


# --- reading the files ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    # yaml resolves the x-app anchor (<<: *app)
    return cast("dict[str, Any]", yaml.safe_load(COMPOSE.read_text()))


def services() -> dict[str, dict[str, Any]]:
    return cast("dict[str, dict[str, Any]]", compose()["services"])


def env_example() -> dict[str, str]:
    values = dotenv_values(ENV_EXAMPLE, interpolate=False)
    assert all(v is not None for v in values.values()), "a variable without a value"
    return {k: v for k, v in values.items() if v is not None}


def commented_env_example() -> set[str]:
    """Variables documented but left commented out (``# NAME=value``)."""
    return set(re.findall(r"^#\s*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def instructions(keyword: str) -> list[str]:
    return [rest for kw, rest in dockerfile() if kw == keyword]


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def dockerfile_env() -> dict[str, str]:
    env = {}
    for rest in instructions("ENV"):
        for token in shlex.split(rest):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {rest!r}: use the KEY=value form"
            env[key] = value
    return env


def dockerfile_healthcheck() -> list[str]:
    [rest] = instructions("HEALTHCHECK")
    _, _, cmd = rest.partition("CMD ")
    return exec_form(cmd)


def healthcheck_argv(service: dict[str, Any]) -> list[str]:
    test = service["healthcheck"]["test"]
    assert isinstance(test, list) and test[0] == "CMD", test
    return list(test[1:])


def docker_context_includes(path: str) -> bool:
    """Whether .dockerignore lets ``path`` into the build context (last match wins; a
    pattern that matches a parent directory matches everything under it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
        if any(
            fnmatch.fnmatchcase(prefix, p) and (p.count("/") == prefix.count("/") or "**" in p)
            for prefix in prefixes
            for p in candidates
        ):
            included = negate
    return included


# --- the schema, offline and without docker ----------------------------------------------


def test_compose_file_validates_against_the_compose_spec_offline_without_docker(
    tmp_path: Path,
) -> None:
    """check-jsonschema's vendored Compose Specification; no network, no docker on PATH."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = {**os.environ, "PATH": str(empty_bin)}
    assert shutil.which("docker", path=env["PATH"]) is None
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            BLOCK_NETWORK + "from check_jsonschema import main\nmain()",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def compose_spec_errors(document: dict[str, Any]) -> list[str]:
    resource = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(resource.joinpath("compose-spec.json").read_text())
    assert "Compose Specification" in schema["title"]
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [error.message for error in validator.iter_errors(document)]


def test_the_schema_check_catches_mistakes() -> None:
    assert compose_spec_errors(compose()) == []
    bad_condition = copy.deepcopy(compose())
    bad_condition["services"]["api"]["depends_on"]["migrate"]["condition"] = "service_done"
    unknown_key = copy.deepcopy(compose())
    unknown_key["services"]["worker"]["comand"] = ["python", "-m", "workers"]
    bad_healthcheck = copy.deepcopy(compose())
    bad_healthcheck["services"]["redis"]["healthcheck"]["intervall"] = "5s"
    for broken in (bad_condition, unknown_key, bad_healthcheck):
        assert compose_spec_errors(broken), "the schema accepted a broken compose file"


# --- the services -------------------------------------------------------------------------


def test_services_images_volumes_and_health_checks() -> None:
    doc = compose()
    svc = doc["services"]
    assert set(svc) == {"postgres", "redis", *APP_SERVICES}
    assert svc["postgres"]["image"].split(":")[1].startswith("15")
    assert svc["redis"]["image"].split(":")[1].startswith("7")
    for name in APP_SERVICES:
        assert svc[name]["build"]["context"] == "."
        assert (ROOT / svc[name]["build"]["dockerfile"]) == DOCKERFILE
        assert svc[name]["env_file"] == ".env", f"{name} takes its settings from .env"
    # Named volumes, declared and used.
    declared = set(doc["volumes"])
    used = {
        volume.split(":")[0]
        for service in svc.values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/"))
    }
    assert declared == used == {"postgres-data", "redis-data"}
    assert "postgres-data:/var/lib/postgresql/data" in svc["postgres"]["volumes"]
    # Health checks: pg_isready, redis-cli ping, python for the app (slim has no curl).
    assert "pg_isready" in " ".join(svc["postgres"]["healthcheck"]["test"])
    assert healthcheck_argv(svc["redis"]) == ["redis-cli", "ping"]
    for name in ("api", "worker"):
        assert healthcheck_argv(svc[name])[:2] == ["python", "-c"]
    assert svc["migrate"]["healthcheck"] == {"disable": True}  # one-shot, exits when done
    assert dockerfile_healthcheck()[:2] == ["python", "-c"]


def test_migrations_run_once_before_the_api_and_the_worker_serve() -> None:
    svc = services()
    migrating = [
        name
        for name in APP_SERVICES
        if svc[name]["command"][:3] == ["python", "-m", "api"]
        and "--no-migrate" not in svc[name]["command"]
    ]
    assert migrating == ["migrate"], "exactly one service applies the migrations"
    assert svc["migrate"]["command"] == ["python", "-m", "api", "--migrate-only"]
    assert svc["migrate"]["restart"] == "no"
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        needs = svc[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["postgres"]["condition"] == "service_healthy"
        assert needs["redis"]["condition"] == "service_healthy"


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


def parse_entry_point(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> argparse.Namespace | None:
    """Check ``python -m MODULE FLAGS...`` against the module's real argparse (stopping
    right after parsing); a module without argparse must be given no flags."""
    assert argv[:2] == ["python", "-m"], argv
    module, flags = argv[2], argv[3:]
    assert module in ENTRY_POINTS, f"{module} is not one of the app's entry points"
    assert importlib.util.find_spec(f"{module}.__main__") is not None
    main_module = importlib.import_module(f"{module}.__main__")
    if "argparse" not in inspect.getsource(main_module):
        assert flags == [], f"python -m {module} takes no flags, got {flags}"
        assert callable(main_module.main)
        return None
    real_parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(real_parse_args(self, *args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        patch.setattr(sys, "argv", [module, *flags])
        try:
            main_module.main()
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit as exc:
            pytest.fail(f"python -m {module} refuses {flags} (exit {exc.code})")
    pytest.fail(f"python -m {module} did not parse its arguments")


def test_every_command_is_a_real_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    svc = services()
    migrate = parse_entry_point(svc["migrate"]["command"], monkeypatch)
    assert migrate is not None and migrate.migrate_only and not migrate.no_migrate
    api = parse_entry_point(svc["api"]["command"], monkeypatch)
    assert api is not None and api.no_migrate and not api.migrate_only
    assert parse_entry_point(svc["worker"]["command"], monkeypatch) is None
    [cmd] = instructions("CMD")
    image_default = parse_entry_point(exec_form(cmd), monkeypatch)
    assert image_default is not None and not image_default.no_migrate


def test_health_checks_use_the_apps_own_routes() -> None:
    from api.asgi import create_app

    app = create_app(Settings(_env_file=None))
    routes = {getattr(route, "path", None) for route in app.routes}
    api_check = healthcheck_argv(services()["api"])[2]
    image_check = dockerfile_healthcheck()[2]
    assert "/readyz" in api_check and "/readyz" in routes  # compose: ready to serve
    assert "/healthz" in image_check and "/healthz" in routes  # image: process up
    for code in (api_check, image_check, healthcheck_argv(services()["worker"])[2]):
        compile(code, "<healthcheck>", "exec")


# --- variables ----------------------------------------------------------------------------


def test_every_variable_is_a_real_setting() -> None:
    example = env_example()
    documented = set(example) | commented_env_example()
    assert documented <= SETTING_VARS | POSTGRES_IMAGE_VARS, (
        f"not settings of runtime.settings.Settings: "
        f"{sorted(documented - SETTING_VARS - POSTGRES_IMAGE_VARS)}"
    )
    assert documented >= SETTING_VARS, (
        f".env.example does not document {sorted(SETTING_VARS - documented)}"
    )
    svc = services()
    assert set(svc["postgres"]["environment"]) <= POSTGRES_IMAGE_VARS
    for name in APP_SERVICES:
        assert set(svc[name].get("environment", {})) <= SETTING_VARS | PYTHON_VARS
    assert set(dockerfile_env()) <= SETTING_VARS | PYTHON_VARS
    # Every ${VAR} compose interpolates comes from .env (compose reads it next to the file).
    raw = COMPOSE.read_text()
    interpolated = set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", raw))
    assert interpolated, "expected ${...} from .env"
    assert interpolated <= set(example), sorted(interpolated - set(example))


def test_env_example_is_a_valid_production_configuration(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from billing.payments.gateways.stripe_gateway import StripeGateway
    from billing.pricing import load_price_book
    from runtime.factory import make_gateway
    from runtime.mailer import SmtpMailer, make_mailer

    for var in SETTING_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=ENV_EXAMPLE)  # production validators
    assert settings.is_production and not settings.show_graphiql
    assert settings.payment_gateway == "stripe" and settings.job_queue == "arq"
    # RS256 against the identity provider's JWKS (or, instead, a real HS256 secret).
    jwks = settings.credits_jwks_url
    assert (jwks and jwks.startswith("https://")) or settings.jwt_secret != DEV_JWT_SECRET
    assert settings.host == "0.0.0.0", "inside the container the API listens on all interfaces"
    assert isinstance(make_gateway(settings), StripeGateway)
    assert isinstance(make_mailer(settings), SmtpMailer)
    load_price_book(settings.price_book_path)
    # docker stop waits longer than the app's own graceful shutdown.
    for name in ("api", "worker"):
        assert grace_seconds(services()[name]) > settings.shutdown_grace_seconds

    example = env_example()
    db = urlsplit(settings.database_url)
    assert (db.scheme, db.hostname, db.port) == ("postgres", "postgres", 5432)
    assert db.username == example["POSTGRES_USER"]
    assert db.password == example["POSTGRES_PASSWORD"]
    assert db.path == f"/{example['POSTGRES_DB']}"
    assert urlsplit(settings.redis_url).hostname == "redis"
    # The published port reaches the one the API listens on, and the image exposes it.
    [published] = services()["api"]["ports"]
    assert published.endswith(":${PORT:-8000}") and settings.port == int(dockerfile_env()["PORT"])
    assert str(settings.port) in instructions("EXPOSE")[0].split()
    # Secrets are placeholders, never real values.
    for var in (
        "POSTGRES_PASSWORD",
        "DATABASE_URL",
        "STRIPE_API_KEY",
        "STRIPE_WEBHOOK_SECRET",
        "SMTP_URL",
    ):
        assert PLACEHOLDER.search(example[var]), f"{var} must be a placeholder in the example"


# --- the image ----------------------------------------------------------------------------


def test_dockerfile_builds_a_slim_non_root_runtime_image() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    [user] = instructions("USER")
    assert user not in ("root", "0") and not user.startswith("0:")
    runs = " ".join(instructions("RUN"))
    assert re.search(r"pip install \.(\s|$)", runs), "installs the project, not .[dev]"
    assert "[dev]" not in runs and "requirements" not in runs
    assert instructions("EXPOSE") and instructions("HEALTHCHECK")
    assert dockerfile_env()["CREDITS_ENV"] == "production"
    # What COPY brings in exists and gets through .dockerignore; secrets and junk do not.
    for rest in instructions("COPY"):
        source = rest.split()[0]
        assert (ROOT / source).exists(), source
        assert docker_context_includes(source), f"{source} is left out by .dockerignore"
    for needed in ("billing/pricebook.toml", "billing/migrations/__init__.py", "api/app.py"):
        assert docker_context_includes(needed), needed
    for kept_out in (
        ".env",
        ".venv/bin/python",
        ".git/config",
        "var/credits.sqlite3",
        "tests/conftest.py",
        "billing/__pycache__/ledger.cpython-311.pyc",
    ):
        assert not docker_context_includes(kept_out), kept_out


# --- the commands, run ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The compose environment (.env.example), pointed at this machine: SQLite instead of
    the postgres container, the sandbox gateway, no SMTP server."""
    env = {k: v for k, v in os.environ.items() if k not in SETTING_VARS}
    env.update(env_example())
    for production_only in (
        "SMTP_URL",
        "CREDITS_JWKS_URL",
        "CREDITS_JWT_AUDIENCE",
        "CREDITS_JWT_ISSUER",
    ):
        env.pop(production_only, None)
    env.update(
        CREDITS_ENV="development",
        CREDITS_JWT_SECRET="compose-test-secret-that-is-long-enough-0123",
        SHUTDOWN_GRACE_SECONDS="5",
        PAYMENT_GATEWAY="sandbox",
        DATABASE_URL=f"sqlite://{tmp_path / 'credits.sqlite3'}",
        JOB_QUEUE="inprocess",
        HOST="127.0.0.1",
        PORT=str(_free_port()),
        PERIODIC_SECONDS="0",
        LOG_LEVEL="INFO",
    )
    env.update(overrides)
    return env


def as_local(argv: list[str]) -> list[str]:
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def stop(proc: subprocess.Popen[str], grace: float) -> None:
    """What `docker stop` does: SIGTERM, then the grace period, then SIGKILL."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{proc.args!r} did not stop within {grace} s of SIGTERM")


def grace_seconds(service: dict[str, Any]) -> float:
    value = service["stop_grace_period"]
    assert re.fullmatch(r"\d+s", value), value
    return float(value[:-1])


@pytest.fixture
def migrated(tmp_path: Path) -> dict[str, str]:
    """The environment after the `migrate` service ran, as compose runs it."""
    env = local_env(tmp_path)
    result = subprocess.run(
        as_local(services()["migrate"]["command"]),
        cwd=tmp_path,  # like the image: not the repository (no .env read from there)
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "credits.sqlite3").exists()
    return env


def test_api_command_serves_and_passes_its_health_checks(
    migrated: dict[str, str], tmp_path: Path
) -> None:
    api = services()["api"]
    proc = subprocess.Popen(
        as_local(api["command"]),
        cwd=tmp_path,
        env=migrated,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{migrated['PORT']}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the api did not start within 60 s"
            time.sleep(0.2)
        for check in (healthcheck_argv(api), dockerfile_healthcheck()):
            result = subprocess.run(
                as_local(check), env=migrated, capture_output=True, text=True, timeout=30
            )
            assert result.returncode == 0, result.stderr
        assert httpx.get(f"{base}/readyz").json()["database"] == "up"
    finally:
        stop(proc, grace_seconds(api))


class PrivateRedis:
    def __init__(self, workdir: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    try:
        yield server.url
    finally:
        server.close()


def test_worker_command_starts_and_passes_its_health_check(
    migrated: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    worker = services()["worker"]
    env = {**migrated, "JOB_QUEUE": "arq", "REDIS_URL": redis_url}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            as_local(worker["command"]),
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 60
        while "Starting worker" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        time.sleep(0.5)  # past on_startup (database, gateway)
        assert proc.poll() is None, log.read_text()
        result = subprocess.run(
            as_local(healthcheck_argv(worker)), env=env, capture_output=True, text=True, timeout=30
        )
        assert result.returncode == 0, result.stderr
        # And it fails when Redis is not there.
        down = {**env, "REDIS_URL": f"redis://127.0.0.1:{_free_port()}/0"}
        result = subprocess.run(
            as_local(healthcheck_argv(worker)), env=down, capture_output=True, text=True, timeout=30
        )
        assert result.returncode != 0
    finally:
        stop(proc, grace_seconds(worker))
