"""A new database's schema is created from the tables' definitions, without Alembic: it must be
exactly what the shipped migrations build, on SQLite and on PostgreSQL."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from aioproxy.control.engine import SCHEMA_HEAD, _alembic_config, _async_url, open_engine

from .conftest import _create_database


def _shape(connection: sa.Connection) -> dict[str, Any]:
    """Each table: its columns in order, keys, indexes and constraints, and its rows."""
    inspector = sa.inspect(connection)
    shape: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names()):
        shape[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"], c.get("default"))
                for c in inspector.get_columns(table)
            ],
            "primary key": inspector.get_pk_constraint(table),
            "foreign keys": inspector.get_foreign_keys(table),
            "indexes": sorted(inspector.get_indexes(table), key=lambda i: str(i["name"])),
            "unique": sorted(inspector.get_unique_constraints(table), key=str),
            "checks": sorted(inspector.get_check_constraints(table), key=str),
            # and what the migrations put in (the change watermark's row, the version)
            "rows": sorted(connection.exec_driver_sql(f"SELECT * FROM {table}").all()),
        }
    return shape


def _migrate_with_alembic(connection: sa.Connection) -> None:
    from alembic import command

    command.upgrade(_alembic_config(connection), "head")


async def _reflect(url: str, build: Any = None) -> dict[str, Any]:
    engine = create_async_engine(_async_url(url))
    try:
        async with engine.begin() as connection:
            if build is not None:
                await connection.run_sync(build)
            return await connection.run_sync(_shape)
    finally:
        await engine.dispose()


@pytest.mark.empty_database  # opening it creates the schema
async def test_a_new_database_gets_the_schema_the_migrations_build(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    await (await open_engine(db_url)).dispose()
    created = await _reflect(db_url)
    if db_url.startswith("sqlite"):
        other = f"sqlite:///{tmp_path / 'by-alembic.sqlite3'}"
    else:
        port = request.getfixturevalue("postgres_port")
        other = await _create_database(port, "a_" + secrets.token_hex(6))
    migrated = await _reflect(other, _migrate_with_alembic)
    assert created == migrated
    assert created["alembic_version"]["rows"] == [(SCHEMA_HEAD,)]
