"""The bedrock provider through aioproxy, against the fake Bedrock (SigV4 checked there), with
raw HTTP and the official openai SDK."""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aioproxy_bedrock
import openai
import pytest
from aioproxy_bedrock import BedrockProvider, BedrockSettings
from botocore.credentials import RefreshableCredentials

from aioproxy import Call, ConfigError, Deployment, Outcome, hookimpl, testing

from .conftest import (
    ACCESS_KEY_ID,
    API_KEY,
    CHAT_MODEL_ID,
    REGION,
    SECRET_KEY,
    fake_bedrock,
    model,
)

TOOL_INPUT = fake_bedrock.TOOL_INPUT
WEATHER_TOOL = testing.weather_tool()


async def test_chat(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    assert await testing.check_chat(proxy, "claude") == "Hello! You said: Say hello to the kit"
    sent = fake.last
    assert sent.path == f"/model/{CHAT_MODEL_ID}/converse"
    assert sent.body == {
        "messages": [{"role": "user", "content": [{"text": "Say hello to the kit"}]}]
    }
    assert fake.signed_with[-1] == ACCESS_KEY_ID


async def test_chat_stream(proxy: testing.ProxyUnderTest) -> None:
    assert (
        await testing.check_chat_stream(proxy, "claude") == "Hello! You said: Say hello to the kit"
    )


async def test_bridged_endpoints(proxy: testing.ProxyUnderTest) -> None:
    assert "Say hello" in await testing.check_completion(proxy, "claude")
    assert "Say hello" in await testing.check_responses(proxy, "claude")


async def test_the_model_id_is_one_encoded_path_segment(
    aiohttp_server: Any, fake: Any, api_base: str
) -> None:
    # An inference profile's ARN holds '/' and ':': both stay inside the segment, encoded, and
    # the signature (checked by the fake) is over the path as it is sent.
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-v1:0"
    config = {"models": [model("profile", arn, api_base)]}
    proxy = await testing.start_proxy(aiohttp_server, config, [aioproxy_bedrock])
    await testing.check_chat(proxy, "profile")
    assert fake.raw_paths[-1] == (
        "/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Ainference-profile"
        "%2Fus.anthropic.claude-v1%3A0/converse"
    )
    assert fake.signed_with[-1] == ACCESS_KEY_ID


async def test_a_bedrock_api_key_is_a_bearer_token(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    assert await testing.check_chat(proxy, "keyed") == "Hello! You said: Say hello to the kit"
    assert fake.signed_with[-1] == "bearer"
    assert fake.last.headers["authorization"] == f"Bearer {API_KEY}"


async def test_an_api_key_with_an_api_base_needs_no_region(
    aiohttp_server: Any, fake: Any, api_base: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    settings = {"region": None, "aws_access_key_id": None}
    entry = model("keyed", CHAT_MODEL_ID, api_base, api_key=API_KEY, settings=settings)
    proxy = await testing.start_proxy(aiohttp_server, {"models": [entry]}, [aioproxy_bedrock])
    assert await testing.check_chat(proxy, "keyed") == "Hello! You said: Say hello to the kit"
    assert fake.signed_with[-1] == "bearer"


async def test_the_request_translated(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
        {"role": "user", "content": "Hello there, how are you"},
    ]
    body = {
        "model": "claude",
        "messages": messages,
        "max_tokens": 3,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop": ["never"],
        "user": "u-1",  # no Converse meaning: left out (Converse refuses unknown fields)
    }
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        answer = await response.json()
    assert response.status == 200, answer
    assert fake.last.body == {
        "messages": [{"role": "user", "content": [{"text": "Hello there, how are you"}]}],
        "system": [{"text": "Be brief."}, {"text": "Be kind."}],
        "inferenceConfig": {
            "maxTokens": 3,
            "temperature": 0.5,
            "topP": 0.9,
            "stopSequences": ["never"],
        },
    }
    assert answer["choices"][0]["message"]["content"] == "Hello! You said:"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["prompt_tokens"] == 7
    assert answer["usage"]["completion_tokens"] == 3
    assert answer["id"] == "chatcmpl-req-fake-1"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_tool_round_trip_through_the_sdk(
    proxy: testing.ProxyUnderTest, fake: Any, stream: bool
) -> None:
    question = [{"role": "user", "content": "Weather in Paris?"}]
    async with proxy.openai() as client:
        if stream:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="claude", messages=question, tools=[WEATHER_TOOL], stream=True
                )
            ]
            calls: dict[int, dict[str, str]] = {}
            finish = None
            for chunk in chunks:
                for choice in chunk.choices:
                    finish = choice.finish_reason or finish
                    for call in choice.delta.tool_calls or ():
                        entry = calls.setdefault(call.index, {"arguments": ""})
                        if call.id:
                            entry["id"], entry["name"] = call.id, call.function.name
                        entry["arguments"] += call.function.arguments or ""
            assert finish == "tool_calls"
            call_id, name, arguments = calls[0]["id"], calls[0]["name"], calls[0]["arguments"]
        else:
            answer = await client.chat.completions.create(
                model="claude", messages=question, tools=[WEATHER_TOOL], tool_choice="required"
            )
            choice = answer.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.content == "Let me check that."
            tool_call = choice.message.tool_calls[0]
            call_id, name = tool_call.id, tool_call.function.name
            arguments = tool_call.function.arguments
        assert (call_id, name, json.loads(arguments)) == (
            "tooluse_fake1",
            "get_weather",
            TOOL_INPUT,
        )
        sent = fake.last.body["toolConfig"]
        assert (
            sent["tools"][0]["toolSpec"]["inputSchema"]["json"]
            == WEATHER_TOOL["function"]["parameters"]
        )
        assert sent.get("toolChoice") == (None if stream else {"any": {}})
        follow_up = [
            *question,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id, "content": "18 degrees and sunny"},
        ]
        answer = await client.chat.completions.create(
            model="claude", messages=follow_up, tools=[WEATHER_TOOL]
        )
    assert answer.choices[0].message.content == "The tool said: 18 degrees and sunny"
    turns = fake.last.body["messages"]
    assert turns[1] == {
        "role": "assistant",
        "content": [{"toolUse": {"toolUseId": call_id, "name": name, "input": TOOL_INPUT}}],
    }
    assert turns[2] == {
        "role": "user",
        "content": [
            {"toolResult": {"toolUseId": call_id, "content": [{"text": "18 degrees and sunny"}]}}
        ],
    }


