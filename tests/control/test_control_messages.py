"""A Messages API call reaches spend and the request log as a chat call does: its input and
output tokens priced, streamed or not; count_tokens is logged but never charged."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.control.conftest import PRICE, Control


def _priced(prompt: int, completion: int) -> float:
    return (prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6


async def _rows(control: Control, key_id: str) -> list[dict[str, Any]]:
    await control.settle()
    return (await control.admin("GET", f"/admin/requests?limit=100&key={key_id}"))["data"]


def _claude(control: Control, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=str(control.server.make_url("/")), api_key=key, max_retries=0
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_messages_usage_is_priced_and_logged(control: Control, stream: bool) -> None:
    created = await control.new_key()
    client = _claude(control, created["key"])
    try:
        hello = [{"role": "user", "content": "hello there"}]
        if stream:
            async with client.messages.stream(
                model="gpt-test",
                max_tokens=20,
                messages=hello,  # type: ignore[arg-type]
            ) as events:
                message = await events.get_final_message()
        else:
            message = await client.messages.create(
                model="gpt-test",
                max_tokens=20,
                messages=hello,  # type: ignore[arg-type]
            )
    finally:
        await client.close()
    (row,) = await _rows(control, created["id"])
    usage = message.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert row["kind"] == "messages" and row["stream"] is stream
    assert row["input_tokens"] == usage.input_tokens
    assert row["output_tokens"] == usage.output_tokens
    assert row["estimated"] is False
    assert row["cost"] == pytest.approx(_priced(usage.input_tokens, usage.output_tokens))


async def test_count_tokens_is_never_charged(control: Control) -> None:
    created = await control.new_key()
    client = _claude(control, created["key"])
    try:
        counted = await client.messages.count_tokens(
            model="gpt-test", messages=[{"role": "user", "content": "hello there"}]
        )
    finally:
        await client.close()
    assert counted.input_tokens > 0
    (row,) = await _rows(control, created["id"])
    assert row["kind"] == "count_tokens" and row["estimated"] is False
    assert row["cost"] == 0 and row["input_tokens"] == 0
