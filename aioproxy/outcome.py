"""What ``after_response`` learns about a finished request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, Any

import msgspec

from .streaming import data_of, split_events

__all__ = ["Outcome", "Usage", "answer_usage", "chunk_usage"]


class Usage(msgspec.Struct, frozen=True):
    """Token counts, in chat-completions terms whatever the endpoint kind.

    ``cached_tokens`` are the part of ``prompt_tokens`` read from the provider's prompt cache,
    and ``reasoning_tokens`` the part of ``completion_tokens`` spent thinking: both are priced
    differently, so spend and metrics need them apart.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0


# A token count: msgspec refuses anything else (a bool, a float, a negative number, or more
# than half a billion: no request is that long, and a row's sums must fit PostgreSQL's 32-bit
# integer columns), and with it the whole usage, read as no usage at all (then estimated).
_Count = Annotated[int, msgspec.Meta(ge=0, le=500_000_000)]


class _Details(msgspec.Struct):
    cached_tokens: _Count | None = None
    reasoning_tokens: _Count | None = None


class _RawUsage(msgspec.Struct):
    """A usage object in any API's names (chat/completions, Responses, Anthropic's), decoded
    and checked by msgspec in C: reading it is a few attribute loads, not a walk of a dict."""

    prompt_tokens: _Count | None = None
    completion_tokens: _Count | None = None
    total_tokens: _Count | None = None
    input_tokens: _Count | None = None  # Responses', Anthropic's
    output_tokens: _Count | None = None
    prompt_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None
    # Anthropic's input_tokens leave out what the prompt cache read and wrote.
    cache_read_input_tokens: _Count | None = None
    cache_creation_input_tokens: _Count | None = None


class _UsageHolder(msgspec.Struct):
    usage: _RawUsage | None = None


class _Answer(msgspec.Struct):
    """An answer or one event of it: chat/completions carry ``usage``, Responses events
    ``response.usage``, Anthropic's message_start ``message.usage``; one decode reads any,
    skipping everything else."""

    usage: _RawUsage | None = None
    response: _UsageHolder | None = None
    message: _UsageHolder | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode
# Usage comes in a stream's last data events (the usage chunk, response.completed): only these
# are looked at, so a long stream without usage is not decoded whole.
_LAST_DATA_EVENTS = 3
_MESSAGE_START = b'"message_start"'  # the type of the Anthropic event that gives input tokens
_UNKNOWN = object()


def _usage_from(raw: _RawUsage | None) -> Usage | None:
    """Token counts in either API's names; None when absent or empty."""
    if raw is None:
        return None
    # Chat's name for each field if the answer has it, else the Responses/Anthropic one (read
    # inline, not by a helper: every answer's usage passes here).
    prompt = raw.prompt_tokens if raw.prompt_tokens is not None else raw.input_tokens
    completion = raw.completion_tokens if raw.completion_tokens is not None else raw.output_tokens
    total = raw.total_tokens
    read, written = raw.cache_read_input_tokens, raw.cache_creation_input_tokens
    if prompt is None and completion is None and total is None and read is None:
        return None
    prompt, completion = prompt or 0, completion or 0
    details = raw.prompt_tokens_details
    if details is None:
        details = raw.input_tokens_details
    cached = (details.cached_tokens or 0) if details is not None else 0
    if read is not None or written is not None:
        cached = read or 0
        prompt += cached + (written or 0)
    details = raw.completion_tokens_details
    if details is None:
        details = raw.output_tokens_details
    reasoning = (details.reasoning_tokens or 0) if details is not None else 0
    return Usage(prompt, completion, total or prompt + completion, cached, reasoning)


