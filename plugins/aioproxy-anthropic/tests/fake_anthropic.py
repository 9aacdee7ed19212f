"""A fake Anthropic Messages API for tests, speaking the wire format of Anthropic's API reference.

Start it with pytest-aiohttp: ``server = await aiohttp_server(fake.app())`` and give the proxy
``api_base = str(server.make_url("/"))``. Every request is recorded (headers, JSON body).

Answers are deterministic. With ``tools`` (and a ``tool_choice`` other than none) and no tool
result in the last user turn, the model says ``TOOL_PREAMBLE`` and calls a tool with
``TOOL_INPUT``; otherwise it answers ``"Hello! You said: <last user text>"`` (or, after a tool
result, ``"The tool said: <result>"``). A token is a word with the whitespace before it:
``max_tokens`` and ``stop_sequences`` cut the answer as Anthropic would. Streams are written one
SSE event per write, with ``event:`` lines and a ``ping`` after the first block starts.

The request checks are Anthropic's: ``x-api-key`` (when the fake has one), ``anthropic-version``,
required fields, no unknown fields, non-empty text blocks, tool results answering tool uses. The
fake is stricter in one way: user and assistant must alternate (older API versions refused
consecutive same-role turns; today's merge them), so that tests see the proxy alternate.

``faults`` (a FIFO, one per request) makes a request misbehave:

* ``status:NNN`` - Anthropic's error body for that status (``retry-after`` on 429 and 529);
  ``status:NNN:text`` - a plain-text body, as a proxy in front of the API would send.
* ``stream_error`` - a stream that sends ``event: error`` (overloaded_error) after its first delta;
  ``error_first`` - a stream whose first event is that error.
* ``cut_stream`` - a stream cut (connection closed) after three events.
* ``malformed`` - an answer of another shape: a message whose ``content`` is a number; in a
  stream, a first event whose ``message`` is a string. ``malformed_later``: a stream whose
  first content block is a number.
* ``huge_event`` - a stream whose first event never ends (over the proxy's 16 MiB per event).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from typing import Any

from aiohttp import web

from aioproxy.testing import (
    FakeUpstream,
    Recorded,
    assert_chat_chunk,
    assert_chat_completion,
    assert_completion,
    assert_response,
)

__all__ = [
    "CLIENT_KEY",
    "ERRORS",
    "FAULTS",
    "MODEL",
    "TOOL_INPUT",
    "TOOL_PREAMBLE",
    "UPSTREAM_KEY",
    "VERSION",
    "FakeAnthropic",
    "Recorded",
    "gateway_config",
    "model_entry",
    "split_tokens",
    "validate",
]

VERSION = "2023-06-01"
TOOL_PREAMBLE = "Let me check that."
TOOL_INPUT = {"city": "Paris", "unit": "celsius"}
MODEL_ID = "claude-sonnet-4-5-20250929"
CLIENT_KEY = "sk-client-test"
UPSTREAM_KEY = "sk-ant-api03-upstream-secret"
MODEL = "claude"  # what clients call it

# Anthropic's failures (``FakeAnthropic.faults``) as each client sees them: a chat completions
# client in OpenAI's terms (status, code), a Messages client in Anthropic's (status, type).
FAULTS = {
    "status:401": ((502, "upstream_auth_failed"), (502, "api_error")),  # the proxy's key
    "status:429": ((429, "rate_limit_exceeded"), (429, "rate_limit_error")),
    "status:529": ((503, "overloaded"), (529, "overloaded_error")),
    "status:500": ((500, "api_error"), (500, "api_error")),
}


def model_entry(api_base: str, **entry: Any) -> dict[str, Any]:
    """The tests' deployment: ``MODEL``, Anthropic's ``MODEL_ID`` on the fake at ``api_base``
    (``entry`` adds keys: ``settings``, ``headers``)."""
    return {
        "name": MODEL,
        "provider": "anthropic",
        "model": MODEL_ID,
        "api_base": api_base,
        "api_key": UPSTREAM_KEY,
        **entry,
    }


def gateway_config(api_base: str, **entry: Any) -> dict[str, Any]:
    """The proxy's config: the tests' deployment (see ``model_entry``) and ``CLIENT_KEY``."""
    return {
        "auth": {"master_key": CLIENT_KEY},
        # No retries and no cooldown: each client request is exactly one upstream request.
        "router": {"num_retries": 0, "cooldown_seconds": 0},
        "responses": {"store": False},  # the Responses bridge would keep a SQLite file
        "models": [model_entry(api_base, **entry)],
    }


# status -> (error type, message), worded as Anthropic's API reference has them.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "messages: at least one message is required"),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "model: claude-nonexistent"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: (
        "rate_limit_error",
        "This request would exceed the rate limit for your organization of 50 requests per minute.",
    ),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}

# The Messages API's top-level fields: anything else is refused, as Anthropic does.
_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "container",
        "mcp_servers",
        "context_management",
        "output_format",
    }
)
_BLOCKS = frozenset({"text", "image", "document", "tool_use", "tool_result"})
_FAULT_EVENTS = 3  # events sent before cut_stream strikes
_TOKEN = re.compile(r"\s*\S+")


class _RefusedError(Exception):
    """A request Anthropic would refuse with 400 invalid_request_error."""


def split_tokens(text: str) -> list[str]:
    """Words, each with the whitespace before it: they join back to the text."""
    return _TOKEN.findall(text)


class FakeAnthropic(FakeUpstream):
    """Fake Anthropic upstream; state is shared by every app built from one instance."""

    def __init__(self, api_key: str | None = None) -> None:
        super().__init__()
        self.api_key = api_key
        self.stream_delay = 0.0  # seconds between stream events
        # What usage reports beside input_tokens, to test prompt-caching accounting.
        self.cache_read_input_tokens = 0
        self.cache_creation_input_tokens = 0
        self._seq = 0

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/messages", self._messages),
            web.post("/v1/messages/count_tokens", self._count_tokens),
            web.route("*", "/{tail:.*}", self._unknown),
        ]

    def _id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}01{self._seq:022d}"

    # -- routes ----------------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        record = await self.record(request)
        body, headers = record.body, record.headers
        fault = self.next_fault()
        if fault is not None and fault.startswith("status:"):
            return self._status_fault(fault)
        if self.api_key is not None and headers.get("x-api-key") != self.api_key:
            return self._error(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in headers:
            message = "anthropic-version: header is required"
            return self._error(400, "invalid_request_error", message)
        try:
            _check(body)
        except _RefusedError as exc:
            return self._error(400, "invalid_request_error", str(exc))
        message = self._answer(body)
        if body.get("stream") is True:
            return await self._stream(request, message, fault)
        if fault == "malformed":
            message["content"] = 5
        return web.json_response(message, headers=self._headers())

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        """The input tokens (words, as ``usage`` counts them) of a request without max_tokens."""
        record = await self.record(request)
        body = record.body
        if self.api_key is not None and record.headers.get("x-api-key") != self.api_key:
            return self._error(401, "authentication_error", "invalid x-api-key")
        try:
            _check({**body, "max_tokens": 1} if isinstance(body, dict) else body)
        except _RefusedError as exc:
            return self._error(400, "invalid_request_error", str(exc))
        return web.json_response({"input_tokens": self._usage(body, 0)["input_tokens"]})

    async def _unknown(self, request: web.Request) -> web.StreamResponse:
        return self._error(404, "not_found_error", "Not Found")

    def _headers(self) -> dict[str, str]:
        return {"request-id": self._id("req_"), "anthropic-organization-id": "org-fake"}

    def _error(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        request_id = self._id("req_")
        error = {"type": kind, "message": message}
        body = {"type": "error", "error": error, "request_id": request_id}
        return web.json_response(
            body, status=status, headers={**self._headers(), **(headers or {})}
        )

    def _status_fault(self, fault: str) -> web.Response:
        _, code, *rest = fault.split(":")
        status = int(code)
        headers = {"retry-after": "7"} if status in (429, 529) else {}
        if rest == ["text"]:
            return web.Response(status=status, text=f"<html>{status} upstream trouble</html>")
        kind, message = ERRORS.get(status, ("api_error", f"Error {status}"))
        return self._error(status, kind, message, headers)

    # -- answers ---------------------------------------------------------------------------

    def _answer(self, body: dict[str, Any]) -> dict[str, Any]:
        """The whole message this request gets (a stream sends it piece by piece)."""
        messages = body["messages"]
        last = _blocks(messages[-1]["content"]) if messages[-1]["role"] == "user" else []
        results = [b for b in last if b["type"] == "tool_result"]
        choice = body.get("tool_choice") or {"type": "auto"}
        content: list[dict[str, Any]]
        if body.get("tools") and choice["type"] != "none" and not results:
            name = choice.get("name") or body["tools"][0]["name"]
            tool = {"type": "tool_use", "id": self._id("toolu_"), "name": name, "input": TOOL_INPUT}
            content = [{"type": "text", "text": TOOL_PREAMBLE}, tool]
            tokens = split_tokens(TOOL_PREAMBLE) + [json.dumps(TOOL_INPUT)]
            stop_reason, stop_sequence = "tool_use", None
        else:
            if results:
                text = "The tool said: " + _text(results[-1].get("content"))
            else:
                text = "Hello! You said: " + _text(last)
            text, stop_reason, stop_sequence = _cut(text, body)
            tokens = split_tokens(text)
            content = [{"type": "text", "text": text}]
        return {
            "id": self._id("msg_"),
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self._usage(body, len(tokens)),
        }

    def _usage(self, body: dict[str, Any], output_tokens: int) -> dict[str, Any]:
        texts = [_text(body.get("system")), *(_text(m["content"]) for m in body["messages"])]
        prompt = " ".join(texts)
        return {
            "input_tokens": len(split_tokens(prompt)),
            "cache_creation_input_tokens": self.cache_creation_input_tokens,
            "cache_read_input_tokens": self.cache_read_input_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": self.cache_creation_input_tokens,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }

    # -- streams ---------------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, message: dict[str, Any], fault: str | None
    ) -> web.StreamResponse:
        headers = {
            "content-type": "text/event-stream; charset=utf-8",
            "cache-control": "no-cache",
            **self._headers(),
        }
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        events = list(_events(message))
        if fault == "huge_event":
            await response.write(b"event: message_start\ndata: " + b" " * (17 * 1024 * 1024))
            return response
        if fault == "malformed":
            events[0]["message"] = "not a message"
        elif fault == "malformed_later":
            events[1]["content_block"] = 5
        elif fault == "error_first":
            events = [_overloaded()]
        elif fault == "stream_error":
            first = next(i for i, e in enumerate(events) if e["type"] == "content_block_delta")
            events = [*events[: first + 1], _overloaded()]
        try:
            for i, event in enumerate(events):
                if fault == "trickle" and i == 1:  # bytes keep coming, the event never ends
                    await response.write(b"event: ping\ndata: {")
                    for _ in range(1200):  # a minute at most
                        await asyncio.sleep(0.05)
                        await response.write(b" ")
                    return response
                if fault == "cut_stream" and i == _FAULT_EVENTS:
                    if request.transport is not None:
                        request.transport.close()
                    return response
                if i and self.stream_delay:
                    await asyncio.sleep(self.stream_delay)
                data = json.dumps(event, separators=(",", ":"))
                await response.write(f"event: {event['type']}\ndata: {data}\n\n".encode())
            await response.write_eof()
        except ConnectionError:
            pass  # the proxy went away; nobody is left to write to
        return response


def _events(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The stream of one message: start, each block (start, deltas, stop), delta, stop."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 1}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": t} for t in split_tokens(block["text"])]
        else:
            opening = {**block, "input": {}}
            arguments = json.dumps(block["input"])
            cut = len(arguments) // 2
            # Anthropic opens with an empty fragment, then sends the JSON in arbitrary pieces.
            deltas = [
                {"type": "input_json_delta", "partial_json": part}
                for part in ("", arguments[:cut], arguments[cut:])
            ]
        events.append({"type": "content_block_start", "index": index, "content_block": opening})
        if index == 0:
            events.append({"type": "ping"})
        events += [{"type": "content_block_delta", "index": index, "delta": d} for d in deltas]
        events.append({"type": "content_block_stop", "index": index})
    delta = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    final_usage = {"output_tokens": usage["output_tokens"]}  # cumulative, as Anthropic sends it
    events.append({"type": "message_delta", "delta": delta, "usage": final_usage})
    events.append({"type": "message_stop"})
    return events


def _overloaded() -> dict[str, Any]:
    return {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}


# -- request checks and helpers ----------------------------------------------------------------


def _check(body: Any) -> None:
    """Raise _RefusedError for what Anthropic refuses, in its words where known."""
    if not isinstance(body, dict):
        raise _RefusedError("The request body is not valid JSON.")
    for field in sorted(set(body) - _FIELDS):
        raise _RefusedError(f"{field}: Extra inputs are not permitted")
    if not isinstance(body.get("model"), str):
        raise _RefusedError("model: Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise _RefusedError("max_tokens: Field required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _RefusedError("messages: at least one message is required")
    if body.get("tool_choice") is not None and not body.get("tools"):
        raise _RefusedError("tool_choice: tool_choice may only be specified while providing tools.")
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _RefusedError("system: Input should be a valid string")
    previous_uses: set[str] = set()
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise _RefusedError(f"messages.{i}.role: Input should be 'user' or 'assistant'")
        if i and messages[i - 1].get("role") == role:
            raise _RefusedError('messages: roles must alternate between "user" and "assistant"')
        blocks = _blocks(message.get("content"))
        if not blocks:
            raise _RefusedError(f"messages.{i}: all messages must have non-empty content")
        for j, block in enumerate(blocks):
            if block.get("type") not in _BLOCKS:
                raise _RefusedError(
                    f"messages.{i}.content.{j}.type: Input tag is not a valid block"
                )
            if block["type"] == "text" and not block.get("text"):
                raise _RefusedError(
                    f"messages.{i}.content.{j}: text content blocks must be non-empty"
                )
            if block["type"] == "tool_result" and block.get("tool_use_id") not in previous_uses:
                raise _RefusedError(
                    f"messages.{i}.content.{j}: unexpected `tool_use_id` found in `tool_result` "
                    "blocks. Each `tool_result` block must have a corresponding `tool_use` block "
                    "in the previous message."
                )
        previous_uses = {b.get("id") for b in blocks if b.get("type") == "tool_use"}


def _blocks(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return [b for b in content or () if isinstance(b, dict)]


def _text(content: Any) -> str:
    """The text of content (a string or blocks), tool results and system blocks included."""
    if content is None:
        return ""
    parts = []
    for block in _blocks(content):
        if block.get("type") == "text":
            parts.append(block["text"])
        elif block.get("type") == "tool_result":
            parts.append(_text(block.get("content")))
    return " ".join(parts)


def _cut(text: str, body: dict[str, Any]) -> tuple[str, str, str | None]:
    """The answer as max_tokens and stop_sequences leave it, and the stop reason."""
    best: tuple[int, str] | None = None
    for sequence in body.get("stop_sequences") or ():
        at = text.find(sequence)
        if at >= 0 and (best is None or at < best[0]):
            best = (at, sequence)
    stop_reason, stop_sequence = "end_turn", None
    if best is not None:
        text, stop_reason, stop_sequence = text[: best[0]], "stop_sequence", best[1]
    tokens = split_tokens(text)
    if len(tokens) > body["max_tokens"]:
        return "".join(tokens[: body["max_tokens"]]), "max_tokens", None
    return text, stop_reason, stop_sequence


# The OpenAI shapes by their name in OpenAI's OpenAPI description, checked with the test kit (the
# JSON schemas stay in the root tests: a plugin's tests run outside the repository too).
_SHAPES: dict[str, Callable[[Any], object]] = {
    "CreateChatCompletionResponse": assert_chat_completion,
    "CreateChatCompletionStreamResponse": assert_chat_chunk,
    "CreateCompletionResponse": assert_completion,
    "Response": assert_response,
}


def validate(schema: str, obj: Any) -> None:
    """``obj`` has the OpenAI shape ``schema`` names."""
    _SHAPES[schema](obj)
