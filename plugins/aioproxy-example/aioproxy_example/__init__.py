"""aioproxy provider ``example``: OpenAI chat completions over a toy JSON API.

The walk-through plugin of plugins/README.md. The toy API has one endpoint, ``POST
{api_base}/generate`` with ``{"model", "prompt", "max_words", "stream"}`` and the header
``X-Toy-Key``. It answers ``{"text", "input_words", "output_words", "truncated"}``, or when
streaming one JSON object a line: ``{"token": ...}`` for each word, then ``{"end": true, ...}``
with the counts. Failures have a status and ``{"fault": "..."}``.

Deployment settings: ``max_words``, the answer's length when a request sets no ``max_tokens``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import aiohttp
import msgspec

from aioproxy import (
    BadGateway,
    BadRequest,
    Call,
    ConfigError,
    Deployment,
    JSONReply,
    Provider,
    ProxyError,
    RateLimited,
    Reply,
    StreamReply,
    hookimpl,
)
from aioproxy.hookspecs import RegisterProvider
from aioproxy.streaming import DONE, sse_data
from aioproxy.upstream import deployment_timeout, read_capped

__all__ = ["ExampleProvider", "Settings", "register_providers"]


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's ``settings``; a key it does not name stops start-up (a typo, say)."""

    max_words: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256


# What the toy API answers, decoded by msgspec straight into Structs.
class _Answer(msgspec.Struct):
    text: str
    input_words: int
    output_words: int
    truncated: bool = False


class _Line(msgspec.Struct):
    token: str = ""
    end: bool = False
    input_words: int = 0
    output_words: int = 0
    truncated: bool = False


class _Fault(msgspec.Struct):
    fault: str


_encode = msgspec.json.Encoder().encode
_decode_answer = msgspec.json.Decoder(_Answer).decode
_decode_line = msgspec.json.Decoder(_Line).decode
_decode_fault = msgspec.json.Decoder(_Fault).decode


class ExampleProvider(Provider):
    """Serves chat completions from the toy API; every other endpoint kind is a 400."""

    name = "example"
    settings_type = Settings  # the core checks every deployment's settings at start-up

    async def start(self) -> None:
        # Check what the core cannot know, so that a missing api_base fails now, not later.
        for entry in self.config.models:
            if entry.provider == self.name and not entry.api_base:
                raise ConfigError(f"model '{entry.name}': the example provider needs api_base")

    async def chat_completions(self, call: Call) -> Reply:
        deployment = call.deployment
        assert deployment is not None
        settings: Settings = self.settings(deployment)  # decoded once per deployment
        max_words = call.get("max_completion_tokens") or call.get("max_tokens")
        request = {
            "model": deployment.model,
            "prompt": _prompt(call),
            "max_words": max_words or settings.max_words,
            "stream": call.stream,
        }
        response = await self.session.post(
            f"{(deployment.api_base or '').rstrip('/')}/generate",
            data=_encode(request),
            headers=_headers(deployment),
            timeout=deployment_timeout(call, self.config),
            allow_redirects=False,
        )
        if response.status != 200 or not call.stream:
            async with response:  # read it whole, then the connection goes back to the pool
                body = await read_capped(response, deployment)
            if response.status != 200:
                raise _error(response.status, body, deployment)
            return JSONReply.of(_completion(call, _decode(_decode_answer, body, deployment)))
        # Streaming: close=response.close drops the upstream connection if the client leaves.
        return StreamReply(_chunks(call, response), close=response.close)


def _headers(deployment: Deployment) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **deployment.headers}
    if deployment.api_key:
        headers["X-Toy-Key"] = deployment.api_key
    return headers


def _prompt(call: Call) -> str:
    """The toy API takes one prompt: the last user message's text."""
    for message in reversed(call.get("messages")):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # content parts: keep the text ones
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                return content
    raise BadRequest("The example provider needs a user message", param="messages")


def _error(status: int, body: bytes, deployment: Deployment) -> ProxyError:
    """The toy API's failure as the error the client sees."""
    where = deployment.describe()
    try:
        fault = _decode_fault(body).fault
    except msgspec.DecodeError:
        fault = f"status {status}"
    if status == 429:
        return RateLimited(f"Deployment {where} is rate limited: {fault}")
    if status in (401, 403):  # the proxy's key was refused: the client is not to blame
        return BadGateway(f"Deployment {where} refused our key", code="upstream_auth_failed")
    if 400 <= status < 500:
        return BadRequest(f"Deployment {where} refused the request: {fault}")
    return BadGateway(f"Deployment {where} failed: {fault}")


def _decode(decode: Any, data: bytes, deployment: Deployment) -> Any:
    try:
        return decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
        raise BadGateway(
            f"Deployment {deployment.describe()} sent an answer the example cannot read: {exc}",
            code="upstream_invalid_response",
        ) from None


def _usage(input_words: int, output_words: int) -> dict[str, int]:
    return {
        "prompt_tokens": input_words,
        "completion_tokens": output_words,
        "total_tokens": input_words + output_words,
    }


def _finish_reason(truncated: bool) -> str:
    return "length" if truncated else "stop"


def _completion(call: Call, answer: _Answer) -> dict[str, Any]:
    message = {"role": "assistant", "content": answer.text}
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": call.model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": _finish_reason(answer.truncated),
            }
        ],
        "usage": _usage(answer.input_words, answer.output_words),
    }


async def _chunks(call: Call, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The toy API's lines as chat chunks: the role, a chunk per word, the finish, usage, [DONE]."""
    assert call.deployment is not None
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": call.model,
    }

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse_data({**head, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""})
    end = None
    async for line in response.content:  # one line at a time, as each arrives
        if line.strip():
            piece = _decode(_decode_line, line, call.deployment)
            if piece.end:
                end = piece
            else:
                yield chunk({"content": piece.token})
    if end is None:
        raise BadGateway(
            f"Deployment {call.deployment.describe()} ended its stream before the end",
            code="upstream_stream_incomplete",
        )
    response.release()  # read to the end: the connection goes back to the pool
    yield chunk({}, _finish_reason(end.truncated))
    if (call.get("stream_options") or {}).get("include_usage"):
        yield sse_data({**head, "choices": [], "usage": _usage(end.input_words, end.output_words)})
    yield DONE


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register("example", ExampleProvider)