class Outcome:
    """A finished request: its status, timing, and what is needed to find its usage."""

    __slots__ = (
        "_cost",
        "_events",
        "_usage",
        "body",
        "disconnected",
        "elapsed",
        "error_code",
        "first",
        "last_events",
        "pricer",
        "status",
        "stream",
        "ttfb",
    )

    def __init__(self, status: int, stream: bool) -> None:
        self.status = status
        self.stream = stream
        self.body: bytes | None = None  # the whole body of a non-streamed answer
        self.last_events: tuple[
            bytes, ...
        ] = ()  # a stream's last blocks of events (usage is there)
        # A stream's first block: Anthropic's message_start has the input tokens there.
        self.first: bytes | None = None
        # Events relayed (counted when an after_response hook or a tpm cap is set); None: the
        # stream came whole in ``first``, counted there if ever read.
        self._events: int | None = 0
        self.ttfb: float | None = None  # seconds from the request to the first byte upstream
        self.elapsed = 0.0  # seconds from the request to the end of the answer
        self.disconnected = False  # the client went away before the end
        # The code of the error that cut a stream short after its status went out (the client
        # got its 200, then an error event): ``status`` stays the one the client got.
        self.error_code: str | None = None
        # How to price the usage, USD (set by the spend plugin's after_response, tryfirst):
        # ``cost`` is computed the first time something reads it, so no one pays for it unread.
        self.pricer: Callable[[Usage | None], float | None] | None = None
        self._cost: Any = _UNKNOWN
        self._usage: Any = _UNKNOWN  # usage() once read (the tpm count and hooks may all ask)

    @property
    def events(self) -> int:
        """The stream's events, for an estimate of its answer's tokens when it reported none."""
        if self._events is None:
            self._events = self.first.count(b"\n\n") if self.first is not None else 0
        return self._events

    @events.setter
    def events(self, count: int) -> None:
        self._events = count

    def came_whole(self) -> None:
        """The whole stream was ``first``, one block: its events are counted only if read (the
        usual stream reports its usage, and a scan of every byte would be for nothing)."""
        self.last_events = (self.first,) if self.first is not None else ()
        self._events = None

    @property
    def cost(self) -> float | None:
        """USD: what a plugin set, else the usage priced by ``pricer`` (on first read);
        None: not priced (no price known, no usage reported, or no spend plugin)."""
        cost = self._cost
        if cost is _UNKNOWN:
            pricer = self.pricer
            cost = self._cost = None if pricer is None else pricer(self.usage())
        return cost  # type: ignore[no-any-return]

    @cost.setter
    def cost(self, value: float | None) -> None:
        self._cost = value

    def usage(self) -> Usage | None:
        """The token usage the upstream reported, if it did (read once, then remembered)."""
        if self._usage is _UNKNOWN:
            self._usage = self._read_usage()
        return self._usage  # type: ignore[no-any-return]

    def record_usage(self, usage: Usage | None) -> None:
        """Set the usage (a plugin that took the usage chunk out of a stream read it there)."""
        self._usage = usage

    def _read_usage(self) -> Usage | None:
        try:
            if self.body is not None:
                return _body_usage(self.body)
            looked_at = 0
            for block in reversed(self.last_events):
                for event in _events_from_end(block):
                    data = data_of(event)
                    if not data or data == b"[DONE]":
                        continue
                    # Only an event that says "usage" is decoded: a stream without usage is
                    # not taken apart, and only its last few events are looked at.
                    usage = _event_usage(data) if data.find(b'"usage"') >= 0 else None
                    if usage is not None:
                        if not usage.prompt_tokens and self.first is not None:
                            return _with_start(usage, self.first)
                        return usage
                    looked_at += 1
                    if looked_at == _LAST_DATA_EVENTS:
                        return None
        except msgspec.DecodeError:
            return None
        return None


def _event_usage(data: bytes) -> Usage | None:
    try:
        return _usage_of(_decode_answer(data))
    except msgspec.ValidationError:
        return None  # this event's usage is not counts: look further back


def answer_usage(data: bytes) -> Usage | None:
    """The usage one JSON answer (or one SSE event's data) reports, if any; None if it reports
    none, or is not JSON."""
    try:
        return _body_usage(data)
    except msgspec.DecodeError:
        return None


class _Chunk(msgspec.Struct):
    """A chat/completions stream chunk as the usage tap reads it: ``choices`` left undecoded
    (only compared with ``[]``; a Raw cannot be Optional, so absent reads as null)."""

    choices: msgspec.Raw = msgspec.Raw(b"null")
    usage: _RawUsage | None = None


class _LooseChunk(msgspec.Struct):
    """The same, its usage undecoded: for a usage whose counts are not counts."""

    choices: msgspec.Raw = msgspec.Raw(b"null")
    usage: msgspec.Raw = msgspec.Raw(b"null")


