"""A fake OpenAI-compatible upstream for tests.

Start it with pytest-aiohttp: ``server = await aiohttp_server(fake.app())`` and point the
proxy (or the ``openai`` SDK) at ``server.make_url("/v1")``. The ``openai`` plugin's tests use it,
and so can any plugin for an OpenAI-compatible API.

Answers are deterministic ("fake reply to: <last user text>") and shaped like the real
API (see the OpenAI OpenAPI description), streams are written one SSE event per write so
proxies see real chunking, and ``faults`` lets a test make the next request(s) misbehave.

Besides the FIFO ``faults``, ``fault_rates`` (fault name -> probability) draws a fault for each
request that has no queued fault, from a ``random.Random`` seeded with ``seed``, so a load test
can run with faults "on" at chosen rates and still be reproducible. ``faulted`` counts the faults
acted on (queued or drawn, by name), ``response_delay`` holds every answer back that long (a slow
model before its first byte), and ``retry_after`` is the header that 429 faults send.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import random
import re
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from ..translating import completion_usage
from .fakes import FakeUpstream, Recorded

__all__ = [
    "CONTEXT_LENGTH_MESSAGE",
    "MISSING_MODEL",
    "MODELS",
    "REDIRECT_LOCATION",
    "TRANSPORT_FAULTS",
    "FakeOpenAI",
    "Recorded",
]

MISSING_MODEL = "missing-model"
# Port 1: nothing listens there, so a client that follows the redirect fails to connect.
REDIRECT_LOCATION = "http://127.0.0.1:1/elsewhere"
# The faults that break the HTTP exchange itself, each with the client's status and error code:
# the core maps them alike for every provider, so a plugin's tests may parametrize on them.
TRANSPORT_FAULTS = (
    ("reset", 502, "upstream_disconnected"),
    ("garbage", 502, "upstream_invalid_response"),
    ("redirect", 502, "upstream_redirect"),
)
MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-3.5-turbo-instruct",
    "text-embedding-3-small",
)
DEFAULT_EMBEDDING_DIMENSIONS = 8
TOOL_ARGUMENTS = '{"x": 1}'
_POLL_INTERVAL = 0.01
_STREAM_FAULTS = ("cut_stream", "stall_stream")
_UNPARSABLE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
    "not valid JSON.)"
)
_FAULT_EVENTS = 2  # events sent before cut_stream / stall_stream strike
_STOPPING = web.AppKey("fake_openai_stopping", asyncio.Event)
# OpenAI's answer to a request longer than the model's context window.
CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is 128000 tokens. However, your messages resulted in "
    "130000 tokens. Please reduce the length of the messages."
)


class _ClientGoneError(Exception):
    """The client disconnected (or a fault dropped it); there is nobody left to answer."""


@dataclass
class _Call:
    request: web.Request
    body: dict[str, Any]
    stream_fault: str | None  # cut_stream / stall_stream, acted on by the stream writer


_Handler = Callable[[_Call], Awaitable[web.StreamResponse]]
_Route = Callable[[web.Request], Awaitable[web.StreamResponse]]


class FakeOpenAI(FakeUpstream):
    """Fake OpenAI upstream; state is shared by every app built from one instance."""

    def __init__(
        self,
        prefix: str = "/v1",
        *,
        fault_rates: Mapping[str, float] | None = None,
        seed: int | None = 0,
        responses_route: bool = True,
    ) -> None:
        super().__init__()
        self.prefix = prefix.rstrip("/")
        # False: no /responses routes at all, as on many OpenAI-compatible servers.
        self.responses_route = responses_route
        # Responses kept (``store`` not false), by id: the Response and its input items.
        self.stored: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {}
        # Called with each request as it arrives, e.g. to move a test's fake clock on.
        self.on_request: Callable[[Recorded], None] | None = None
        self.fault_rates: dict[str, float] = dict(fault_rates or {})
        self.random = random.Random(seed)
        self.faulted: Counter[str] = Counter()  # faults acted on, queued or drawn
        _check_rates(self.fault_rates)
        self.response_delay = 0.0  # seconds before any answer (fault or not) starts
        self.retry_after = "0"  # the retry-after header of 429 faults
        self.stream_chunks = 5
        self.stream_delay = 0.0
        self._seq = 0

    def _draw_fault(self) -> str | None:
        """The next queued fault, else one drawn at ``fault_rates``, else None."""
        if self.faults:
            return str(self.faults.pop(0))
        if not self.fault_rates:
            return None
        _check_rates(self.fault_rates)
        draw = self.random.random()
        for name, rate in self.fault_rates.items():
            if draw < rate:
                return name
            draw -= rate
        return None

    def app(self) -> web.Application:
        app = super().app()
        app[_STOPPING] = asyncio.Event()
        app.on_shutdown.append(_mark_stopping)
        app.on_response_prepare.append(self._add_request_id)
        return app

    def routes(self) -> list[web.RouteDef]:
        p, wrap = self.prefix, self._wrap
        routes = [
            web.post(f"{p}/chat/completions", wrap(self._chat)),
            web.post(f"{p}/completions", wrap(self._completions)),
            web.post(f"{p}/embeddings", wrap(self._embeddings)),
        ]
        if self.responses_route:
            one = f"{p}/responses/{{response_id}}"
            routes += [
                web.post(f"{p}/responses", wrap(self._responses)),
                web.get(one, wrap(self._get_response, json_body=False)),
                web.delete(one, wrap(self._delete_response, json_body=False)),
                web.get(f"{one}/input_items", wrap(self._input_items, json_body=False)),
                web.post(f"{one}/cancel", wrap(self._cancel_response, json_body=False)),
            ]
        return [
            *routes,
            web.get(f"{p}/models", wrap(self._list_models, json_body=False)),
            web.get(f"{p}/models/{{model:.+}}", wrap(self._get_model, json_body=False)),
            # Last, so wrong paths *and* wrong methods get OpenAI's JSON 404, not aiohttp's text.
            web.route("*", f"{p}/{{tail:.*}}", wrap(self._unknown, json_body=False)),
        ]

    # -- plumbing shared by all routes ---------------------------------------------------

    def _new_id(self, prefix: str) -> str:
        self._seq += 1
        return f"{prefix}{self._seq:024x}"

    async def _add_request_id(self, _req: web.Request, response: web.StreamResponse) -> None:
        response.headers.setdefault("x-request-id", self._new_id("req_"))

    def _wrap(self, handler: _Handler, *, json_body: bool = True) -> _Route:
        """Record and fault-inject around a route handler (the base counts it in flight)."""

        async def route(request: web.Request) -> web.StreamResponse:
            try:
                record = await self.record(request)
                body = record.body
                if self.on_request is not None:
                    self.on_request(record)
                fault = record.fault = self._draw_fault()
                if fault is not None:
                    self.faulted[fault] += 1
                if self.response_delay > 0:
                    await _idle(request, self.response_delay)
                streaming = isinstance(body, dict) and body.get("stream") is True
                stream_fault = fault if streaming and fault in _STREAM_FAULTS else None
                if fault is not None and stream_fault is None:
                    return await _act_on_fault(request, fault, self.retry_after)
                if json_body:
                    problem = _check_body(body)
                    if problem is not None:
                        return problem
                call = _Call(request, body if isinstance(body, dict) else {}, stream_fault)
                return await handler(call)
            except (_ClientGoneError, ConnectionError):
                # Nobody is listening; aiohttp's attempt to send this fails quietly.
                return web.Response(status=499)

        return route

    async def _stream(self, call: _Call, events: Iterable[bytes]) -> web.StreamResponse:
        """Write SSE events one write each, honouring stream_delay and stream faults."""
        request = call.request
        headers = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                if i == _FAULT_EVENTS and call.stream_fault == "cut_stream":
                    _drop(request)
                    return resp
                if i == _FAULT_EVENTS and call.stream_fault == "stall_stream":
                    await _idle(request, math.inf)
                if i and self.stream_delay > 0:
                    await _idle(request, self.stream_delay)
                await resp.write(event)
            # Finish the body here so in_flight drops only once the stream is fully written.
            await resp.write_eof()
        except (_ClientGoneError, ConnectionError):
            pass
        return resp

    # -- routes --------------------------------------------------------------------------

    async def _chat(self, call: _Call) -> web.StreamResponse:
        body = call.body
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _missing_param("messages")
        text = "fake reply to: " + _last_user_text(messages)
        tool = _pick_tool(body)
        reply = _Reply(
            id=self._new_id("chatcmpl-"),
            model=body["model"],
            created=int(time.time()),
            text=None if tool else text,
            tool=(self._new_id("call_"), tool) if tool else None,
            prompt_tokens=sum(_words(_content_text(m.get("content"))) for m in _dicts(messages)),
        )
        if body.get("stream") is True:
            chunks = _chat_chunks(reply, self.stream_chunks, _include_usage(body))
            return await self._stream(call, _sse_lines(chunks))
        return _json(_chat_completion(reply))

    async def _completions(self, call: _Call) -> web.StreamResponse:
        body = call.body
        if "prompt" not in body:
            return _missing_param("prompt")
        prompt = _prompt_text(body["prompt"])
        reply = _Reply(
            id=self._new_id("cmpl-"),
            model=body["model"],
            created=int(time.time()),
            text="fake reply to: " + prompt,
            tool=None,
            prompt_tokens=_words(prompt),
        )
        if body.get("stream") is True:
            chunks = _completion_chunks(reply, self.stream_chunks, _include_usage(body))
            return await self._stream(call, _sse_lines(chunks))
        return _json(_text_completion(reply, reply.text or "", "stop", usage=True))

    async def _embeddings(self, call: _Call) -> web.StreamResponse:
        body = call.body
        items = _embedding_inputs(body.get("input"))
        if not items:
            return _error(400, "'input' must be a non-empty string or array.", param="input")
        dims = body.get("dimensions") or DEFAULT_EMBEDDING_DIMENSIONS
        if not isinstance(dims, int) or dims < 1:
            return _error(400, "'dimensions' must be a positive integer.", param="dimensions")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = _vector(item, dims)
            encoded: Any = _float32_base64(vector) if as_base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(len(i) if isinstance(i, list) else _words(i) for i in items)
        return _json(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    async def _responses(self, call: _Call) -> web.StreamResponse:
        body = call.body
        if "input" not in body:
            return _missing_param("input")
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.stored:
            return _error(
                404,
                f"Previous response with id '{previous}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        items = _responses_items(body["input"])
        instructions = body.get("instructions")
        input_text = " ".join(_content_text(i.get("content")) for i in items)
        if isinstance(instructions, str):
            input_text += " " + instructions
        r = _ResponseRun(
            body=body,
            id=self._new_id("resp_"),
            msg_id=self._new_id("msg_"),
            created=int(time.time()),
            text="fake reply to: " + _last_user_text(items),
            input_tokens=_words(input_text),
        )
        if body.get("store", True) is not False:
            inputs = [_input_item(self._new_id("msg_"), item) for item in items]
            self.stored[r.id] = (r.response(completed=True), inputs)
        if body.get("stream") is True:
            return await self._stream(call, _response_events(r, self.stream_chunks))
        return _json(r.response(completed=True))

    async def _get_response(self, call: _Call) -> web.StreamResponse:
        found = self.stored.get(call.request.match_info["response_id"])
        return _json(found[0]) if found else _response_not_found(call.request)

    async def _delete_response(self, call: _Call) -> web.StreamResponse:
        response_id = call.request.match_info["response_id"]
        if self.stored.pop(response_id, None) is None:
            return _response_not_found(call.request)
        return _json({"id": response_id, "object": "response", "deleted": True})

    async def _input_items(self, call: _Call) -> web.StreamResponse:
        found = self.stored.get(call.request.match_info["response_id"])
        if found is None:
            return _response_not_found(call.request)
        data = found[1][::-1]  # newest first, as by default
        return _json(
            {
                "object": "list",
                "data": data,
                "first_id": data[0]["id"],
                "last_id": data[-1]["id"],
                "has_more": False,
            }
        )

    async def _cancel_response(self, call: _Call) -> web.StreamResponse:
        if call.request.match_info["response_id"] not in self.stored:
            return _response_not_found(call.request)
        return _error(400, "Cannot cancel a synchronous response.")

    async def _list_models(self, _call: _Call) -> web.StreamResponse:
        return _json({"object": "list", "data": [_model(m) for m in MODELS]})

    async def _get_model(self, call: _Call) -> web.StreamResponse:
        model = call.request.match_info["model"]
        if model == MISSING_MODEL:
            return _model_not_found(model)
        return _json(_model(model))

    async def _unknown(self, call: _Call) -> web.StreamResponse:
        request = call.request
        return _error(404, f"Invalid URL ({request.method} {request.path})")


# -- faults ------------------------------------------------------------------------------


def _check_rates(rates: Mapping[str, float]) -> None:
    if any(not 0 <= rate <= 1 for rate in rates.values()) or sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"fault_rates must be in [0, 1] and sum to at most 1: {dict(rates)}")


_INVALID = "invalid_request_error"
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    # status: (type, code, message), worded as OpenAI does
    400: (_INVALID, None, "Invalid request (fault injected by the fake upstream)."),
    401: (_INVALID, "invalid_api_key", "Incorrect API key provided."),
    403: (
        _INVALID,
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (_INVALID, None, "Not found (fault injected by the fake upstream)."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests. Please try again in 0s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}


async def _act_on_fault(
    request: web.Request, fault: str, retry_after: str = "0"
) -> web.StreamResponse:
    """Answer (or refuse to answer) according to a non-stream fault."""
    if fault.startswith("status:"):
        return _status_fault(fault, retry_after)
    if fault == "context_length_exceeded":
        return _error(400, CONTEXT_LENGTH_MESSAGE, param="messages", code="context_length_exceeded")
    if fault == "garbage":
        return web.Response(body=b"not json at all", content_type="application/json")
    if fault == "redirect":
        return web.Response(status=307, headers={"location": REDIRECT_LOCATION})
    if fault in ("cut_body", "cut_chunked_body"):  # the headers, part of a JSON answer, no more
        response = web.StreamResponse(headers={"content-type": "application/json"})
        if fault == "cut_body":
            response.content_length = 4096
        await response.prepare(request)
        await response.write(b'{"id": "chatcmpl-cut", "object": "chat.completion", "choi')
        _drop(request)
        raise _ClientGoneError
    if fault in ("reset", "cut_stream"):  # without a stream, there is only the line left to cut
        _drop(request)
        raise _ClientGoneError
    if fault in ("hang", "stall_stream"):
        await _idle(request, math.inf)  # only ever ends by raising _ClientGoneError
    raise ValueError(f"unknown fault {fault!r}")


def _status_fault(fault: str, retry_after: str = "0") -> web.Response:
    parts = fault.split(":")
    as_text = parts[2:] == ["text"]
    if len(parts) != 2 + as_text or not parts[1].isdigit():
        raise ValueError(f"bad status fault {fault!r}; use 'status:NNN' or 'status:NNN:text'")
    status = int(parts[1])
    headers = {"retry-after": retry_after} if status == 429 else {}
    if as_text:
        reason = web.Response(status=status).reason
        return web.Response(status=status, text=f"{status} {reason}".rstrip(), headers=headers)
    fallback = ("server_error" if status >= 500 else _INVALID, None, f"Upstream error {status}.")
    kind, code, message = _STATUS_ERRORS.get(status, fallback)
    resp = _error(status, message, kind=kind, code=code)
    resp.headers.update(headers)
    return resp


async def _mark_stopping(app: web.Application) -> None:
    # aiohttp waits (60 s by default) for running handlers before closing connections on
    # shutdown; telling hung handlers to hang up keeps test teardown fast.
    app[_STOPPING].set()


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _drop(request: web.Request) -> None:
    # close() still flushes what was already written, then sends FIN: the client sees the
    # partial body (if any) and then a disconnect instead of a response.
    if request.transport is not None:
        request.transport.close()


async def _idle(request: web.Request, seconds: float) -> None:
    """Sleep, but give up as soon as the client disconnects.

    Without handler_cancellation aiohttp never cancels a handler whose client left, so
    polling is what lets hung/stalled/slow handlers (and in_flight) notice a disconnect.
    """
    deadline = time.monotonic() + seconds
    while True:
        if request.app[_STOPPING].is_set():
            _drop(request)
        if _gone(request):
            raise _ClientGoneError
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        await asyncio.sleep(min(_POLL_INTERVAL, remaining))


# -- request parsing ---------------------------------------------------------------------


def _check_body(body: Any) -> web.Response | None:
    """OpenAI's answers to unusable bodies and to the well-known missing model."""
    if not isinstance(body, dict):
        if body is None:
            return _error(400, _UNPARSABLE)
        kind = type(body).__name__
        return _error(400, f"Invalid type for 'body': expected an object, but got {kind} instead.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return _error(400, "you must provide a model parameter")
    if model == MISSING_MODEL:
        return _model_not_found(model)
    return None


def _content_text(content: Any) -> str:
    """Text of a message content: a string or a list of parts (text / input_text / output_text)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        return " ".join(t for t in texts if isinstance(t, str))
    return ""


def _dicts(items: Any) -> list[dict[str, Any]]:
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []


def _last_user_text(messages: list[Any]) -> str:
    for message in reversed(_dicts(messages)):
        if message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def _pick_tool(body: dict[str, Any]) -> str | None:
    """Name of the function the fake model calls, or None to answer with text."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not isinstance(tools, list) or not tools or choice == "none":
        return None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        named = choice["function"].get("name")
        if isinstance(named, str):
            return named
    first = tools[0] if isinstance(tools[0], dict) else {}
    function = first.get("function") if isinstance(first.get("function"), dict) else first
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "tool"


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _prompt_text(prompt: Any) -> str:
    """Legacy completions accept a string, strings, token ids or lists of token ids."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return " ".join(str(p) if isinstance(p, int) else _prompt_text(p) for p in prompt)
    return ""


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """One entry per embedding to return."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        return []
    if all(isinstance(v, int) for v in value):
        return [value]  # a single tokenised input
    return [v for v in value if isinstance(v, (str, list))]


def _input_item(item_id: str, item: dict[str, Any]) -> dict[str, Any]:
    """An input message as the API lists it back: with an id, and its text as parts."""
    content = item.get("content")
    if isinstance(content, str):
        content = [{"type": "input_text", "text": content}]
    return {"id": item_id, "type": "message", "status": "completed", **item, "content": content}


def _responses_items(value: Any) -> list[dict[str, Any]]:
    """Responses API input: a bare string is one user message."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else _dicts(value)


def _words(text: str) -> int:
    return len(text.split())


def _split(text: str, n: int) -> list[str]:
    """Cut text into exactly n pieces that join back to it, on word boundaries when possible."""
    if n <= 0:
        return []
    units: list[str] = re.findall(r"\s*\S+\s*", text)
    if "".join(units) != text:  # whitespace-only text
        units = list(text)
    # Too few words: halve the longest unit until there are enough (or nothing left to halve).
    while len(units) < n and any(len(u) > 1 for u in units):
        i = max(range(len(units)), key=lambda k: len(units[k]))
        half = len(units[i]) // 2
        units[i : i + 1] = [units[i][:half], units[i][half:]]
    units += [""] * (n - len(units))
    size, extra = divmod(len(units), n)
    pieces, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        pieces.append("".join(units[start:end]))
        start = end
    return pieces


# -- response bodies ---------------------------------------------------------------------


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=msgspec.json.encode(obj), content_type="application/json"
    )


def _error(
    status: int,
    message: str,
    *,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> web.Response:
    return _json(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status
    )


def _missing_param(name: str) -> web.Response:
    return _error(
        400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
    )


def _response_not_found(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    return _error(404, f"Response with id '{response_id}' not found.", param="response_id")


def _model_not_found(model: str) -> web.Response:
    message = f"The model `{model}` does not exist or you do not have access to it."
    return _error(404, message, code="model_not_found")


def _model(model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 1715367049, "owned_by": "system"}


def _sse_lines(chunks: Iterable[dict[str, Any]]) -> Iterator[bytes]:
    """Chat/completions framing: bare data lines, closed by [DONE]."""
    for chunk in chunks:
        yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
    yield b"data: [DONE]\n\n"


@dataclass
class _Reply:
    id: str
    model: str
    created: int
    text: str | None  # None when the reply is a tool call
    tool: tuple[str, str] | None  # (call id, function name)
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return _words(self.text) if self.text is not None else _words(TOOL_ARGUMENTS)

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool else "stop"

    def usage(self) -> dict[str, Any]:
        return completion_usage(self.prompt_tokens, self.completion_tokens)


def _chat_completion(reply: _Reply) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text,
        "refusal": None,
        "annotations": [],
    }
    if reply.tool:
        call_id, name = reply.tool
        function = {"name": name, "arguments": TOOL_ARGUMENTS}
        message["tool_calls"] = [{"id": call_id, "type": "function", "function": function}]
    return {
        "id": reply.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish_reason}
        ],
        "usage": reply.usage(),
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _chat_chunks(reply: _Reply, n: int, include_usage: bool) -> Iterator[dict[str, Any]]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": reply.id,
            "object": "chat.completion.chunk",
            "created": reply.created,
            "model": reply.model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            out["usage"] = None  # as OpenAI: null on every chunk but the extra last one
        return out

    if reply.tool:
        call_id, name = reply.tool
        function = {"name": name, "arguments": ""}
        first = {"index": 0, "id": call_id, "type": "function", "function": function}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [first], "refusal": None})
        for fragment in _split(TOOL_ARGUMENTS, n):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]})
    else:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in _split(reply.text or "", n):
            yield chunk({"content": piece})
    yield chunk({}, reply.finish_reason)
    if include_usage:
        yield {**chunk({}), "choices": [], "usage": reply.usage()}


def _text_completion(
    reply: _Reply, text: str, finish_reason: str | None, *, usage: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": reply.id,
        "object": "text_completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": "fp_fake",
        "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}],
    }
    if usage:
        out["usage"] = reply.usage()
    return out


def _completion_chunks(reply: _Reply, n: int, include_usage: bool) -> Iterator[dict[str, Any]]:
    def chunk(text: str, finish_reason: str | None) -> dict[str, Any]:
        # finish_reason is null until the end, as the API sends it (the schema forgot the null).
        return _text_completion(reply, text, finish_reason, usage=False)

    # Legacy completions have no role chunk: straight to text, then an empty finishing chunk.
    for piece in _split(reply.text or "", n):
        yield chunk(piece, None)
    yield chunk("", reply.finish_reason)
    if include_usage:
        yield {**chunk("", None), "choices": [], "usage": reply.usage()}


def _vector(item: str | list[int], dims: int) -> list[float]:
    """Deterministic unit vector for one input, exactly representable as float32.

    It depends only on the input (not its position in the batch), so equal inputs embed equally.
    """
    seed = msgspec.json.encode(item)
    raw = b""
    counter = 0
    while len(raw) < 4 * dims:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "little")).digest()
        counter += 1
    ints = struct.unpack(f"<{dims}I", raw[: 4 * dims])
    values = [i / 0xFFFFFFFF * 2 - 1 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    # Round through float32 so the float and base64 encodings carry identical numbers.
    packed = struct.pack(f"<{dims}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dims}f", packed))


def _float32_base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


@dataclass
class _ResponseRun:
    """One Responses API answer, renderable at any point of its streamed life."""

    body: dict[str, Any]
    id: str
    msg_id: str
    created: int
    text: str
    input_tokens: int

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def message(self, completed: bool) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "type": "message",
            "status": "completed" if completed else "in_progress",
            "role": "assistant",
            "content": [self.part(self.text)] if completed else [],
        }

    def usage(self) -> dict[str, Any]:
        output_tokens = _words(self.text)
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + output_tokens,
        }

    def response(self, completed: bool) -> dict[str, Any]:
        body = self.body
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": "completed" if completed else "in_progress",
            "background": False,
            "completed_at": int(time.time()) if completed else None,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "max_tool_calls": None,
            "model": body["model"],
            "output": [self.message(completed=True)] if completed else [],
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "service_tier": "default",
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": body.get("text") or {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "top_logprobs": 0,
            "top_p": body.get("top_p", 1.0),
            "truncation": body.get("truncation", "disabled"),
            "metadata": body.get("metadata") or {},
            # The API sends "usage": null while in progress, but the schema does not allow null.
            **({"usage": self.usage()} if completed else {}),
        }


def _response_events(r: _ResponseRun, n: int) -> Iterator[bytes]:
    """The Responses API event sequence for a single text message (no [DONE] here)."""
    for sequence_number, event in enumerate(_response_event_objects(r, n)):
        payload = msgspec.json.encode({**event, "sequence_number": sequence_number})
        yield b"event: " + event["type"].encode() + b"\ndata: " + payload + b"\n\n"


def _response_event_objects(r: _ResponseRun, n: int) -> Iterator[dict[str, Any]]:
    # A generator, so each snapshot (completed_at...) is taken when its event is sent.
    where = {"item_id": r.msg_id, "output_index": 0, "content_index": 0}
    yield {"type": "response.created", "response": r.response(completed=False)}
    yield {"type": "response.in_progress", "response": r.response(completed=False)}
    yield {
        "type": "response.output_item.added",
        "output_index": 0,
        "item": r.message(completed=False),
    }
    yield {"type": "response.content_part.added", **where, "part": r.part("")}
    for delta in _split(r.text, n):
        yield {"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []}
    yield {"type": "response.output_text.done", **where, "text": r.text, "logprobs": []}
    yield {"type": "response.content_part.done", **where, "part": r.part(r.text)}
    yield {
        "type": "response.output_item.done",
        "output_index": 0,
        "item": r.message(completed=True),
    }
    yield {"type": "response.completed", "response": r.response(completed=True)}
