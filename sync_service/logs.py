"""Structured logs: one JSON object (or one key=value line) per event.

Log lines are meant for machines first (a deployed coordinator's logs go to journald or a collector), so
each record carries an event name plus typed fields instead of prose. Code logs with
``log.info("upload accepted", extra={"fields": {...}})``; `JsonFormatter` turns that into
``{"ts": ..., "level": "info", "logger": ..., "event": "upload accepted", "round": 3, ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})))


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", None) or {})
    for key, value in vars(record).items():
        if key not in _STANDARD and key not in ("fields", "message", "asctime"):
            fields.setdefault(key, value)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        parts = [f"ts={ts}", f"level={record.levelname.lower()}", f"event={json.dumps(record.getMessage())}"]
        for key, value in _fields(record).items():
            text = value if isinstance(value, (int, float)) else json.dumps(str(value))
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    """Send the coordinator's logs to stderr in `fmt` ("json" or "text")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger("sync_service")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
