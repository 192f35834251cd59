"""Structured logs: one JSON object a line, carrying the request id (or job id) of the work
that wrote it.

The API's request-id middleware and the job wrapper bind their id with ``bind``; a
``ContextFilter`` on the handler copies whatever is bound onto every record, so each line
logged while a request (or job) runs, by any module, carries it. Context variables follow
tasks, so a job started by a request also knows the request that started it.
"""

from __future__ import annotations

import json
import logging
import logging.config
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Literal

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.orjson import OrjsonFormatter

_context: ContextVar[dict[str, str] | None] = ContextVar("log_context", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# python-json-logger adds every extra attribute of a record (request_id, job_id, ...).
JSON_FORMAT = "%(levelname)s %(name)s %(message)s"
JSON_RENAME = {"levelname": "level", "name": "logger"}


@contextmanager
def bind(**fields: str) -> Iterator[None]:
    """Add ``fields`` to every log line written inside the block (and tasks it starts)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def current() -> dict[str, str]:
    """What is bound now (empty outside a request or job)."""
    return dict(_context.get() or {})


class ContextFilter(logging.Filter):
    """Copies the bound fields onto each record (as attributes, for any formatter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in (_context.get() or {}).items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class TextFormatter(logging.Formatter):
    """The plain format, with the bound fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "uvicorn.error":  # uvicorn's general log, not only errors
            record.name = "uvicorn"
        line = super().format(record)
        keys = ("request_id", "job", "job_id")
        bound = " ".join(f"{k}={getattr(record, k)}" for k in keys if hasattr(record, k))
        return f"{line} [{bound}]" if bound else line


class _JsonFormatter(OrjsonFormatter):
    """python-json-logger's formatter on orjson, with the standard library's encoder for
    what orjson refuses (a lone surrogate, an integer past 64 bits): no line is lost."""

    def jsonify_log_record(self, log_data: Any) -> str:
        try:
            return super().jsonify_log_record(log_data)
        except TypeError:
            return json.dumps(log_data, default=str)


def json_formatter() -> logging.Formatter:
    return _JsonFormatter(
        JSON_FORMAT,
        rename_fields=JSON_RENAME,
        timestamp="time",  # ISO 8601, UTC
        reserved_attrs=[*RESERVED_ATTRS, "taskName", "color_message"],  # (uvicorn: ANSI copy)
    )


Kind = Literal["json", "text", "auto"]


def resolve(kind: Kind) -> Literal["json", "text"]:
    """``auto``: readable lines for a person at a terminal, JSON lines for machines."""
    if kind == "auto":
        return "text" if sys.stderr.isatty() else "json"
    return kind


def formatter(kind: Kind) -> logging.Formatter:
    return json_formatter() if resolve(kind) == "json" else TextFormatter(TEXT_FORMAT)


def config(level: str, kind: Kind) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the service (uvicorn's loggers included, so
    its own lines are JSON too). uvicorn's access log is replaced by the API's own."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"context": {"()": ContextFilter}},
        "formatters": {"default": {"()": formatter, "kind": kind}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["context"],
            }
        },
        "root": {"level": level.upper(), "handlers": ["default"]},
        "loggers": {
            "uvicorn": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.error": {"level": level.upper(), "handlers": [], "propagate": True},
            "uvicorn.access": {"level": "WARNING", "handlers": [], "propagate": True},
            # Its INFO lines are object reprs, and "Tortoise-ORM shutdown" after the
            # migrations at start-up read like the service stopping.
            "tortoise": {"level": "WARNING", "handlers": [], "propagate": True},
        },
    }


def configure(level: str, kind: Kind = "json") -> None:
    logging.config.dictConfig(config(level, kind))
