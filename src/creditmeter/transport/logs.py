"""How the process logs: readable text for a terminal, or one JSON object per line for a log
pipeline (time, level, logger, message and any `extra` fields of the call).

Every handler gets a filter that masks API keys: the code never logs one on purpose, and
the filter keeps a careless `log.info("auth %s", header)` from leaking a tenant's secret.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

from creditmeter.constants import LOG_FORMATS, TEXT_LOG_FORMAT, TEXT_WORKER_LOG_FORMAT

#: `cm_<key id>_<secret>` (domain/keys.py): the id is kept, it names the key without
#: granting anything; and whatever follows "Bearer " in an authorization header.
_KEY = re.compile(r"\b(cm_[0-9a-f]+_)[A-Za-z0-9_-]+")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
REDACTED = "[REDACTED]"

#: Attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def redact(text: str) -> str:
    """The text with API key secrets and bearer tokens masked."""
    return _KEY.sub(rf"\g<1>{REDACTED}", _BEARER.sub(rf"\g<1>{REDACTED}", text))


class RedactSecrets(logging.Filter):
    """Masks API keys in the message and in string `extra` fields of every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        for name, value in list(vars(record).items()):
            if name not in _STANDARD and isinstance(value, str):
                setattr(record, name, redact(value))
        return True


def formatter(fmt: str) -> logging.Formatter:
    """The formatter for `text` or `json`."""
    if fmt == "json":
        json_formatter = JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
        # ISO 8601 in UTC with milliseconds ("2026-01-02T03:04:05.678Z"), first on the line.
        json_formatter.converter = time.gmtime
        json_formatter.default_time_format = "%Y-%m-%dT%H:%M:%S"
        json_formatter.default_msec_format = "%s.%03dZ"
        return json_formatter
    if fmt == "text":
        return logging.Formatter(TEXT_LOG_FORMAT)
    raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}: {fmt!r}")


class WorkerTag(logging.Filter):
    """Puts the worker's index on every record (`worker`: a JSON field, or in the text)."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


def tag_worker(index: int) -> None:
    """In a worker of `serve --workers N`: every line of this process names the worker."""
    for handler in logging.getLogger().handlers:
        handler.addFilter(WorkerTag(index))
        if not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(logging.Formatter(TEXT_WORKER_LOG_FORMAT))


def make_handler(fmt: str, stream: TextIO | None = None) -> logging.Handler:
    """A handler writing to `stream` (stderr) in format `fmt`, with keys masked."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(fmt))
    handler.addFilter(RedactSecrets())
    return handler


def configure(fmt: str = "text", level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Send the root logger's records to `stream` (stderr) in format `fmt`, replacing any
    handler configured before."""
    handler = make_handler(fmt, stream)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
