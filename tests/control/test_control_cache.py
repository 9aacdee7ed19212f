"""The key cache's poll: other instances' spend reaches it, in one read a table."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from tests.control.conftest import chat


async def test_refresh_takes_spend_and_last_use_in_one_read_a_table(start_control: Any) -> None:
    first, second = await start_control(), await start_control()
    created = await first.new_key(name="shared", max_budget=10)
    await second.plane.cache.refresh()  # the key reaches the second instance
    await chat(first.server, created["key"])
    await first.settle()  # the first instance's writer stored the spend and the last use
    stored = await first.admin("GET", f"/admin/keys/{created['id']}")
    assert stored["spend"] > 0

    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    sa.event.listen(second.plane.engine.sync_engine, "before_cursor_execute", seen)
    try:
        await second.plane.cache.refresh()
    finally:
        sa.event.remove(second.plane.engine.sync_engine, "before_cursor_execute", seen)

    entry = second.plane.cache.keys[created["id"]]
    assert entry.spend == pytest.approx(stored["spend"])
    assert entry.total_spend == pytest.approx(stored["total_spend"])
    assert entry.last_used_at is not None
    # the watermark, then the keys' figures and the teams': one statement each (the poller
    # may refresh meanwhile: the same statements again)
    assert len(set(statements)) == 3, statements
