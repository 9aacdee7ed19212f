"""The bedrock provider through aioproxy, against the fake Bedrock (SigV4 checked there), with
raw HTTP and the official openai SDK."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Any

import aioproxy_bedrock
import openai
import pytest
from aioproxy_bedrock import BedrockProvider, BedrockSettings
from botocore.credentials import RefreshableCredentials

from aioproxy import ConfigError, Deployment, hookimpl
from aioproxy.testing import (
    HELLO,
    ProxyUnderTest,
    assert_chat_chunks,
    assert_openai_error,
    check_cancellation,
    check_chat,
    check_chat_stream,
    check_completion,
    check_embeddings,
    check_error_mapping,
    check_responses,
    read_sse,
    start_proxy,
)

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
PNG = (  # a 1x1 pixel
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kg"
    "AAAABJRU5ErkJggg=="
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


async def test_chat(proxy: ProxyUnderTest, fake: Any) -> None:
    assert await check_chat(proxy, "claude") == "Hello! You said: Say hello to the kit"
    sent = fake.last
    assert sent.path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse" or (
        sent.path == f"/model/{CHAT_MODEL_ID}/converse"
    )
    assert sent.body == {"messages": [{"role": "user", "content": [{"text": "Say hello to the kit"}]}]}
    assert fake.signed_with[-1] == ACCESS_KEY_ID


async def test_chat_stream(proxy: ProxyUnderTest) -> None:
    assert await check_chat_stream(proxy, "claude") == "Hello! You said: Say hello to the kit"


async def test_bridged_endpoints(proxy: ProxyUnderTest) -> None:
    assert "Say hello" in await check_completion(proxy, "claude")
    assert "Say hello" in await check_responses(proxy, "claude")
