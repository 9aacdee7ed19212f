"""A request-log row's None and bool values are stored as SQL NULL and booleans, however the
driver is made to bind them (on SQLite: ints, and adapters that skip sqlite3's adaptation
protocol); and the writer's batching of built rows."""

from __future__ import annotations

import sqlalchemy as sa
from aiohttp.test_utils import make_mocked_request

from aioproxy import Call, Principal
from aioproxy.config import SpendConfig
from aioproxy.control import requestlog, schema
from aioproxy.control.cache import KeyCache
from aioproxy.control.engine import open_engine
from aioproxy.control.pricing import Pricing
from aioproxy.control.requestlog import LogRecord, RequestLog
from aioproxy.control.rows import Finished, RowBuilder
from aioproxy.outcome import Outcome
from aioproxy.payloads import decode_request
from aioproxy.routes import Kind


def _row(request_id: str, stream: bool, estimated: bool) -> tuple[object, ...]:
    values: dict[str, object] = dict.fromkeys(schema.REQUEST_COLUMNS)  # None unless set
    values.update(
        request_id=request_id,
        time=1.0,
        day="1970-01-01",
        kind="chat.completions",
        status=200,
        stream=stream,
        input_tokens=1,
        output_tokens=2,
        cached_tokens=0,
        reasoning_tokens=0,
        estimated=estimated,
        duration=0.5,
    )
    return tuple(values[name] for name in schema.REQUEST_COLUMNS)


async def test_none_and_bools_round_trip(db_url: str) -> None:
    engine = await open_engine(db_url)
    try:
        statements = (
            requestlog.insert_sql(engine.dialect.paramstyle),
            requestlog.insert_sql(engine.dialect.paramstyle, requestlog.ROWS_A_STATEMENT),
        )
        rows = [_row("a", True, False), _row("b", False, True)]
        async with engine.begin() as connection:
            await requestlog.insert_rows(connection, statements, rows)
        requests = schema.requests.c
        async with engine.connect() as connection:
            read = (
                await connection.execute(
                    sa.select(
                        requests.request_id,
                        requests.stream,
                        requests.estimated,
                        requests.key_id.is_(None),
                        requests.cost.is_(None),
                        requests.error_code.is_(None),
                    ).order_by(requests.request_id)
                )
            ).all()
            # Filtering on a boolean column finds what was written as one.
            streamed = (
                await connection.execute(
                    sa.select(requests.request_id).where(requests.stream.is_(True))
                )
            ).scalars()
            assert list(streamed) == ["a"]
        assert [tuple(row) for row in read] == [
            ("a", True, False, True, True, True),
            ("b", False, True, True, True, True),
        ]
    finally:
        await engine.dispose()


def _finished(n: int, stream: bool) -> Finished:
    fields, model, _ = decode_request(b'{"model": "m", "messages": []}')
    call = Call(
        Kind.CHAT_COMPLETIONS,
        make_mocked_request("POST", "/v1/chat/completions"),
        Principal(f"caller-{n}"),
        model,
        fields,
        stream,
    )
    outcome = Outcome(200, stream=stream)
    outcome.body = None if stream else b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
    outcome.elapsed = 0.25
    return Finished.of(call, outcome, 1_900_000_000.0 + n)


async def test_built_rows_flags_are_stored_as_booleans(db_url: str) -> None:
    """The row builder binds a row's flags as the driver takes them cheapest (ints on SQLite,
    where sqlite3 would adapt each bool); the database holds and returns booleans either way."""
    engine = await open_engine(db_url)
    try:
        cache = KeyCache(engine)
        log = RequestLog(engine, cache, SpendConfig(), build=RowBuilder(Pricing(), cache, True))
        log.add_finished(_finished(0, stream=True))
        log.add_finished(_finished(1, stream=False))
        await log.flush()
        requests = schema.requests.c
        async with engine.connect() as connection:
            read = (
                await connection.execute(
                    sa.select(requests.key_name, requests.stream, requests.estimated)
                    .where(requests.stream.is_(True) | requests.estimated.is_(False))
                    .order_by(requests.key_name)
                )
            ).all()
        # The stream reported no usage (estimated); the JSON answer did.
        assert [tuple(row) for row in read] == [
            ("caller-0", True, True),
            ("caller-1", False, False),
        ]
    finally:
        await engine.dispose()


async def test_rows_built_past_a_full_buffer_drop_the_oldest_counted(db_url: str) -> None:
    """Rows built a batch at a time are queued at once: past ``buffer_rows`` the oldest go,
    each counted, as when they were queued one by one."""
    engine = await open_engine(db_url)
    try:
        cache = KeyCache(engine)
        settings = SpendConfig(buffer_rows=3)
        log = RequestLog(engine, cache, settings, build=RowBuilder(Pricing(), cache, True))
        for n in range(5):
            log.add_finished(_finished(n, stream=False))
        log._build_rows()
        assert log.dropped == 2
        assert [record.values[4] for record in log.buffer] == ["caller-2", "caller-3", "caller-4"]
        log.add(LogRecord.of({**dict.fromkeys(schema.REQUEST_COLUMNS), "key_id": None,
                              "team_id": None, "time": 1.0}))  # fmt: skip
        assert log.dropped == 3 and len(log.buffer) == 3
    finally:
        await engine.dispose()


async def test_sqlite_takes_its_connection_without_a_ping(db_url: str) -> None:
    """A pooled connection to a server is pinged as it is taken (the server may have dropped
    it); a SQLite file's never is, and a ping is a statement and three driver-thread round
    trips at every write of the request log."""
    engine = await open_engine(db_url)
    try:
        assert engine.pool._pre_ping is (engine.dialect.name != "sqlite")
    finally:
        await engine.dispose()
