"""Structured logs: one JSON object per line, with the request id of the request a line was written for.

Why JSON by default: log pipelines (Loki, Elasticsearch, CloudWatch) index fields without regexes, and an operator
can follow one request across lines by its ``request_id``. ``UNLEARN_LOG_FORMAT=text`` gives readable lines for a
terminal instead. The access log (logger ``unlearn.access``, one line per request, written by the telemetry
middleware) replaces uvicorn's, which would add a second, unstructured line per request.

Privacy: nothing in this module or the middleware logs prompt or completion text unless
``UNLEARN_LOG_CONTENT=true`` is set explicitly; see ``gateway.telemetry.middleware``.

Logging is process-wide configuration, so it is applied by the process entry points (``unlearn-gateway serve``
hands ``uvicorn_log_config`` to uvicorn, which applies it in every worker process), never by the app factory.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from gateway.telemetry.context import current_request

ACCESS_LOGGER = "unlearn.access"
# Record attributes that are not ``extra`` fields (uvicorn adds ``color_message``, an ANSI copy of the message).
_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "event",
                                                                                 "color_message", "taskName"}


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: ``extra={"event": {...}}`` plus any other ``extra`` keys, and the
    request id of the current request when the line was written inside one."""
    fields: dict[str, Any] = dict(getattr(record, "event", None) or {})
    for key, value in record.__dict__.items():
        if key not in _RESERVED and not key.startswith("_") and key not in fields:
            fields[key] = value
    if "request_id" not in fields:
        telemetry = current_request()
        if telemetry is not None:
            fields["request_id"] = telemetry.request_id
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": _timestamp(record.created), "level": record.levelname.lower(),
                                "logger": record.name, "msg": record.getMessage()}
        line.update(record_fields(record))
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return text


def uvicorn_log_config(log_format: str, level: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for uvicorn: every logger (root, uvicorn's, ours) on stderr in one format."""
    formatter = f"gateway.telemetry.logs.{'JsonFormatter' if log_format == 'json' else 'TextFormatter'}"
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": True},
            ACCESS_LOGGER: {"handlers": [], "level": level, "propagate": True},  # warning: no access lines
        },
    }
