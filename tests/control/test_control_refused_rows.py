"""Requests refused before a Call used to exist (their body unreadable, too large, too slow, not a
request of its kind) are in the request log with their key, on SQLite and PostgreSQL; a failed
authentication is not (counted in the metrics instead), and nothing presented as a key is kept."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest

from aioproxy import hookimpl
from aioproxy.testing import assert_openai_error
from tests.control.conftest import CHAT, Control
from tests.support import sdk

JSON = {"Content-Type": "application/json"}


async def rows(control: Control) -> list[dict[str, Any]]:
    await control.settle()
    return list((await control.admin("GET", "/admin/requests?limit=100"))["data"])


async def keyed(control: Control) -> tuple[dict[str, Any], dict[str, Any]]:
    """A database key in a team, and the team."""
    team = await control.admin("POST", "/admin/teams", {"name": "refusers"}, status=201)
    return await control.new_key(name="refused-key", team=team["id"]), team


def assert_refused_row(
    row: dict[str, Any],
    key: dict[str, Any],
    team: dict[str, Any],
    *,
    kind: str,
    status: int,
    code: str,
    model: str | None,
) -> None:
    assert (row["key_id"], row["key_name"], row["team_id"]) == (
        key["id"],
        "refused-key",
        team["id"],
    )
    assert (row["kind"], row["status"], row["error_code"], row["model"]) == (
        kind,
        status,
        code,
        model,
    )
    assert (row["input_tokens"], row["output_tokens"], row["cost"]) == (0, 0, None)
    assert row["deployment"] is None and row["estimated"] is False and row["duration"] >= 0


async def refuse(control: Control, key: dict[str, Any], data: Any, status: int, code: str) -> None:
    """POST ``data`` as a chat completion with ``key``: refused with ``status`` and ``code``."""
    async with control.session.post(
        control.url("/v1/chat/completions"),
        data=data,
        headers={**JSON, "Authorization": f"Bearer {key['key']}", "x-request-id": "refused-1"},
    ) as response:
        await assert_openai_error(response, status, code)


@pytest.mark.parametrize(
    ("body", "code", "model"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_body", None),
        (b'{"messages": []}', "missing_required_parameter", None),
        (b'{"model": "gpt-test"}', "missing_required_parameter", "gpt-test"),
        (b'{"model": "gpt-test", "messages": [], "stream": "yes"}', "invalid_type", "gpt-test"),
    ],
)
async def test_a_malformed_body_is_logged_with_its_key(
    control: Control, body: bytes, code: str, model: str | None
) -> None:
    key, team = await keyed(control)
    await refuse(control, key, body, 400, code)
    (row,) = await rows(control)
    assert_refused_row(row, key, team, kind="chat_completions", status=400, code=code, model=model)
    assert row["request_id"] == "refused-1"


async def test_a_refusal_the_sdk_gets_is_logged(control: Control) -> None:
    key, team = await keyed(control)
    async with sdk(control.server, key["key"]) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="embed", input="x", extra_body={"input": 7})
    await assert_openai_error(caught.value, 400, "invalid_type")
    (row,) = await rows(control)
    assert_refused_row(
        row, key, team, kind="embeddings", status=400, code="invalid_type", model="embed"
    )


def _too_large() -> bytes:
    return json.dumps({**CHAT, "padding": "x" * 4096}).encode()


def _too_slow() -> AsyncIterator[bytes]:
    async def stalled() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-test", '
        await asyncio.Event().wait()  # the rest never comes: the proxy gives up on it

    return stalled()


@pytest.mark.parametrize(
    ("server", "body", "status", "code"),
    [
        ({"max_body_size": 1024}, _too_large, 413, "request_too_large"),  # aiohttp's own 413
        ({"body_timeout": 0.05}, _too_slow, 408, "request_timeout"),
    ],
)
async def test_a_body_refused_as_it_is_read_is_logged(
    start_control: Any, server: dict[str, Any], body: Callable[[], Any], status: int, code: str
) -> None:
    control = await start_control(server=server)
    key, team = await keyed(control)
    await refuse(control, key, body(), status, code)
    (row,) = await rows(control)
    assert_refused_row(
        row, key, team, kind="chat_completions", status=status, code=code, model=None
    )


async def test_anthropic_and_azure_routes_log_refusals(control: Control) -> None:
    """The Messages route answers in Anthropic's shape, Azure's names the model in its path."""
    key, team = await keyed(control)
    headers = {**JSON, "Authorization": f"Bearer {key['key']}"}
    async with control.session.post(
        control.url("/v1/messages"), data=b'{"model": "gpt-test"}', headers=headers
    ) as response:
        assert response.status == 400
        assert (await response.json())["type"] == "error"
    async with control.session.post(
        control.url("/openai/deployments/gpt-test/chat/completions?api-version=2024-10-21"),
        data=b"{not json",
        headers=headers,
    ) as response:
        await assert_openai_error(response, 400, "invalid_json")
    messages, azure = sorted(await rows(control), key=lambda row: row["kind"] != "messages")
    assert_refused_row(
        messages,
        key,
        team,
        kind="messages",
        status=400,
        code="missing_required_parameter",
        model="gpt-test",
    )
    assert_refused_row(
        azure, key, team, kind="chat_completions", status=400, code="invalid_json", model="gpt-test"
    )


@pytest.mark.parametrize("presented", ["sk-not-a-key-0123456789abcdef", None])
async def test_a_failed_authentication_is_not_logged(
    control: Control, presented: str | None
) -> None:
    """401s have no key to log under: a flood of them writes nothing (their count is in the
    metrics), and what was presented as a key is kept nowhere."""
    revoked = await control.new_key(name="revoked")
    await control.admin("PATCH", f"/admin/keys/{revoked['id']}", {"disabled": True})
    for key in (presented, revoked["key"]):
        headers = {**JSON, **({"Authorization": f"Bearer {key}"} if key else {})}
        async with control.session.post(
            control.url("/v1/chat/completions"), data=b"{not json", headers=headers
        ) as response:
            await assert_openai_error(response, 401)
    assert await rows(control) == []


async def test_a_client_gone_mid_upload_is_logged(start_control: Any) -> None:
    """The client closes its connection halfway through its body: a 499 row with its key, and
    the time it took (the call's clock starts before the body is read)."""
    asked = asyncio.Event()

    class Watch:
        @hookimpl(tryfirst=True)
        def authenticate(self) -> None:
            asked.set()  # then defers: the key is the database's

    control = await start_control(plugins=(Watch(),))
    key, team = await keyed(control)
    _, writer = await asyncio.open_connection(control.server.host, control.server.port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n"
        b"Authorization: Bearer " + key["key"].encode() + b'\r\n\r\n{"model": '
    )
    await writer.drain()
    await asyncio.wait_for(asked.wait(), 30)  # a safety net only
    writer.close()
    async with asyncio.timeout(30):  # a safety net only: the row comes when the task ends
        while not (found := await rows(control)):
            await asyncio.sleep(0.01)
    (row,) = found
    assert_refused_row(
        row,
        key,
        team,
        kind="chat_completions",
        status=499,
        code="client_disconnected",
        model=None,
    )
