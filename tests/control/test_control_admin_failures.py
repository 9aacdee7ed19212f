"""The admin API when the database fails it, on SQLite and PostgreSQL: OpenAI errors, never a
500, and the server serves on once the database is back."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from tests.control.conftest import Control, ended, lock_requests
from tests.control.test_control_admin import assert_error

# A trigger that makes the database refuse the request log rows of one model, as PostgreSQL
# refuses a row it cannot store: the batch holding one fails whole, and is retried.
_REFUSED_MODEL = "refused-by-the-database"
_TRIGGERS = {
    "sqlite": [
        f"""CREATE TRIGGER refuse BEFORE INSERT ON requests WHEN NEW.model = '{_REFUSED_MODEL}'
        BEGIN SELECT RAISE(ABORT, 'row refused'); END"""
    ],
    "postgresql": [
        f"""CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN
        IF NEW.model = '{_REFUSED_MODEL}' THEN RAISE EXCEPTION 'row refused'; END IF;
        RETURN NEW; END $$ LANGUAGE plpgsql""",
        "CREATE TRIGGER refuse BEFORE INSERT ON requests FOR EACH ROW EXECUTE FUNCTION refuse()",
    ],
}


async def test_a_batch_the_database_refuses_leaves_the_admin_api_answering(
    control: Control,
) -> None:
    """The admin API writes this instance's queued rows before it reads; a batch the
    database refuses stays queued for the writer, and the answer is what is written."""
    created = await control.new_key(name="reader")
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={"model": "gpt-test", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {created['key']}"},
    ) as response:
        assert response.status == 200
    await control.settle()
    async with control.plane.engine.begin() as connection:
        for statement in _TRIGGERS[connection.dialect.name]:
            await connection.exec_driver_sql(statement)
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={"model": _REFUSED_MODEL, "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {created['key']}"},
    ) as response:
        assert response.status == 404  # logged: its row is the one the database refuses
    rows = (await control.admin("GET", "/admin/requests"))["data"]
    assert [row["model"] for row in rows] == ["gpt-test"]
    spent = (await control.admin("GET", "/admin/spend?group_by=model"))["data"]
    assert [row["group"] for row in spent] == ["gpt-test"]
    # A row refused for its data is dropped alone (SQLite's ABORT is a constraint failure), its
    # spend still written; any other refusal (PostgreSQL's RAISE) keeps the batch for the
    # writer's retries.
    if control.plane.engine.dialect.name == "sqlite":
        assert control.plane.log.refused == 1 and not control.plane.log.buffer
    else:
        assert control.plane.log.buffer


@contextlib.contextmanager
def _sqlite_locked(path: str) -> Iterator[None]:
    """Another process's write transaction holding the file: writers wait, then give up."""
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def _postgres_closed(url: sa.URL) -> AsyncIterator[None]:
    """The database refusing connections, its open ones ended (as when it restarts)."""
    admin = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, database="postgres"
    )
    name = url.database
    try:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        yield
    finally:
        await admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await admin.close()


async def test_an_unavailable_database_answers_503(control: Control, db_url: str) -> None:
    url = make_url(db_url)
    key = await control.new_key(name="before")
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        # Only writes wait for the lock (WAL readers do not): one create, ~5 s busy timeout.
        with _sqlite_locked(url.database):
            refused = await control.admin("POST", "/admin/keys", {"name": "x"}, status=503)
            assert_error(refused, None, "database_unavailable")
    else:
        async with _postgres_closed(url):
            for method, path, body in [
                ("POST", "/admin/keys", {"name": "x"}),
                ("POST", "/admin/teams", {"name": "x"}),
                ("PATCH", f"/admin/keys/{key['id']}", {"rpm": 5}),
                ("DELETE", f"/admin/keys/{key['id']}", None),
                ("GET", "/admin/spend", None),
                ("GET", "/admin/requests", None),
            ]:
                refused = await control.admin(method, path, body, status=503)
                assert_error(refused, None, "database_unavailable")
    # the database is back: the server serves on
    made: dict[str, Any] = await control.new_key(name="after")
    assert made["name"] == "after"
    await control.admin("GET", "/admin/requests")


async def test_a_lock_held_elsewhere_answers_503_after_statement_timeout(
    start_control: Any, db_url: str
) -> None:
    """PostgreSQL: a read waiting on a lock another session holds fails after ``[database]
    statement_timeout`` (here a second) as the database's 503, where it waited for
    as long as the lock; the lock gone, the server answers again. (SQLite's writers wait
    their busy timeout: ``test_an_unavailable_database_answers_503``.)"""
    if make_url(db_url).get_backend_name() == "sqlite":
        pytest.skip("SQLite's lock waits are its busy timeout's")
    control = await start_control(database={"statement_timeout": 1.0})
    holder = await asyncpg.connect(db_url)
    try:
        locking = await lock_requests(holder)
        reading = control.admin("GET", "/admin/requests", status=503)
        refused = (await ended(reading, "the read still waits on the lock")).result()
        assert_error(refused, None, "database_unavailable")
        await locking.rollback()
        assert (await control.admin("GET", "/admin/requests"))["object"] == "list"
    finally:
        await holder.close()


async def test_a_change_meeting_another_instance_s_answers_409(control: Control) -> None:
    """The team was deleted by another instance, whose change this one has not polled yet:
    the key naming it is refused by the database's foreign key, as a conflict."""
    team = await control.admin("POST", "/admin/teams", {"name": "gone"}, status=201)
    async with control.plane.engine.begin() as connection:  # the other instance's delete
        await connection.execute(sa.text("DELETE FROM teams WHERE id = :id"), {"id": team["id"]})
    refused = await control.admin(
        "POST", "/admin/keys", {"name": "k", "team": team["id"]}, status=409
    )
    assert_error(refused, None, "conflict")
