"""Legacy completions (``/v1/completions``) served by a provider that only has chat completions.

Each prompt becomes one user message; a list of prompts becomes one chat call per prompt, their
choices numbered in prompt order (``n`` per prompt), as OpenAI numbers them. Streams are relayed
chunk by chunk as they arrive, one prompt after the other.

A list is bounded (``[completions] max_prompts``), at most ``concurrency`` of its chat calls are
in flight at once, and each call after the first is counted against the deployment's limits as a
request of its own (``Admission``), the first being the request's.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import msgspec

from ..config import CompletionsConfig, ServerConfig
from ..context import Call
from ..errors import BadGateway, BadRequest
from ..failures import scrub_bytes
from ..fields import (
    BOOL,
    FLOAT,
    INT,
    MAX_STOP,
    STR,
    ArrayOf,
    decode_field,
    get_field,
    text_or_array,
)
from ..providers import JSONReply, ProviderMethod, Reply, StreamReply
from ..streaming import DONE, data_of, sse_data
from .common import (
    ChatAnswer,
    ChatChoice,
    ChatMessage,
    chat_call,
    events_of,
    first_event,
    once,
    scrubbed,
    text_of,
    unsupported,
)

__all__ = [
    "Admission",
    "CompletionRequest",
    "chat_call_for",
    "completion_from_chat",
    "make_completions_bridge",
    "prompts_of",
]

# Fields chat takes under the same name and meaning, each with the type it must have: checked
# (a 400 naming it), then passed on as the client's own bytes, never built into objects.
_LOGIT_BIAS_BYTES = 64 * 1024  # ~5,000 token biases; a bound on what the check builds
_SAME_NAME: dict[str, msgspec.json.Decoder[Any]] = {
    "max_tokens": INT,
    "temperature": FLOAT,
    "top_p": FLOAT,
    "n": INT,
    "presence_penalty": FLOAT,
    "frequency_penalty": FLOAT,
    "logit_bias": msgspec.json.Decoder(dict[str, float] | None),
    "user": STR,
    "seed": INT,
    "service_tier": STR,
}
_STOP: ArrayOf[str] = ArrayOf(str, MAX_STOP)
MAX_N = 128  # OpenAI's bound on ``n``: with echo, each prompt makes ``n`` chunks at once
_FINISH_REASONS = {"stop": "stop", "length": "length", "content_filter": "content_filter"}


class _StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


_STREAM_OPTIONS = msgspec.json.Decoder(_StreamOptions | None)


class CompletionRequest:
    """What the bridge reads of a completions request, each field decoded typed; the fields
    chat takes as they are stay the client's bytes (``shared``), sent with every prompt."""

    __slots__ = ("echo", "include_usage", "logprobs", "n", "shared", "stream")

    def __init__(self, fields: Mapping[str, msgspec.Raw]) -> None:
        if get_field(fields, "suffix", STR):
            raise unsupported("'suffix' is", "suffix")
        n = get_field(fields, "n", INT)
        if n is not None and not 1 <= n <= MAX_N:
            raise BadRequest(
                f"'n' must be an integer from 1 to {MAX_N}", param="n", code="invalid_value"
            )
        self.n = n or 1
        best_of = get_field(fields, "best_of", INT)
        if best_of is not None and best_of != 1 and best_of != self.n:
            raise unsupported("'best_of' is", "best_of")
        self.logprobs = get_field(fields, "logprobs", INT)
        self.echo = get_field(fields, "echo", BOOL) is True
        if self.logprobs is not None and self.echo:
            raise unsupported(
                "'logprobs' with 'echo' (the prompt's log probabilities) are", "logprobs"
            )
        self.stream = get_field(fields, "stream", BOOL) is True
        options = get_field(fields, "stream_options", _STREAM_OPTIONS)
        self.include_usage = options is not None and options.include_usage is True
        shared: dict[str, msgspec.Raw] = {}
        for name, decoder in _SAME_NAME.items():
            raw = fields.get(name)
            if raw is None:
                continue
            if name == "logit_bias" and len(raw) > _LOGIT_BIAS_BYTES:
                raise BadRequest(
                    f"'logit_bias' is too large: at most {_LOGIT_BIAS_BYTES} bytes",
                    param="logit_bias",
                    code="invalid_value",
                )
            if decode_field(raw, decoder, name) is not None:
                shared[name] = raw
        stop = fields.get("stop")
        if stop is not None and text_or_array(stop, _STOP, "stop") is not None:
            shared["stop"] = stop
        if self.logprobs is not None:
            shared["logprobs"] = msgspec.Raw(b"true")
            shared["top_logprobs"] = fields["logprobs"]
        if self.stream:
            shared["stream"] = msgspec.Raw(b"true")
            if self.include_usage:
                shared["stream_options"] = msgspec.Raw(b'{"include_usage":true}')
        self.shared = shared

    def size(self) -> int:
        """The bytes of the fields every prompt's chat call carries."""
        return sum(len(raw) for raw in self.shared.values())