_decode_chunk = msgspec.json.Decoder(_Chunk).decode
_decode_loose_chunk = msgspec.json.Decoder(_LooseChunk).decode
_NO_CHOICES = frozenset({b"[]", b"null"})


def chunk_usage(data: bytes) -> tuple[bool, Usage | None] | None:
    """One stream chunk's data, decoded once: None when it has no usage (or is not JSON);
    else whether it is a usage-only chunk (no choices), and its usage (None: not counts)."""
    try:
        chunk = _decode_chunk(data)
    except msgspec.ValidationError:  # a usage, but not counts: still a usage chunk
        try:
            loose = _decode_loose_chunk(data)
        except msgspec.DecodeError:
            return None
        if bytes(loose.usage) == b"null":
            return None
        return _no_choices(loose.choices), None
    except msgspec.DecodeError:
        return None
    if chunk.usage is None:
        return None
    choices = bytes(chunk.choices)  # a usage chunk's "[]" as OpenAI writes it, with no call
    # A choice (an object: a chunk of tokens with its usage) rules out no choices, with no call.
    no_choices = choices == b"[]" or (choices.find(b"{") < 0 and _no_choices(choices))
    return no_choices, _usage_from(chunk.usage)


def _no_choices(choices: msgspec.Raw | bytes) -> bool:
    return bytes(choices).replace(b" ", b"") in _NO_CHOICES


def _body_usage(body: bytes) -> Usage | None:
    """A whole answer's usage. A long one (embeddings: 1,536 floats a vector) is not decoded
    whole: its last ``"usage"`` is decoded from there to the end, as an object of its own. That
    only decodes when the key belongs to the answer itself (a key of a nested object leaves
    closing brackets over, a string value "usage" is no key, and a quote inside a string is
    escaped), so anything else falls back to decoding the whole answer."""
    if len(body) > _WHOLE_UNDER:
        at = body.rfind(b'"usage"')
        if at > 0:
            try:
                usage = _usage_of(_decode_answer(b"{" + body[at:]))
            except msgspec.DecodeError:
                usage = None
            if usage is not None:
                return usage
    return _usage_of(_decode_answer(body))


# Answers shorter than this are decoded whole: the tail's copy and second decode would not pay.
_WHOLE_UNDER = 2048


def _events_from_end(block: bytes) -> Iterator[bytes]:
    """A block's events, last first, found from its end: a long stream's whole burst (50 events
    in one block) is neither split nor copied for the few at its end that usage is read from."""
    end = len(block)
    while end and block[end - 1] == _NEWLINE:
        end -= 1
    for _ in range(_LAST_DATA_EVENTS + 1):
        start = block.rfind(b"\n\n", 0, end)
        if start < 0:  # the first event of the block
            yield block[:end]
            return
        yield block[start + 2 : end]
        end = start
    yield from reversed(split_events(block[:end] + b"\n\n"))  # the rest, if still wanted


_NEWLINE = ord("\n")


def _usage_of(answer: _Answer) -> Usage | None:
    if answer.response is not None:  # a Responses API object or event
        return _usage_from(answer.response.usage)
    if answer.message is not None:  # Anthropic's message_start
        return _usage_from(answer.message.usage)
    return _usage_from(answer.usage)


def _with_start(usage: Usage, first: bytes) -> Usage:
    """An Anthropic stream's final usage (message_delta: output tokens, input ones since
    2025) completed by what its message_start said of the input.

    ``first`` may be the whole stream (a burst in one read): message_start's event is found
    by a search and only it is cut out and decoded, never the block split into its events.
    (Inside a JSON string the quotes would be escaped: the search finds only the token.)"""
    at = first.find(_MESSAGE_START)
    while at >= 0:
        begin = first.rfind(b"\n\n", 0, at)
        begin = 0 if begin < 0 else begin + 2
        end = first.find(b"\n\n", at)
        if end < 0:
            end = len(first)
        data = data_of(first[begin:end])
        if _MESSAGE_START in data:  # not in a comment
            try:
                start = _usage_of(_decode_answer(data))
            except msgspec.DecodeError:
                return usage
            if start is None:
                return usage
            prompt, cached = start.prompt_tokens, start.cached_tokens
            return Usage(prompt, usage.completion_tokens, prompt + usage.completion_tokens, cached)
        at = first.find(_MESSAGE_START, end)
    return usage
