"""Reading SSE answers as a client does: each event's data, decoded, comments skipped."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec

DONE_DATA = "[DONE]"  # how read_sse gives the stream's closing `data: [DONE]`
_COMMENT = object()
_decode = msgspec.json.decode


def _parse_event(block: str) -> Any:
    name, data = None, []
    for line in block.split("\n"):
        if line.startswith(":"):
            continue  # a comment, e.g. the proxy's keep-alive
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            name = value
        elif field == "data":
            data.append(value)
        else:
            assert field in ("id", "retry"), f"unknown SSE line {line!r} in event {block!r}"
    if not data:
        assert name is None, f"event {name!r} has no data line"
        return _COMMENT
    payload = "\n".join(data)
    if payload == DONE_DATA:
        return DONE_DATA
    try:
        obj = _decode(payload)
    except msgspec.DecodeError:
        raise AssertionError(f"event data is not JSON: {payload[:300]!r}") from None
    if name is not None:
        kind = obj.get("type") if isinstance(obj, dict) else None
        assert kind == name, f"event named {name!r} carries data of type {kind!r}"
    return obj


def parse_sse(body: bytes) -> list[Any]:
    """Each event's data in an SSE body: decoded JSON, or ``DONE_DATA``; comments are skipped."""
    text = body.decode("utf-8")
    ended = not text or text.endswith("\n\n")
    assert ended, f"the stream does not end with a blank line: {text[-200:]!r}"
    events = (_parse_event(block) for block in text.split("\n\n")[:-1] if block)
    return [event for event in events if event is not _COMMENT]


async def read_sse(response: aiohttp.ClientResponse) -> list[Any]:
    """Read a 200 ``text/event-stream`` answer to its end, as :func:`parse_sse` gives it."""
    if response.status != 200:
        text = await response.text()
        raise AssertionError(f"expected a 200 stream, got {response.status}: {text}")
    assert response.content_type == "text/event-stream", f"stream sent as {response.content_type}"
    return parse_sse(await response.read())


async def first_event(response: aiohttp.ClientResponse) -> Any:
    """The data of a stream's first event (skipping comments), without waiting for the rest."""
    while True:
        block = await response.content.readuntil(b"\n\n")
        assert block.endswith(b"\n\n"), f"the stream ended before its first event: {block!r}"
        event = _parse_event(block.decode("utf-8")[:-2])
        if event is not _COMMENT:
            return event
