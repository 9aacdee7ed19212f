"""aioproxy provider ``example``: OpenAI chat completions and embeddings over a toy JSON API.

The walk-through plugin of plugins/README.md. The toy API has two endpoints, each with the
header ``X-Toy-Key``. ``POST {api_base}/generate`` takes ``{"model", "prompt", "max_words",
"stream"}`` and answers ``{"text", "input_words", "output_words", "truncated"}``, or when
streaming one JSON object a line: ``{"token": ...}`` for each word, then ``{"end": true, ...}``
with the counts. ``POST {api_base}/embed`` takes ``{"model", "texts"}`` and answers
``{"vectors", "input_words"}``. Failures have a status and ``{"fault": "..."}``.

Deployment settings: ``max_words``, the answer's length when a request sets no ``max_tokens``.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import msgspec

from aioproxy import (
    DONE,
    INT,
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    ArrayOf,
    BadGateway,
    BadRequest,
    Call,
    ConfigError,
    Deployment,
    JSONReply,
    Provider,
    ProxyError,
    RateLimited,
    RegisterProvider,
    Reply,
    StreamReply,
    UpstreamError,
    UpstreamResponse,
    get_field,
    hookimpl,
    scrub,
    sse_data,
)

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


class _Vectors(msgspec.Struct):
    vectors: list[list[float]]
    input_words: int


class _Fault(msgspec.Struct):
    fault: str


# What the provider reads of a request, decoded typed: a value of the wrong type is a 400
# naming it, and nothing it does not read is built.
class _Part(msgspec.Struct):
    text: str | None = None  # a text part's; other parts (images, ...) have none


class _Message(msgspec.Struct):
    role: str | None = None
    content: str | list[_Part] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


_MESSAGES: ArrayOf[_Message] = ArrayOf(_Message, MAX_MESSAGES)
_STREAM_OPTIONS = msgspec.json.Decoder(_StreamOptions | None)

_encode = msgspec.json.Encoder().encode
_decode_answer = msgspec.json.Decoder(_Answer).decode
_decode_line = msgspec.json.Decoder(_Line).decode
_decode_vectors = msgspec.json.Decoder(_Vectors).decode
_decode_fault = msgspec.json.Decoder(_Fault).decode


class ExampleProvider(Provider):
    """Serves chat completions and embeddings from the toy API; other endpoint kinds: bridged
    (responses, completions) by the core."""

    settings_type = Settings  # the core checks every deployment's settings at start-up

    async def start(self) -> None:
        # Check what the core cannot know, so that a missing api_base fails now, not later.
        for deployment in self.config.deployments:  # only the ones naming this provider
            if not deployment.api_base:
                raise ConfigError(f"model '{deployment.name}': the example provider needs api_base")

    async def chat_completions(self, call: Call) -> Reply:
        deployment = call.deployment
        settings: Settings = self.settings(deployment)  # decoded once per deployment
        max_words = get_field(call.fields, "max_completion_tokens", INT) or get_field(
            call.fields, "max_tokens", INT
        )
        options = get_field(call.fields, "stream_options", _STREAM_OPTIONS)  # read before sending
        usage = options is not None and options.include_usage is True
        request = {
            "model": deployment.model,
            "prompt": _prompt(call),
            "max_words": max_words or settings.max_words,
            "stream": call.stream,
        }
        response = await self._send(call, "/generate", request)
        with self.upstream.guard(response, call):  # closes it if anything here raises
            if call.stream:
                # close= drops the upstream connection if the client leaves mid-stream.
                return StreamReply(
                    _chunks(call, response, self.upstream.lines(response, call), usage),
                    close=response.close,
                    finished=response.content.is_eof,  # the toy's answer ends with its last line
                )
            body = await self.upstream.read(response, call)  # capped at 64 MiB
        response.release()  # read whole: the connection goes back to the pool
        return JSONReply.of(_completion(call, _decode(_decode_answer, body, deployment)))

    async def embeddings(self, call: Call) -> Reply:
        deployment = call.deployment
        as_base64 = _wants_base64(call)
        response = await self._send(
            call, "/embed", {"model": deployment.model, "texts": _texts(call)}
        )
        with self.upstream.guard(response, call):
            body = await self.upstream.read(response, call)
        response.release()
        answer = _decode(_decode_vectors, body, deployment)
        data = [
            {"object": "embedding", "index": i, "embedding": _base64(v) if as_base64 else v}
            for i, v in enumerate(answer.vectors)
        ]
        usage = {"prompt_tokens": answer.input_words, "total_tokens": answer.input_words}
        return JSONReply.of({"object": "list", "data": data, "model": call.model, "usage": usage})

    async def _send(self, call: Call, path: str, request: dict[str, Any]) -> UpstreamResponse:
        """POST ``request`` to the toy API's ``path``: its 2xx answer, or the client's error."""
        deployment = call.deployment
        return await self.upstream.post(  # with the deployment's timeouts; not `async with`
            call,
            f"{(deployment.api_base or '').rstrip('/')}{path}",
            _encode(request),
            _headers(deployment),
            read_error=_error,  # reads a failure's status, body and headers
        )


def _headers(deployment: Deployment) -> dict[str, str]:
    headers = {"Content-Type": "application/json", **deployment.headers}
    if deployment.api_key:
        headers["X-Toy-Key"] = deployment.api_key
    return headers


def _prompt(call: Call) -> str:
    """The toy API takes one prompt: the last user message's text."""
    for message in reversed(_MESSAGES.decode(call.fields.get("messages"), "messages") or ()):
        if message.role == "user":
            content = message.content
            if isinstance(content, list):  # content parts: keep the text ones
                if len(content) > MAX_CONTENT_PARTS:
                    raise BadRequest("Too many content parts", param="messages")
                content = "".join(part.text or "" for part in content)
            if isinstance(content, str):
                return content
    raise BadRequest("The example provider needs a user message", param="messages")


