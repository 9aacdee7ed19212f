"""The access log: one ``aioproxy.access`` line per finished request, as text or JSON.

An entry holds names, numbers and ids only: never a key, a prompt or a completion. Through the
logging API a record's message is an :class:`AccessEntry`: :class:`JSONFormatter` writes its
fields as one JSON object per line (and any other record as ``time``/``level``/``logger``/
``message``), and any other formatter gets its ``key=value`` text.

``run.py`` gives the access logger an :class:`AccessHandler` of its own, which the observer
writes to directly: no LogRecord per request, and the lines of one event-loop turn go out in
one write. An app embedded elsewhere logs through the logging API as usual.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import IO, Any

import msgspec

__all__ = [
    "ACCESS_LOG",
    "TEXT_FORMAT",
    "AccessEntry",
    "AccessHandler",
    "JSONFormatter",
    "configure_logging",
    "direct_handler",
]

ACCESS_LOG = logging.getLogger("aioproxy.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FLUSH_AT = 256  # lines held at most before they are written, whatever the loop does

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_lines = _encoder.encode_lines


class AccessEntry:
    """One request's fields (a dict, in a fixed order, ``time`` first and filled in when the line
    is written); ``str()`` is its ``key=value`` text."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(
            f"{name}={_text(value)}" for name, value in self.fields.items() if name != "time"
        )


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
            fields = message.fields
            fields["time"] = when
            return _encode(fields).decode()
        line: dict[str, Any] = {
            "time": when,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line).decode()


class AccessHandler(logging.Handler):
    """The access log's handler under ``run.py``: entries held until the event loop's turn ends
    (or 256 gather), then encoded and written at once; :meth:`write` takes an entry's fields
    directly."""

    def __init__(self, stream: IO[bytes], json: bool) -> None:
        super().__init__()
        self.stream = stream
        self.json = json
        self.entries: list[dict[str, Any] | bytes] = []  # fields, or a formatted record's line
        self._clock = _Clock()
        self.setFormatter(JSONFormatter() if json else logging.Formatter(TEXT_FORMAT))

    def write(self, entry: dict[str, Any] | bytes) -> None:
        """Hold one entry: a request's fields (the observer's path: no LogRecord), or a
        formatted record's line; encoded with the rest of the loop turn's, and timed as they
        are written (within the turn)."""
        entries = self.entries
        entries.append(entry)
        if len(entries) == 1:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: at once
                self.flush()
        elif len(entries) >= _FLUSH_AT:
            self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        """An entry logged through the logging API (by a plugin, say)."""
        try:
            self.write(self.format(record).encode("utf-8", "backslashreplace"))
        except Exception:  # noqa: BLE001 - logging.Handler.emit: report, never raise
            self.handleError(record)

    def flush(self) -> None:
        if not self.entries:
            return
        entries, self.entries = self.entries, []
        when = self._clock.iso(time.time())
        fields_only = True
        for entry in entries:
            if type(entry) is dict:
                entry["time"] = when
            else:
                fields_only = False
        if fields_only:  # the common case: one encode
            if self.json:
                data = _encode_lines(entries)
            else:
                data = "".join(
                    f"{when} INFO aioproxy.access: {AccessEntry(fields)}\n"  # type: ignore[arg-type]
                    for fields in entries
                ).encode()
        else:
            data = b"".join(self._line(entry, when) + b"\n" for entry in entries)
        self.stream.write(data)
        self.stream.flush()

    def _line(self, entry: dict[str, Any] | bytes, when: str) -> bytes:
        if isinstance(entry, bytes):
            return entry
        entry["time"] = when
        if self.json:
            return _encode(entry)
        return f"{when} INFO aioproxy.access: {AccessEntry(entry)}".encode()

    def close(self) -> None:
        self.flush()
        super().close()


def direct_handler() -> AccessHandler | None:
    """The access log's own handler when it is the only place lines go (``run.py``), so that
    the observer may write to it directly; None when the logging API must be used."""
    handlers = ACCESS_LOG.handlers
    if ACCESS_LOG.propagate or len(handlers) != 1 or not isinstance(handlers[0], AccessHandler):
        return None
    return handlers[0]


def configure_logging(level: str, log_format: str) -> None:
    """``run.py``'s logging: text lines, or JSON objects (``--log-format json``), on stderr."""
    json = log_format == "json"
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if json else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for old in ACCESS_LOG.handlers:
        if isinstance(old, AccessHandler):
            ACCESS_LOG.removeHandler(old)
            old.close()
    ACCESS_LOG.addHandler(AccessHandler(sys.stderr.buffer, json))
    ACCESS_LOG.propagate = False
    # Each record would otherwise look up its thread and process names: nothing here reads them.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