class Admission(Protocol):
    """Counts a request's further upstream calls against the limits its first one passed."""

    def admit(self, call: Call) -> None:
        """Count ``call`` on its deployment from now on; raise RateLimited over a limit."""

    def dismiss(self, call: Call) -> None:
        """``call`` is over: no longer in flight."""


class _Prompts:
    """The ``prompt`` field decoded typed: a string or a list of up to ``max_prompts`` strings,
    its length checked before its items are built (token ids are looked at only to be refused).
    """

    def __init__(self, max_prompts: int) -> None:
        self.max_prompts = max_prompts
        self._array: ArrayOf[msgspec.Raw] = ArrayOf(msgspec.Raw, max_prompts)

    def of_raw(self, raw: bytes | msgspec.Raw | None) -> list[str]:
        if raw is None:
            raise _missing()
        prompt = text_or_array(raw, self._array, "prompt")
        if prompt is None:
            raise _missing()
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise BadRequest("'prompt' must not be empty", param="prompt", code="invalid_value")
        texts = []
        for i, item in enumerate(prompt):
            if memoryview(item)[0] != _QUOTE:  # a token id, or a list of them: never built
                raise unsupported("Prompts as token ids are", "prompt")
            texts.append(decode_field(item, _TEXT, f"prompt[{i}]"))
        return texts

    def of_value(self, value: Any) -> list[str]:
        return self.of_raw(None if value is None else _encode(value))


_TEXT = msgspec.json.Decoder(str)
_QUOTE = ord('"')
_encode = msgspec.json.Encoder().encode


def _missing() -> BadRequest:
    return BadRequest("'prompt' is required", param="prompt", code="missing_required_parameter")


_DEFAULT_CONFIG = CompletionsConfig()
_DEFAULT_PROMPTS = _Prompts(_DEFAULT_CONFIG.max_prompts)


def prompts_of(body: dict[str, Any], prompts: _Prompts = _DEFAULT_PROMPTS) -> list[str]:
    """The prompts of a decoded request: a string, or a list of strings (token ids are
    refused), at most ``max_prompts`` of them."""
    return prompts.of_value(body.get("prompt"))


def chat_call_for(call: Call, request: CompletionRequest, prompt: str) -> Call:
    """The chat call for one prompt: its message, and the shared fields (encoded once)."""
    sub = chat_call(call, {"messages": [{"role": "user", "content": prompt}]})
    sub.fields.update(request.shared)
    return sub


class _TopLogprob(msgspec.Struct):
    token: str = ""
    logprob: float = 0.0


class _TokenLogprob(msgspec.Struct):
    token: str = ""
    logprob: float = 0.0
    top_logprobs: list[_TopLogprob] | None = None


class _ChatLogprobs(msgspec.Struct):
    """A chat choice's ``logprobs``, typed: an upstream's malformed one is its error (502)."""

    content: list[_TokenLogprob] | None = None


class _Choice(ChatChoice):
    logprobs: _ChatLogprobs | None = None


class _ChatAnswer(ChatAnswer):
    """A chat answer, with what a completion repeats of it and its choices' log probabilities."""

    id: str | None = None
    created: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[_Choice] = []  # type: ignore[assignment]  # noqa: RUF012 - with their logprobs


_decode_answer = msgspec.json.Decoder(_ChatAnswer).decode


# One chunk per token: Structs, as msgspec encodes those fastest.
class _OutChoice(msgspec.Struct):
    text: str
    index: int
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class _OutChunk(msgspec.Struct, kw_only=True):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[_OutChoice]
    usage: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


def _finish(reason: str | None) -> str | None:
    if reason is None:
        return None
    return _FINISH_REASONS.get(reason, "stop")  # tool_calls / function_call: the text stopped


class _Logprobs:
    """Chat token log probabilities in the legacy shape, ``text_offset`` kept per choice."""

    __slots__ = ("offsets",)

    def __init__(self) -> None:
        self.offsets: dict[int, int] = {}

    def convert(self, index: int, chat: _ChatLogprobs | None) -> dict[str, Any] | None:
        if chat is None:
            return None
        tokens: list[str] = []
        token_logprobs: list[float] = []
        top: list[dict[str, float]] = []
        text_offset: list[int] = []
        offset = self.offsets.get(index, 0)
        for entry in chat.content or ():
            tokens.append(entry.token)
            token_logprobs.append(entry.logprob)
            top.append({t.token: t.logprob for t in entry.top_logprobs or ()})
            text_offset.append(offset)
            offset += len(entry.token)
        self.offsets[index] = offset
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": text_offset,
        }