async def test_images_and_documents(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    content = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{testing.PNG_PIXEL}"}},
        {
            "type": "file",
            "file": {
                "filename": "report 2024.pdf",
                "file_data": f"data:application/pdf;base64,{testing.PNG_PIXEL}",
            },
        },
    ]
    async with proxy.openai() as client:
        answer = await client.chat.completions.create(
            model="claude", messages=[{"role": "user", "content": content}]
        )
    assert answer.choices[0].message.content == (
        "Hello! You said: What is this? I see 1 image(s). I read 1 document(s)."
    )
    blocks = fake.last.body["messages"][0]["content"]
    assert blocks[1] == {"image": {"format": "png", "source": {"bytes": testing.PNG_PIXEL}}}
    assert blocks[2] == {
        "document": {"format": "pdf", "name": "report 2024", "source": {"bytes": testing.PNG_PIXEL}}
    }


async def test_an_image_by_http_url_is_refused(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    content = [{"type": "image_url", "image_url": {"url": "http://169.254.169.254/x.png"}}]
    body = {"model": "claude", "messages": [{"role": "user", "content": content}]}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        error = await testing.assert_openai_error(response, 400)
    assert error["param"] == "messages[0].content[0].image_url.url"
    assert fake.requests == []


@pytest.mark.parametrize(
    ("name", "dims", "expected"),
    [
        ("titan", 2, [[5.0, 1.0], [7.0, 2.0]]),
        ("cohere", None, [[5.0, 1.0, 0.5], [7.0, 2.0, 0.5]]),
    ],
)
async def test_embeddings(
    proxy: testing.ProxyUnderTest,
    fake: Any,
    name: str,
    dims: int | None,
    expected: list[list[float]],
) -> None:
    if dims is None:
        vectors = await testing.check_embeddings(proxy, name, inputs=["hello", "toy kit"])
    else:  # the kit's checks send no dimensions: a raw request does
        body = {"model": name, "input": ["hello", "toy kit"], "dimensions": dims}
        async with proxy.http() as http, http.post("/v1/embeddings", json=body) as response:
            answer = await response.json()
        vectors = [d["embedding"] for d in answer["data"]]
        # Titan takes one text a call: the two calls run side by side, so either may come last.
        bodies = sorted((r.body for r in fake.requests[-2:]), key=lambda body: body["inputText"])
        assert bodies == [
            {"inputText": "hello", "dimensions": 2},
            {"inputText": "toy kit", "dimensions": 2},
        ]
        assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
        await testing.check_embeddings(proxy, name, inputs=["hello", "toy kit"])
    assert vectors == expected
    assert fake.last.path.endswith("/invoke")


async def test_cohere_embeddings_count_tokens_from_the_header(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    body = {"model": "cohere", "input": ["one two", "three"]}
    async with proxy.http() as http, http.post("/v1/embeddings", json=body) as response:
        answer = await response.json()
    assert answer["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert fake.last.body == {
        "texts": ["one two", "three"],
        "input_type": "search_document",
        "embedding_types": ["float"],
    }


ERRORS = [  # (Bedrock's status, its exception, the client's status, its code)
    (429, "ThrottlingException", 429, "rate_limit_exceeded"),
    (400, "ValidationException", 400, None),
    (403, "AccessDeniedException", 403, "access_denied"),
    (429, "ModelNotReadyException", 503, "model_not_ready"),
    (503, "ServiceUnavailableException", 503, "service_unavailable"),
    (500, "InternalServerException", 500, "upstream_error"),
    (404, "ResourceNotFoundException", 502, "upstream_model_not_found"),
    (408, "ModelTimeoutException", 504, "upstream_timeout"),
    (424, "ModelErrorException", 502, "model_error"),
    (400, "ServiceQuotaExceededException", 400, None),
    (403, "UnrecognizedClientException", 502, "upstream_auth_failed"),
    (403, "InvalidSignatureException", 502, "upstream_auth_failed"),
]


@pytest.mark.parametrize(("status", "kind", "seen", "code"), ERRORS)
async def test_error_mapping(
    proxy: testing.ProxyUnderTest, fake: Any, status: int, kind: str, seen: int, code: str | None
) -> None:
    error = await testing.check_error_mapping(
        proxy, "claude", lambda: fake.faults.append(("status", status, kind)), seen, code=code
    )
    assert SECRET_KEY not in json.dumps(error)


async def test_a_throttled_request_keeps_its_retry_after(
    proxy: testing.ProxyUnderTest, fake: Any
) -> None:
    fake.faults.append(("status", 429, "ThrottlingException"))
    body = {"model": "claude", "messages": testing.HELLO}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        await testing.assert_openai_error(response, 429, "rate_limit_exceeded")
        assert response.headers["Retry-After"] == "7"


STREAM_ERRORS = [  # a stream's exception message, and the client's status and code
    ("throttlingException", 429, "rate_limit_exceeded"),
    ("validationException", 400, None),
    ("serviceUnavailableException", 503, "service_unavailable"),
    ("modelStreamErrorException", 502, "model_error"),
    ("internalServerException", 500, "upstream_error"),
]


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
@pytest.mark.parametrize(("kind", "seen", "code"), STREAM_ERRORS)
async def test_a_stream_exception(
    proxy: testing.ProxyUnderTest, fake: Any, kind: str, seen: int, code: str | None, first: bool
) -> None:
    """First in the stream, it is the answer's status; later, an error event ends the stream."""
    fake.faults.append(("exception_first" if first else "exception", kind))
    body = {"model": "claude", "messages": testing.HELLO, "stream": True}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        if first:
            await testing.assert_openai_error(response, seen, code)
            return
        assert response.status == 200
        events = await testing.read_sse(response)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    error = events[-1]["error"]
    assert error["code"] == code and f"injected {kind}" in error["message"]


@pytest.mark.parametrize(
    ("fault", "code"), [(("bad_crc", 3), "upstream_invalid_response"), ("cut", None)]
)
async def test_a_broken_stream_ends_with_an_error_event(
    proxy: testing.ProxyUnderTest, fake: Any, fault: Any, code: str | None
) -> None:
    fake.faults.append(fault)
    body = {"model": "claude", "messages": testing.HELLO, "stream": True}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        events = await testing.read_sse(response)
    assert "error" in events[-1], events[-1]
    if code:
        assert events[-1]["error"]["code"] == code
    assert proxy.in_flight("claude") == 0


async def test_a_broken_first_message_is_a_502(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    fake.faults.append(("bad_crc", 0))
    body = {"model": "claude", "messages": testing.HELLO, "stream": True}
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        await testing.assert_openai_error(response, 502, "upstream_invalid_response")


@pytest.mark.parametrize(("fault", "total"), [(None, 15), ("no_metadata", 0)])
async def test_a_stream_ends_with_usage_and_done(
    proxy: testing.ProxyUnderTest, fake: Any, fault: str | None, total: int
) -> None:
    # Without its metadata event (the usage) the answer still ends well: usage 0, [DONE].
    if fault:
        fake.faults.append(fault)
    body = {
        "model": "claude",
        "messages": testing.HELLO,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
        chunks = await testing.read_sse(response)
    testing.assert_chat_chunks(chunks, usage=True)  # [DONE] last, the usage chunk before it
    assert chunks[-2]["usage"]["total_tokens"] == total


async def test_the_deployments_headers_cannot_replace_the_signature(
    aiohttp_server: Any, fake: Any, api_base: str
) -> None:
    entry = model(
        "claude",
        CHAT_MODEL_ID,
        api_base,
        headers={"authorization": "Bearer nope", "X-Team": "search", "CONTENT-TYPE": "text/plain"},
    )
    proxy = await testing.start_proxy(aiohttp_server, {"models": [entry]}, [aioproxy_bedrock])
    await testing.check_chat(proxy, "claude")
    assert fake.signed_with[-1] == ACCESS_KEY_ID
    assert fake.last.headers["x-team"] == "search"
    assert fake.last.headers["content-type"] == "application/json"


async def test_client_leaving_closes_the_upstream(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    fake.stream_delay = 0.05
    long = [{"role": "user", "content": "word " * 100}]
    await testing.check_cancellation(proxy, "claude", lambda: fake.in_flight, messages=long)


class _FakeTime:
    """botocore's clock for credentials (a datetime), moved by the test only."""

    def __init__(self) -> None:
        self.now = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

    def __call__(self) -> datetime.datetime:
        return self.now


async def test_expiring_credentials_are_refreshed(
    aiohttp_server: Any, fake: Any, api_base: str
) -> None:
    clock = _FakeTime()
    issued: list[str] = []

    def issue() -> dict[str, str]:  # what an STS call or a credential process would give
        key = f"ASIATEMP{len(issued)}"
        issued.append(key)
        fake.credentials[key] = (f"secret-{key}", f"token-{key}")
        expiry = clock.now + datetime.timedelta(hours=1)
        return {
            "access_key": key,
            "secret_key": f"secret-{key}",
            "token": f"token-{key}",
            "expiry_time": expiry.isoformat(),
        }

    class Refreshing(BedrockProvider):
        name = "bedrock"

        def load_credentials(self, deployment: Deployment, settings: BedrockSettings) -> Any:
            first = issue()
            return RefreshableCredentials(
                first["access_key"],
                first["secret_key"],
                first["token"],
                datetime.datetime.fromisoformat(first["expiry_time"]),
                issue,
                "test",
                time_fetcher=clock,
            )

    class Plugin:
        @hookimpl
        def register_providers(self, register: Any) -> None:
            register(Refreshing)

    config = {
        "models": [
            model(
                "claude",
                CHAT_MODEL_ID,
                api_base,
                settings={"aws_access_key_id": None},
                api_key=None,
            )
        ]
    }
    proxy = await testing.start_proxy(aiohttp_server, config, [Plugin()])
    await testing.check_chat(proxy, "claude")
    assert fake.signed_with[-1] == "ASIATEMP0" and issued == ["ASIATEMP0"]
    clock.now += datetime.timedelta(minutes=59)  # within botocore's refresh window: refreshed
    await testing.check_chat(proxy, "claude")
    assert issued == ["ASIATEMP0", "ASIATEMP1"]
    assert fake.signed_with[-1] == "ASIATEMP1"
    assert fake.last.headers["x-amz-security-token"] == "token-ASIATEMP1"


async def test_credentials_from_the_environment(
    aiohttp_server: Any, fake: Any, api_base: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # The standard chain, first link: AWS_* variables (shared files pointed at nothing here).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    entry = model("claude", CHAT_MODEL_ID, api_base, api_key=None)
    entry["settings"] = {}
    proxy = await testing.start_proxy(aiohttp_server, {"models": [entry]}, [aioproxy_bedrock])
    assert await testing.check_chat(proxy, "claude") == "Hello! You said: Say hello to the kit"
    assert fake.signed_with[-1] == ACCESS_KEY_ID


async def test_a_misspelt_setting_stops_start_up(aiohttp_server: Any, api_base: str) -> None:
    entry = model("claude", CHAT_MODEL_ID, api_base, settings={"regoin": "us-east-1"})
    with pytest.raises(ConfigError, match="regoin"):
        await testing.start_proxy(aiohttp_server, {"models": [entry]}, [aioproxy_bedrock])


async def test_no_region_stops_start_up(tmp_path: Path) -> None:
    # Through the command line, with the installed entry point: a provider's start() failing
    # inside a test server would leave the control plane's database open (aiohttp runs no
    # cleanup after a failed start-up).
    config = tmp_path / "bedrock.toml"
    config.write_text(
        '[[models]]\nname = "c"\nprovider = "bedrock"\nmodel = "m"\napi_key = "k"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "db.sqlite3"}"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aioproxy", "--config", str(config), "--port", "0",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)  # a safety net only
    assert process.returncode == 2, err
    assert b"model 'c': the bedrock provider needs a region" in err


async def test_secrets_stay_out_of_answers_and_logs(
    proxy: testing.ProxyUnderTest, fake: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # botocore logs its canonical request at DEBUG
    for fault in [
        ("status", 500, "InternalServerException"),
        ("status", 403, "InvalidSignatureException"),
    ]:
        fake.faults.append(fault)
        body = {"model": "claude", "messages": testing.HELLO}
        async with proxy.http() as http, http.post("/v1/chat/completions", json=body) as response:
            text = await response.text()
        assert SECRET_KEY not in text and "Signature=" not in text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert SECRET_KEY not in logged
    assert fake.last.headers["authorization"].split("Signature=")[1] not in logged


async def test_importing_the_plugin_loads_no_botocore() -> None:
    code = "import sys, aioproxy_bedrock; print('botocore' in sys.modules)"
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


async def test_openai_sdk_sees_typed_errors(proxy: testing.ProxyUnderTest, fake: Any) -> None:
    fake.faults.append(("status", 429, "ThrottlingException"))
    async with proxy.openai() as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="claude", messages=testing.HELLO)


def test_the_entry_point_names_the_plugin() -> None:
    (entry_point,) = importlib.metadata.entry_points(group="aioproxy", name="bedrock")
    assert entry_point.load() is aioproxy_bedrock


@pytest.mark.parametrize("fault", [None, ("status", 400, "ValidationException")])
async def test_the_request_id_goes_upstream_and_aws_own_is_kept(
    aiohttp_server: Any, fake: Any, api_base: str, fault: Any
) -> None:
    """The gateway's x-request-id reaches Bedrock (unsigned, beside the signed headers); AWS's
    ``x-amzn-RequestId`` is kept on the call as ``upstream_request_id``, errors included."""
    kept: list[str | None] = []

    class Log:
        @hookimpl
        def after_response(self, call: Call, outcome: Outcome) -> None:
            kept.append(call.upstream_request_id)

        @hookimpl
        def on_error(self, error: Exception, call: Call | None) -> None:
            kept.append(call.upstream_request_id if call else "no call")

    config = {"models": [model("claude", CHAT_MODEL_ID, api_base)]}
    proxy = await testing.start_proxy(aiohttp_server, config, [aioproxy_bedrock, Log()])
    if fault:
        fake.faults.append(fault)
    body = {"model": "claude", "messages": testing.HELLO}
    async with (
        proxy.http() as http,
        http.post("/v1/chat/completions", json=body, headers={"x-request-id": "client-7"}) as got,
    ):
        assert got.status == (400 if fault else 200)
    assert fake.last.headers["x-request-id"] == "client-7"
    assert "x-request-id" not in fake.last.headers["authorization"]
    assert kept == ["req-fake-error" if fault else "req-fake-1"]