def _texts(call: Call) -> list[str]:
    """``input``: a string or a list of them (the toy API takes no token ids)."""
    value = call.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("The example provider embeds a string or strings", param="input")
    return texts


def _wants_base64(call: Call) -> bool:
    """``encoding_format``: "float" (the default) or "base64", which the openai SDK sends."""
    encoding: str = call.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    return encoding == "base64"


def _base64(vector: list[float]) -> str:
    """A vector as ``encoding_format: "base64"`` has it: little-endian float32s, in base64."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _error(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    """The toy API's failure (status, body, headers) as the error the client sees."""
    where = deployment.describe()
    try:
        # The toy's words, scrubbed: an upstream may echo the key it was sent.
        fault = scrub(_decode_fault(body).fault, deployment)
    except msgspec.DecodeError:
        fault = f"status {status}"
    if status == 429:
        retry_after = headers.get("Retry-After")
        return RateLimited(
            f"Deployment {where} is rate limited: {fault}",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    if status in (401, 403):  # the proxy's key was refused: the client is not to blame
        return BadGateway(f"Deployment {where} refused our key", code="upstream_auth_failed")
    if status == 404:  # the toy has one route: its model (the proxy's config) is unknown there
        return BadGateway(f"Deployment {where}: {fault}", code="upstream_model_not_found")
    if 400 <= status < 500:  # the request's fault: the client gets the toy's status and words
        return BadRequest(f"Deployment {where} refused the request: {fault}", status=status)
    # A 5xx passes on with its own status: the router retries it either way.
    return UpstreamError(
        f"Deployment {where} failed: {fault}", status=status, code="upstream_error"
    )


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


async def _chunks(
    call: Call, response: UpstreamResponse, lines: AsyncIterator[bytes], usage: bool
) -> AsyncIterator[bytes]:
    """The toy API's lines as chat chunks: the role, a chunk per word, the finish, usage, [DONE].
    ``lines``: ``self.upstream.lines``, which bounds each line's size and wait."""
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
    async for line in lines:  # one line at a time, as each arrives
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
    if usage:
        yield sse_data({**head, "choices": [], "usage": _usage(end.input_words, end.output_words)})
    yield DONE


@hookimpl
def register_providers(register: RegisterProvider) -> None:
    register(ExampleProvider)