def _add_usage(total: dict[str, int], usage: dict[str, Any] | None) -> None:
    if not usage:
        return
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        value = usage.get(name)
        if isinstance(value, int):
            total[name] = total.get(name, 0) + value


def completion_from_chat(
    answers: Sequence[dict[str, Any] | bytes],
    prompts: list[str],
    request: CompletionRequest,
    model: str,
) -> dict[str, Any]:
    """The text_completion for whole chat completions, one per prompt (in order)."""
    n, echo = request.n, request.echo
    logprobs = _Logprobs()
    choices: list[dict[str, Any]] = []
    usage: dict[str, int] = {}
    first: _ChatAnswer | None = None
    for number, (raw, prompt) in enumerate(zip(answers, prompts, strict=True)):
        answer = _decode_answer(raw if isinstance(raw, bytes) else msgspec.json.encode(raw))
        first = first or answer
        _add_usage(usage, answer.usage)
        for choice in answer.choices:
            message = choice.message or choice.delta or ChatMessage()
            index = number * n + choice.index
            choices.append(
                {
                    "text": (prompt if echo else "") + text_of(message.content),
                    "index": index,
                    "logprobs": logprobs.convert(index, choice.logprobs),
                    "finish_reason": _finish(choice.finish_reason) or "stop",
                }
            )
    choices.sort(key=lambda c: c["index"])
    completion: dict[str, Any] = {
        "id": "cmpl-" + secrets.token_hex(16),
        "object": "text_completion",
        "created": (first and first.created) or int(time.time()),
        "model": (first and first.model) or model,
        "choices": choices,
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
        },
    }
    if first is not None and first.system_fingerprint:
        completion["system_fingerprint"] = first.system_fingerprint
    return completion


def make_completions_bridge(
    chat: ProviderMethod,
    config: CompletionsConfig = _DEFAULT_CONFIG,
    admission: Admission | None = None,
    max_body_size: int = ServerConfig().max_body_size,
) -> ProviderMethod:
    """The ``completions`` method of a provider that only has ``chat`` (its chat_completions);
    ``admission`` counts each chat call after the first against the deployment's limits;
    ``max_body_size`` bounds what all the chat calls of one request carry besides prompts."""
    reader = _Prompts(config.max_prompts)
    concurrency = config.concurrency

    async def completions(call: Call) -> Reply:
        prompts = reader.of_raw(call.fields.get("prompt"))
        request = CompletionRequest(call.fields)
        if request.size() * len(prompts) > max_body_size:
            # Each prompt's chat call carries the shared fields: what the upstream would be
            # sent, all told, is bounded as one request body is.
            raise BadRequest(
                f"The request's other fields, sent once per prompt ({len(prompts)} prompts),"
                f" come to more than the largest request body ({max_body_size} bytes)",
                param="prompt",
                code="request_too_large",
            )
        if call.stream:
            return await _stream_reply(chat, call, request, prompts, admission)

        async def answer(number: int) -> Reply:
            sub = chat_call_for(call, request, prompts[number])
            if number == 0 or admission is None:  # the first is the request's own, counted
                return await chat(sub)
            admission.admit(sub)
            try:
                return await chat(sub)
            finally:
                admission.dismiss(sub)

        replies = await _all(answer, len(prompts), concurrency)
        if any(isinstance(reply, StreamReply) for reply in replies):
            await _close(replies)
            raise BadGateway("The chat provider streamed an answer that was not asked to stream")
        for reply in replies:
            if isinstance(reply, JSONReply) and reply.status >= 400:
                return scrubbed(reply, call)  # a provider's own error answer: pass it on
        try:
            completion = completion_from_chat(
                [reply.body for reply in replies],  # type: ignore[union-attr]
                prompts,
                request,
                call.model,
            )
        except msgspec.DecodeError:
            raise BadGateway(
                "The chat provider sent a completion the bridge cannot read",
                code="upstream_invalid_response",
            ) from None
        return JSONReply.of(completion)

    return completions


