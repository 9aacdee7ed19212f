"""The access log: one ``aioproxy.access`` line per finished request, as text or JSON.

An entry holds names, numbers and ids only: never a key, a prompt or a completion. The message
of a log record is an :class:`AccessEntry`; :class:`JSONFormatter` writes its fields as one JSON
object per line (and any other record as ``time``/``level``/``logger``/``message``), and any
other formatter gets its ``key=value`` text.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgspec

__all__ = ["ACCESS_LOG", "AccessEntry", "JSONFormatter", "TEXT_FORMAT", "configure_logging"]

ACCESS_LOG = logging.getLogger("aioproxy.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_encode = msgspec.json.Encoder().encode


class AccessEntry:
    """One request's fields (a dict, in a fixed order); ``str()`` is its ``key=value`` text."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(f"{name}={_text(value)}" for name, value in self.fields.items())


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quoted when it could be misread (a space, a quote, an equals sign, or empty).
        return value if value and not any(c in value for c in ' "=') else _encode(value).decode()
    return str(value)


class _Clock:
    """ISO 8601 UTC times with milliseconds, the second's text made once per second."""

    __slots__ = ("second", "text")

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self.second:
            self.second, self.text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self.text}.{int((created - second) * 1000):03d}Z"


class JSONFormatter(logging.Formatter):
    """One JSON object per line: an access entry's fields, or any record's level and message."""

    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        when = self._clock.iso(record.created)
        message = record.msg
        if isinstance(message, AccessEntry):
            return _encode({"time": when, **message.fields}).decode()
        line: dict[str, Any] = {
            "time": when, "level": record.levelname, "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure_logging(level: str, log_format: str) -> None:
    """The root handler for ``run.py``: text lines, or JSON objects (``--log-format json``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # Each record would otherwise look up its thread and process names: nothing here reads them.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
