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
import json
import logging
import select
import sys
import time
from collections.abc import Iterable, Sequence
from typing import IO, Any

import msgspec

__all__ = [
    "ACCESS_LOG",
    "TEXT_FORMAT",
    "AccessEntry",
    "AccessHandler",
    "AccessLine",
    "Clock",
    "JSONFormatter",
    "configure_logging",
    "direct_handler",
]

ACCESS_LOG = logging.getLogger("aioproxy.access")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_FLUSH_AT = 256  # lines held at most before they are written, whatever the loop does
_ATOMIC = select.PIPE_BUF  # bytes a pipe writes whole, never interleaved (POSIX: >= 512)

_encoder = msgspec.json.Encoder()
_encode = _encoder.encode
_encode_lines = _encoder.encode_lines
_UNTIMED = b'{"time":null,'  # how an AccessLine's JSON text starts, before its time is known


class AccessLine(msgspec.Struct, gc=False):
    """One request's access line, its fields in the order they are written (``time`` first:
    its batch's, or filled in as the line is written). Built positionally (a C call: keywords cost twice the
    time) and out of the garbage collector's sight: it holds only text and numbers."""

    time: str | None  # the observer's batch's (None: filled in as the line is written)
    request_id: str
    method: str | None  # None: a request never parsed (its answer a malformed_request)
    path: str | None  # the route's template (/v1/models/{model}), or a path no route has, cut short
    kind: str
    status: int
    error: str | None  # the error's code
    key: str | None  # the key's name
    team: str | None  # the team's name (the request log's row holds its id)
    model: str | None
    deployment: str | None
    stream: bool | None
    input_tokens: int | None
    output_tokens: int | None
    cost: float | None
    ttft_ms: float | None
    duration_ms: float
    retries: int
    fallbacks: int
    cache: str | None
    client: str | None
    upstream_request_id: str | None


Fields = AccessLine | dict[str, Any]  # a line, or any fields (a dict's keys in its order)


class AccessEntry:
    """One request's fields (``time`` first, filled in when the line is written); ``str()``
    is their ``key=value`` text."""

    __slots__ = ("fields",)

    def __init__(self, fields: Fields) -> None:
        self.fields = fields

    def __str__(self) -> str:
        return " ".join(
            f"{name}={_text(value)}" for name, value in _items(self.fields) if name != "time"
        )


def _items(fields: Fields) -> Iterable[tuple[str, Any]]:
    if isinstance(fields, dict):
        return fields.items()
    return zip(fields.__struct_fields__, msgspec.structs.astuple(fields))


def _stamp(fields: Fields, when: str) -> None:
    if isinstance(fields, dict):
        fields["time"] = when
    else:
        fields.time = when


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quoted when it could be misread: empty, a space, a quote, an equals sign, or a
        # character that is not printable. A client's model name or path may hold a newline or
        # a terminal escape: raw, it would split the line or forge another. (json.dumps escapes
        # all but printable ASCII; msgspec leaves DEL and U+2028, a line break to some readers.)
        if value and value.isprintable() and not any(c in value for c in ' "='):
            return value
        return json.dumps(value)
    return str(value)


class Clock:
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
        self._clock = Clock()

    def format(self, record: logging.LogRecord) -> str:
        when = self._clock.iso(record.created)
        message = record.msg
        if isinstance(message, AccessEntry):
            _stamp(message.fields, when)
            return _encode(message.fields).decode()
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
        self.entries: list[Fields | bytes] = []  # fields, or a formatted record's line
        self._clock = Clock()
        self.setFormatter(JSONFormatter() if json else logging.Formatter(TEXT_FORMAT))

    def write(self, entry: Fields | bytes) -> None:
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

    def write_all(self, lines: list[AccessLine]) -> None:
        """A batch of request lines (the observer's), written now with any entries held. The
        observer times its lines as it builds them (one time a batch); untimed ones (None) are
        timed here."""
        if self.entries:  # held entries go first, each in its own form
            self.entries.extend(lines)
            self.flush()
            return
        when = lines[0].time
        if when is not None:  # the observer's: no scan of the text for the time
            data = _encode_lines(lines) if self.json else self._text_lines(lines, when)
        elif self.json:
            when = self._clock.iso(time.time())
            # Each line's time put in by one replace over the batch's text, not set a line at
            # a time (saving ~9 bytecodes a line and ~40 a batch): a line's text starts with
            # its time, null as built, and JSON text holds that nowhere else (a string's
            # quotes are escaped in it, and a line's values are no objects).
            data = _encode_lines(lines).replace(
                _UNTIMED, b'{"time":"%s",' % when.encode(), len(lines)
            )
        else:  # the time is the text line's prefix, not one of its fields
            data = self._text_lines(lines, self._clock.iso(time.time()))
        if len(data) > _ATOMIC:
            self._write(data)
            return
        stream = self.stream  # the usual batch: one write (as _write does, without its call)
        stream.write(data)
        stream.flush()

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
            if type(entry) is AccessLine:
                entry.time = when
            elif isinstance(entry, bytes):
                fields_only = False
            else:
                _stamp(entry, when)
        if fields_only:  # the common case: one encode
            if self.json:
                data = _encode_lines(entries)
            else:
                data = self._text_lines(entries, when)  # type: ignore[arg-type]
        else:
            data = b"".join(self._line(entry, when) + b"\n" for entry in entries)
        self._write(data)

    @staticmethod
    def _text_lines(entries: Sequence[Fields], when: str) -> bytes:
        return "".join(
            f"{when} INFO aioproxy.access: {AccessEntry(fields)}\n" for fields in entries
        ).encode()

    def _write(self, data: bytes) -> None:
        """Whole lines, at most PIPE_BUF bytes a write (a line longer than that alone): under
        run.py --workers every worker writes to the same stderr, and a pipe keeps only writes
        that small whole; larger ones interleave with the other workers', mid-line."""
        stream = self.stream
        size = len(data)
        if size <= _ATOMIC:  # the usual batch: one write
            stream.write(data)
            stream.flush()
            return
        start = 0
        while size - start > _ATOMIC:
            end = data.rfind(b"\n", start, start + _ATOMIC) + 1
            if end == 0:  # a line longer than PIPE_BUF: alone, whole
                end = data.find(b"\n", start + _ATOMIC) + 1 or size
            stream.write(data[start:end])
            stream.flush()  # each piece its own write: the buffer would join them
            start = end
        stream.write(data[start:] if start else data)
        stream.flush()

    def _line(self, entry: Fields | bytes, when: str) -> bytes:
        if isinstance(entry, bytes):
            return entry
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
