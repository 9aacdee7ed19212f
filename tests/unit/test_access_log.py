"""aioproxy.observability.access_log: run.py's access handler and the JSON formatter."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import select
from collections.abc import Iterator

import pytest

from aioproxy.observability.access_log import (
    ACCESS_LOG,
    AccessEntry,
    AccessHandler,
    AccessLine,
    JSONFormatter,
    direct_handler,
)

FIELDS = {"time": None, "request_id": "r-1", "status": 200, "model": "a b", "cost": None}


class Stream(io.BytesIO):
    """Counts the writes (a loop turn's lines must go out in one), and keeps what each flush
    sends (one write(2) of a buffered stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushed: list[bytes] = []
        self._since = 0

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes += 1
        return super().write(data)

    def flush(self) -> None:
        self.flushed.append(self.getvalue()[self._since :])
        self._since = len(self.getvalue())


async def test_a_turns_lines_go_out_in_one_write() -> None:
    stream = Stream()
    handler = AccessHandler(stream, json=True)
    handler.write(dict(FIELDS))
    handler.write({**FIELDS, "request_id": "r-2"})
    assert stream.writes == 0  # held until the loop's turn ends
    await asyncio.sleep(0)
    assert stream.writes == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r-1", "r-2"]
    assert all(line["time"].endswith("Z") and len(line["time"]) == 24 for line in lines)
    assert list(lines[0]) == list(FIELDS)  # time first, the fields' order kept


def test_text_lines_without_a_loop() -> None:
    stream = Stream()
    AccessHandler(stream, json=False).write(dict(FIELDS))
    line = stream.getvalue().decode()
    assert stream.writes == 1  # no loop: written at once
    assert line.endswith(' INFO aioproxy.access: request_id=r-1 status=200 model="a b" cost=-\n')


@pytest.mark.parametrize(
    "made_up", ["a\nb", "x\r\n2026-01-01T00:00:00.000Z", "\x1b[2Jz", "a\u2028b", "a\x7fb"]
)
def test_a_clients_text_cannot_break_or_forge_a_text_line(made_up: str) -> None:
    """A model name or path comes from the client: one with a newline (or a terminal escape)
    is escaped, so that each request stays one line of printable text."""
    stream = Stream()
    AccessHandler(stream, json=False).write({**FIELDS, "model": made_up, "path": made_up})
    [line] = stream.getvalue().decode().splitlines()
    assert line.isprintable()
    assert f" model={json.dumps(made_up)} " in line and line.endswith(
        f" path={json.dumps(made_up)}"
    )


def test_entries_through_the_logging_api() -> None:
    record = logging.LogRecord(
        "aioproxy.access", logging.INFO, "x", 1, AccessEntry(dict(FIELDS)), None, None
    )
    line = json.loads(JSONFormatter().format(record))
    assert line["request_id"] == "r-1" and line["time"].endswith("Z")
    assert str(AccessEntry(dict(FIELDS))) == 'request_id=r-1 status=200 model="a b" cost=-'
    other = logging.LogRecord("aioproxy", logging.WARNING, "x", 1, "%s failed", ("it",), None)
    assert json.loads(JSONFormatter().format(other))["message"] == "it failed"


@pytest.fixture
def access_handlers() -> Iterator[None]:
    handlers, propagate = list(ACCESS_LOG.handlers), ACCESS_LOG.propagate
    yield
    ACCESS_LOG.handlers[:] = handlers
    ACCESS_LOG.propagate = propagate


@pytest.mark.usefixtures("access_handlers")
def test_written_directly_only_when_it_is_the_only_way_out() -> None:
    ACCESS_LOG.handlers[:] = []
    handler = AccessHandler(Stream(), json=True)
    ACCESS_LOG.addHandler(handler)
    ACCESS_LOG.propagate = True  # a parent's handlers would miss the lines
    assert direct_handler() is None
    ACCESS_LOG.propagate = False
    assert direct_handler() is handler
    ACCESS_LOG.addHandler(logging.NullHandler())
    assert direct_handler() is None


async def test_a_requests_line_is_written_in_its_fields_order_untracked_by_the_gc() -> None:
    line = AccessLine(
        None, "r-1", "POST", "/v1/chat/completions", "chat_completions", 200, None, "k", None,
        "gpt", "gpt#0", False, 1, 2, 0.5, None, 1.25, 0, 0, None, "127.0.0.1", None,
    )  # fmt: skip
    assert not gc.is_tracked(line)  # a request's line costs the collector nothing
    stream = Stream()
    handler = AccessHandler(stream, json=True)
    handler.write(line)
    handler.write(b'{"time":"t","level":"INFO"}')  # a record logged through the logging API
    await asyncio.sleep(0)
    first, second = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert list(first) == list(AccessLine.__struct_fields__)
    assert first["time"].endswith("Z") and first["duration_ms"] == 1.25 and first["cost"] == 0.5
    assert second == {"time": "t", "level": "INFO"}
    assert str(AccessEntry(line)).startswith("request_id=r-1 method=POST path=/v1/chat/completions")


async def test_many_lines_go_out_in_whole_lines_a_pipe_never_interleaves() -> None:
    """Under run.py --workers every worker writes to one stderr: a pipe keeps a write of at
    most PIPE_BUF bytes whole, and interleaves larger ones with the other workers' mid-line.
    So a big batch goes out in pieces of whole lines within PIPE_BUF (a longer line alone)."""
    stream = Stream()
    handler = AccessHandler(stream, json=True)
    for i in range(300):  # more than a write may hold, and than a batch holds
        handler.write({**FIELDS, "request_id": f"r-{i}", "model": "m" * (i % 97)})
    handler.write({**FIELDS, "request_id": "long", "model": "x" * (2 * select.PIPE_BUF)})
    await asyncio.sleep(0)
    pieces = [piece for piece in stream.flushed if piece]
    assert len(pieces) > 2
    for piece in pieces:
        assert piece.endswith(b"\n")
        assert len(piece) <= select.PIPE_BUF or piece.count(b"\n") == 1
    lines = [json.loads(line) for line in b"".join(pieces).splitlines()]
    assert [line["request_id"] for line in lines] == [*(f"r-{i}" for i in range(300)), "long"]


@pytest.mark.parametrize("as_json", [True, False])
async def test_a_batch_of_lines_reads_as_the_lines_one_at_a_time(
    as_json: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The observer's batch (write_all, its lines' time put in its text) writes what the same
    lines written one at a time would: a client's text shaped like a line's start included."""
    import time

    monkeypatch.setattr(time, "time", lambda: 1_900_000_000.25)

    def line(n: int, model: str) -> AccessLine:
        return AccessLine(
            None, f"r-{n}", "POST", "/v1/chat/completions", "chat_completions", 200, None, "k",
            None, model, "gpt#0", False, 1, 2, 0.5, None, 1.25, 0, 0, None, "127.0.0.1", None,
        )  # fmt: skip

    models = ['{"time":null,', 'a{"time":null,"x"', "gpt", "m" * select.PIPE_BUF]
    batch, one_at_a_time = Stream(), Stream()
    AccessHandler(batch, json=as_json).write_all([line(n, m) for n, m in enumerate(models)])
    handler = AccessHandler(one_at_a_time, json=as_json)
    for n, model in enumerate(models):
        handler.write(line(n, model))
    handler.flush()
    assert batch.getvalue() == one_at_a_time.getvalue()
    if as_json:
        written = [json.loads(text) for text in batch.getvalue().splitlines()]
        assert [fields["model"] for fields in written] == models
        assert {fields["time"] for fields in written} == {"2030-03-17T17:46:40.250Z"}
    held = Stream()  # a record held (till the loop turns) when the batch comes: written first
    handler = AccessHandler(held, json=as_json)
    handler.write(b"a record")
    handler.write_all([line(0, "gpt")])
    assert held.getvalue().startswith(b"a record\n") and held.writes == 1
