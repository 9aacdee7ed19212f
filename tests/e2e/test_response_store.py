"""The Responses store behind a real proxy: who owns a response, what it costs on disk, what a
deletion or a failing disk does (issue #9 items 7, 8, 16, 17; #10.6 for echo)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import openai
import pytest
from aiohttp.test_utils import TestServer

from aioproxy import create_app
from aioproxy.testing import FakeOpenAI, assert_openai_error
from tests.e2e.test_bridges import ALICE, BOB, ChatOnlyPlugin, bridged_config
from tests.support import sdk

CAROL = "sk-carol-test"


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "responses.sqlite3"


@pytest.fixture
def start(aiohttp_server: Any, upstream_base: str, store_path: Path) -> Any:
    """A bridged proxy on ``store_path``, with ``keys`` as its virtual keys when given."""

    async def start_bridged(
        keys: list[dict[str, Any]] | None = None, **responses: Any
    ) -> TestServer:
        config = bridged_config(upstream_base, store_path, **responses)
        if keys is not None:
            config["auth"]["keys"] = keys
        plugins = [aioproxy_openai, aioproxy_echo, ChatOnlyPlugin()]
        app = create_app(config, plugins=plugins, load_entrypoints=False)
        return await aiohttp_server(app)

    return start_bridged


def stored_bytes(path: Path) -> int:
    with sqlite3.connect(path) as db:
        tables = [t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        total = sum(
            len(value)
            for table in tables
            for row in db.execute(f"SELECT * FROM {table}")
            for value in row
            if isinstance(value, (bytes, str))
        )
    db.close()
    return total


# -- #9.7: owned by the key, not by its name ----------------------------------------------------


async def test_a_key_that_takes_over_a_name_reads_nothing_of_the_old_key(
    start: Any, fake: FakeOpenAI
) -> None:
    """alice's key is replaced by carol's under the same name: carol gets none of alice's."""
    first = await start(keys=[{"key": ALICE, "name": "alice"}])
    async with sdk(first, ALICE) as client:
        kept = await client.responses.create(model="bridged", input="alice's secret")
    await first.close()

    second = await start(keys=[{"key": CAROL, "name": "alice"}, {"key": ALICE, "name": "old"}])
    async with sdk(second, CAROL) as client:
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(kept.id)
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(
                model="bridged", input="what was it?", previous_response_id=kept.id
            )
        with pytest.raises(openai.NotFoundError):
            await client.responses.delete(kept.id)
    assert caught.value.code == "previous_response_not_found"
    assert all("secret" not in json.dumps(r.body) for r in fake.requests[1:])
    async with sdk(second, ALICE) as client:  # the key itself, renamed, still owns it
        assert (await client.responses.retrieve(kept.id)).id == kept.id


async def test_removing_an_unnamed_key_hands_its_responses_to_no_one(start: Any) -> None:
    """key-0 is removed: the key that was key-1 is now named key-0, and reads nothing of it."""
    first = await start(keys=[{"key": ALICE}, {"key": BOB}])
    async with sdk(first, ALICE) as client:
        kept = await client.responses.create(model="bridged", input="key-0's secret")
    await first.close()

    second = await start(keys=[{"key": BOB}])
    async with sdk(second, BOB) as client:
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(kept.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(
                model="bridged", input="and?", previous_response_id=kept.id
            )


# -- #9.8: each turn once -------------------------------------------------------------------------


async def test_chained_requests_store_each_turn_once(
    start: Any, store_path: Path, fake: FakeOpenAI
) -> None:
    """20 chained requests of 50 KB each: about 3 MB on disk (the input, and the fake's echo of
    it in the turn and in the Response), where storing every history in each row took 32 MB."""
    proxy = await start()
    previous = None
    async with sdk(proxy, ALICE) as client:
        for i in range(20):
            response = await client.responses.create(
                model="bridged", input=f"turn {i} " + "x" * 50_000, previous_response_id=previous
            )
            previous = response.id
    assert stored_bytes(store_path) < 20 * 3 * 50_000 * 1.2
    assert len(fake.last.body["messages"]) == 39  # the whole conversation still goes upstream


# -- #9.17: a deleted response leaves every later conversation ------------------------------------


async def test_a_deleted_response_is_never_sent_upstream_again(
    start: Any, fake: FakeOpenAI
) -> None:
    proxy = await start()
    async with sdk(proxy, ALICE) as client:
        first = await client.responses.create(model="bridged", input="my password is hunter2")
        second = await client.responses.create(
            model="bridged", input="remember it", previous_response_id=first.id
        )
        await client.responses.delete(first.id)
        sent = len(fake.requests)
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(
                model="bridged", input="what is it?", previous_response_id=second.id
            )
        assert (await client.responses.retrieve(second.id)).id == second.id  # still readable
    assert len(fake.requests) == sent  # nothing went upstream
    assert caught.value.code == "previous_response_not_found"
    assert caught.value.param == "previous_response_id"  # type: ignore[attr-defined]
    assert first.id in caught.value.message and "deleted" in caught.value.message


# -- #9.16: a store that cannot be written or read -------------------------------------------------


def break_writes(path: Path) -> None:
    """From now on every insert fails, as on a full disk."""
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TRIGGER full BEFORE INSERT ON stored_responses"
            " BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
        )
    db.close()