async def _all(
    answer: Callable[[int], Awaitable[Reply]], count: int, concurrency: int
) -> list[Reply]:
    """``answer(0)`` ... ``answer(count - 1)``, at most ``concurrency`` at once, in order; the
    first failure cancels the rest and is raised."""
    replies: list[Reply | None] = [None] * count
    numbers = iter(range(count))

    async def worker() -> None:
        for number in numbers:  # shared: each number is taken by one worker
            replies[number] = await answer(number)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, count)):
                group.create_task(worker())
    except BaseExceptionGroup as group_error:
        await _close(replies)
        raise group_error.exceptions[0] from None
    return replies  # type: ignore[return-value]


async def _close(replies: Sequence[Reply | None]) -> None:
    for reply in replies:
        if isinstance(reply, StreamReply):
            await reply.aclose()


async def _stream_reply(
    chat: ProviderMethod,
    call: Call,
    request: CompletionRequest,
    prompts: list[str],
    admission: Admission | None,
) -> Reply:
    """Start the first prompt's chat stream (so its failure keeps its status), then relay."""
    reply = await chat(chat_call_for(call, request, prompts[0]))
    if isinstance(reply, JSONReply) and reply.status >= 400:
        return scrubbed(reply, call)
    current: list[Callable[[], Awaitable[None]]] = []
    first: bytes | None = None
    if isinstance(reply, StreamReply):
        current.append(once(reply.aclose))
        first = await first_event(reply)

    async def close() -> None:
        while current:
            await current.pop()()

    return StreamReply(
        _relay(chat, call, request, prompts, reply, first, current, admission), close=close
    )


async def _relay(
    chat: ProviderMethod,
    call: Call,
    request: CompletionRequest,
    prompts: list[str],
    reply: Reply,
    first: bytes | None,
    current: list[Callable[[], Awaitable[None]]],
    admission: Admission | None,
) -> AsyncIterator[bytes]:
    n, echo = request.n, request.echo
    chunk_id = "cmpl-" + secrets.token_hex(16)
    created = int(time.time())
    model = call.model
    logprobs = _Logprobs()
    usage: dict[str, int] = {}
    try:
        for number, prompt in enumerate(prompts):
            if number:
                sub = chat_call_for(call, request, prompt)
                if admission is not None:
                    admission.admit(sub)
                    current.append(_dismissing(admission, sub))
                reply = await chat(sub)
                if isinstance(reply, StreamReply):
                    current.append(once(reply.aclose))
                    first = await first_event(reply)
            if isinstance(reply, JSONReply) and reply.status >= 400:
                # The headers are out: as one error event.
                yield b"data: " + scrub_bytes(reply.body, call.deployment) + b"\n\n"
                return
            if echo:
                choices = [_OutChoice(prompt, number * n + j) for j in range(n)]
                yield sse_data(
                    _OutChunk(id=chunk_id, created=created, model=model, choices=choices)
                )
            events = events_of(reply, first) if isinstance(reply, StreamReply) else _single(reply)
            async for event in events:
                data = data_of(event)
                if not data:
                    continue
                if data == b"[DONE]":
                    break
                try:
                    answer = _decode_answer(data)
                except msgspec.DecodeError:
                    raise BadGateway(
                        "The chat provider sent a chunk the bridge cannot read",
                        code="upstream_invalid_response",
                    ) from None
                if answer.error is not None:
                    # Already an error event: pass it on, the deployment's secrets masked.
                    yield b"data: " + scrub_bytes(data, call.deployment) + b"\n\n"
                    return
                model = answer.model or model
                _add_usage(usage, answer.usage)
                choices = []
                for choice in answer.choices:
                    message = choice.delta or choice.message or ChatMessage()
                    text = text_of(message.content)
                    if not text and choice.finish_reason is None:
                        continue  # the role chunk, or tool call pieces: nothing legacy can say
                    index = number * n + choice.index
                    choices.append(
                        _OutChoice(
                            text,
                            index,
                            logprobs.convert(index, choice.logprobs),
                            _finish(choice.finish_reason),
                        )
                    )
                if choices:
                    yield sse_data(
                        _OutChunk(id=chunk_id, created=created, model=model, choices=choices)
                    )
            while current:
                await current.pop()()
        if request.include_usage:
            totals = {
                name: usage.get(name, 0)
                for name in ("prompt_tokens", "completion_tokens", "total_tokens")
            }
            yield sse_data(
                _OutChunk(id=chunk_id, created=created, model=model, choices=[], usage=totals)
            )
        yield DONE
    finally:
        while current:
            await current.pop()()


def _dismissing(admission: Admission, call: Call) -> Callable[[], Awaitable[None]]:
    async def dismiss() -> None:
        admission.dismiss(call)

    return dismiss


async def _single(reply: JSONReply) -> AsyncIterator[bytes]:
    """A whole chat answer (from a provider that did not stream) as one event."""
    yield b"data: " + reply.body + b"\n\n"
