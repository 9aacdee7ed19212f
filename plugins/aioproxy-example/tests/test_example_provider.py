"""The example provider, driven through aioproxy against the fake toy API of conftest.py."""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING

import aioproxy_example
import pytest

from aioproxy import ConfigError
from aioproxy.testing import (
    HELLO,
    ProxyUnderTest,
    assert_chat_chunks,
    assert_error_object,
    assert_openai_error,
    check_cancellation,
    check_chat,
    check_chat_stream,
    check_embeddings,
    check_error_mapping,
    read_sse,
)

if TYPE_CHECKING:  # conftest is pytest's to import; its fixtures come in by name
    from conftest import FakeToy, StartToyProxy


async def test_chat(proxy: ProxyUnderTest, toy: FakeToy) -> None:
    assert await check_chat(proxy, "toy") == "toy says: Say hello to the kit"
    assert toy.requests[-1] == {
        "model": "toy-1",
        "prompt": "Say hello to the kit",
        "max_words": 256,
        "stream": False,
    }


async def test_chat_stream(proxy: ProxyUnderTest) -> None:
    assert await check_chat_stream(proxy, "toy") == "toy says: Say hello to the kit"


async def test_embeddings(proxy: ProxyUnderTest, toy: FakeToy) -> None:
    # Floats, base64 (little-endian float32s) and through the SDK, which asks for base64.
    vectors = await check_embeddings(proxy, "toy", inputs=["hello", "toy kit"], dims=3)
    assert vectors == [[5.0, 1.0, 0.5], [7.0, 2.0, 0.5]]
    assert toy.requests[-1] == {"model": "toy-1", "texts": ["hello", "toy kit"]}


@pytest.mark.parametrize(
    ("status", "seen", "code"),
    [
        (429, 429, "rate_limit_exceeded"),
        (400, 400, None),
        (422, 422, None),
        (401, 502, "upstream_auth_failed"),
        (404, 502, "upstream_model_not_found"),
        (500, 500, "upstream_error"),
        (503, 503, "upstream_error"),
    ],
)
async def test_errors(
    proxy: ProxyUnderTest, toy: FakeToy, status: int, seen: int, code: str | None
) -> None:
    await check_error_mapping(proxy, "toy", lambda: toy.faults.append(status), seen, code=code)


async def test_a_rate_limit_keeps_its_retry_after(proxy: ProxyUnderTest, toy: FakeToy) -> None:
    toy.faults.append(429)
    body = {"model": "toy", "messages": HELLO}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        await assert_openai_error(response, 429, "rate_limit_exceeded")
        assert response.headers["Retry-After"] == "7"


async def test_client_leaving_closes_the_upstream(proxy: ProxyUnderTest, toy: FakeToy) -> None:
    toy.delay = 0.02
    long = [{"role": "user", "content": "word " * 200}]
    await check_cancellation(proxy, "toy", lambda: toy.in_flight, messages=long)


async def test_upstream_hanging_up_mid_stream_is_an_error_event(
    proxy: ProxyUnderTest, toy: FakeToy
) -> None:
    toy.faults.append("cut")
    body = {"model": "toy", "messages": HELLO, "stream": True}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        events = await read_sse(response)
    assert_error_object(events[-1], code="upstream_disconnected")  # the status was already 200
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", "toy", " says:"]


async def test_settings_cap_the_answer(start_toy_proxy: StartToyProxy) -> None:
    proxy = await start_toy_proxy(max_words=2)
    async with proxy.openai() as client:
        done = await client.chat.completions.create(model="toy", messages=HELLO)
        assert (done.choices[0].message.content, done.choices[0].finish_reason) == (
            "toy says:",
            "length",
        )
        stream = await client.chat.completions.create(
            model="toy", messages=HELLO, max_tokens=1, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert assert_chat_chunks(chunks, done=False) == "toy"
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_bad_settings_fail_at_start_up(start_toy_proxy: StartToyProxy) -> None:
    with pytest.raises(ConfigError, match=r"model 'toy': invalid example settings: .*max_words"):
        await start_toy_proxy(max_words=0)


def test_installed_under_the_aioproxy_entry_point_group() -> None:
    (entry,) = importlib.metadata.entry_points(group="aioproxy", name="example")
    assert entry.load() is aioproxy_example


async def test_the_toys_words_never_show_its_key(proxy: ProxyUnderTest, toy: FakeToy) -> None:
    toy.fault_words = "bad key toy-secret ({})"  # the toy echoes the key it was sent
    toy.faults.append(400)
    body = {"model": "toy", "messages": HELLO}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        error = await assert_openai_error(response, 400)
    assert "bad key" in error["message"] and "toy-secret" not in error["message"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("messages", [{"role": "user", "content": [{"text": 5}]}]), ("stream_options", 5)],
)
async def test_a_field_of_the_wrong_type_is_a_400(
    proxy: ProxyUnderTest, toy: FakeToy, field: str, value: object
) -> None:
    body = {"model": "toy", "messages": HELLO, "stream": True, field: value}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        error = await assert_openai_error(response, 400)
    assert error["param"].startswith(field) and toy.requests == []


async def test_a_line_longer_than_the_readers_buffer_streams(proxy: ProxyUnderTest) -> None:
    word = "w" * 300_000  # past aiohttp's readline limit (128 KiB)
    body = {"model": "toy", "messages": [{"role": "user", "content": word}], "stream": True}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        events = await read_sse(response)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]).endswith(
        word
    )


async def test_a_trickle_that_never_ends_a_line_is_a_timeout(
    start_toy_proxy: StartToyProxy, toy: FakeToy
) -> None:
    proxy = await start_toy_proxy(timeouts={"read": 0.2})
    toy.trickle = True
    body = {"model": "toy", "messages": HELLO, "stream": True}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        events = await read_sse(response)
    toy.trickle = False
    assert "error" in events[-1] and "in 0.2 s" in events[-1]["error"]["message"]
