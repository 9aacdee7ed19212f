"""A request-log row's None and bool values are stored as SQL NULL and booleans, however the
driver is made to bind them (on SQLite: adapters that skip sqlite3's adaptation protocol)."""

from __future__ import annotations

import sqlalchemy as sa

from aioproxy.control import requestlog, schema
from aioproxy.control.engine import open_engine


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