async def test_an_unwritable_store_answers_store_false(start: Any, store_path: Path) -> None:
    proxy = await start()
    async with sdk(proxy, ALICE) as client:
        await client.responses.create(model="bridged", input="opens the store")
        break_writes(store_path)
        whole = await client.responses.with_raw_response.create(model="bridged", input="x")
        stream = await client.responses.create(model="bridged", input="y", stream=True)
        events = [event async for event in stream]
        echo = await client.responses.create(model="bridged-echo", input="z", stream=True)
        echo_events = [event async for event in echo]
        for response_id in (whole.parse().id, events[-1].response.id):
            with pytest.raises(openai.NotFoundError):  # a 404, not a 500
                await client.responses.retrieve(response_id)
    assert whole.parse().store is False
    assert "not stored" in whole.headers["warning"]
    assert events[-1].type == "response.completed" and events[-1].response.store is False
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert echo_events[-1].response.store is False  # a whole chat answer, streamed


async def test_an_unreadable_store_answers_503_in_openai_shape(
    start: Any, store_path: Path, http: aiohttp.ClientSession
) -> None:
    proxy = await start()
    async with sdk(proxy, ALICE) as client:
        kept = await client.responses.create(model="bridged", input="x")
    with sqlite3.connect(store_path) as db:
        db.execute("UPDATE stored_responses SET response = x'00ff'")
    db.close()
    headers = {"Authorization": f"Bearer {ALICE}"}
    async with http.get(proxy.make_url(f"/v1/responses/{kept.id}"), headers=headers) as response:
        error = await assert_openai_error(response, 503, "response_store_unavailable")
    assert kept.id in error["message"]
    body = {"model": "bridged", "input": "y", "previous_response_id": kept.id}
    async with http.post(proxy.make_url("/v1/responses"), json=body, headers=headers) as response:
        await assert_openai_error(response, 503, "response_store_unavailable")
    async with http.get(proxy.make_url("/health"), headers=headers) as response:
        assert response.status == 200  # still serving


# -- #10.6: echo goes through the bridge, so it stores --------------------------------------------


async def test_echo_stores_its_responses(aiohttp_server: Any, store_path: Path) -> None:
    config = {
        "models": [{"name": "echo", "provider": "echo"}],
        "database": {"url": f"sqlite:///{store_path}"},
    }
    app = create_app(config, plugins=[aioproxy_echo], load_entrypoints=False)
    proxy = await aiohttp_server(app)
    async with sdk(proxy, "any") as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.responses.create(
                model="echo", input="x", previous_response_id="resp_nonexistent"
            )
        first = await client.responses.create(model="echo", input="my name is Ada")
        assert first.store is True
        assert (await client.responses.retrieve(first.id)).output_text == "my name is Ada"
        second = await client.responses.create(
            model="echo", input="and you?", previous_response_id=first.id
        )
    assert caught.value.code == "previous_response_not_found"
    assert second.output_text == "and you?"
    assert second.usage is not None and second.usage.input_tokens == 10  # the history counted


async def test_a_history_past_max_body_size_is_refused_and_input_items_still_answer(
    aiohttp_server: Any, upstream_base: str, store_path: Path, fake: FakeOpenAI
) -> None:
    """A conversation is continued up to ``[server] max_body_size`` of stored turns; past it a
    400 naming previous_response_id, and input_items shows the response's own turn."""
    config = bridged_config(upstream_base, store_path)
    config["server"] = {"max_body_size": 200_000}
    app = create_app(config, plugins=[aioproxy_openai, ChatOnlyPlugin()], load_entrypoints=False)
    proxy = await aiohttp_server(app)
    previous = None
    async with sdk(proxy, ALICE) as client:
        for i in range(2):  # each turn stores ~120 KB: its input and the fake's echo of it
            response = await client.responses.create(
                model="bridged", input=f"turn {i} " + "x" * 60_000, previous_response_id=previous
            )
            previous = response.id
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(
                model="bridged", input="more", previous_response_id=previous
            )
        items = await client.responses.input_items.list(previous)
    assert caught.value.code == "history_too_large"
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert [item.content[0].text[:6] for item in items.data] == ["turn 1"]  # type: ignore[union-attr]
