"""The Responses store lives in the control plane's database (issue 12, item 1): a response
made through one instance is read back, and chained onto, through another on that database."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from aioproxy.control.engine import open_engine
from aioproxy.control.plane import plane_key
from tests.control.conftest import Control
from tests.support import sdk


async def rows(control: Control, statement: str) -> list[Any]:
    async with control.plane.engine.connect() as connection:
        return list((await connection.exec_driver_sql(statement)).all())


async def test_a_second_instance_on_the_database_reads_stored_responses(
    start_control: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the old store's file would land here
    first, second = await start_control(), await start_control()
    async with sdk(first.server) as client:
        bridged = await client.responses.create(model="echo", input="my name is Ada")
        native = await client.responses.create(model="gpt-test", input="hello")
    async with sdk(second.server) as client:
        again = await client.responses.retrieve(bridged.id)
        chained = await client.responses.create(
            model="echo", input="and you?", previous_response_id=bridged.id
        )
        native_again = await client.responses.retrieve(native.id)  # routed by the shared record
    assert again.output_text == "my name is Ada"
    assert chained.usage is not None and chained.usage.input_tokens == 10  # the history counted
    assert native_again.id == native.id
    stored = await rows(first, "SELECT id, previous_id FROM stored_responses ORDER BY seq")
    assert stored == [(bridged.id, None), (chained.id, bridged.id)]
    assert await rows(second, "SELECT id FROM native_responses") == [(native.id,)]
    assert list(workdir.iterdir()) == []  # no file of its own


async def test_the_old_store_path_is_deprecated_with_a_warning(
    start_control: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "aioproxy-responses.sqlite3"
    control = await start_control(responses={"store_path": str(old), "ttl": 60})
    async with sdk(control.server) as client:
        created = await client.responses.create(model="echo", input="hi")
        assert (await client.responses.retrieve(created.id)).output_text == "hi"
    assert "[responses] store_path is deprecated and ignored" in caplog.text
    assert not old.exists()  # the setting is not used: the rows are in the database
    assert await rows(control, "SELECT id FROM stored_responses") == [(created.id,)]


async def test_without_the_database_plugin_the_store_opens_the_database_itself(
    start_control: Any, db_url: str
) -> None:
    """An operator who replaces the control plane keeps stored responses in ``[database] url``."""
    control = await start_control(
        plugins_config={"disable": ["database", "keyauth", "limits", "spend"]}
    )
    assert plane_key not in control.server.app
    async with sdk(control.server) as client:
        created = await client.responses.create(model="echo", input="hi")
        again = await client.responses.retrieve(created.id)
    assert again.output_text == "hi"
    engine = await open_engine(db_url)
    try:
        async with engine.connect() as connection:
            found = (await connection.exec_driver_sql("SELECT id FROM stored_responses")).all()
    finally:
        await engine.dispose()
    assert [tuple(row) for row in found] == [(created.id,)]
