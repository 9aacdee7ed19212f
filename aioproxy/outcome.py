"""What ``after_response`` learns about a finished request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgspec

from .streaming import data_of, split_events

__all__ = ["Outcome", "Usage"]


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


class _UsageHolder(msgspec.Struct):
    usage: dict[str, Any] | None = None


class _Answer(msgspec.Struct):
    """An answer or one event of it: chat/completions carry ``usage``, Responses events
    ``response.usage``, Anthropic's message_start ``message.usage``; one decode reads any,
    skipping everything else."""

    usage: dict[str, Any] | None = None
    response: _UsageHolder | None = None
    message: _UsageHolder | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode
# Usage comes in a stream's last data events (the usage chunk, response.completed): only these
# are looked at, so a long stream without usage is not decoded whole.
_LAST_DATA_EVENTS = 3
_MESSAGE_START = b'"message_start"'  # the type of the Anthropic event that gives input tokens
_UNKNOWN = object()


class _Malformed(Exception):
    pass


def _count(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise _Malformed


def _usage_from(raw: dict[str, Any] | None) -> Usage | None:
    """Token counts in either API's names; None when absent or not counts."""
    if not raw:
        return None
    try:
        prompt = _count(raw.get("prompt_tokens", raw.get("input_tokens")))
        completion = _count(raw.get("completion_tokens", raw.get("output_tokens")))
        cached = _count(
            _detail(raw, "prompt_tokens_details", "input_tokens_details", "cached_tokens")
        )
        if "cache_read_input_tokens" in raw or "cache_creation_input_tokens" in raw:
            # Anthropic's input_tokens leave out what the prompt cache read and wrote.
            cached = _count(raw.get("cache_read_input_tokens"))
            prompt += cached + _count(raw.get("cache_creation_input_tokens"))
        total = _count(raw.get("total_tokens")) or prompt + completion
        reasoning = _count(
            _detail(raw, "completion_tokens_details", "output_tokens_details", "reasoning_tokens")
        )
    except _Malformed:
        return None
    return Usage(prompt, completion, total, cached, reasoning)


def _detail(raw: dict[str, Any], chat_name: str, responses_name: str, field: str) -> Any:
    """``raw[chat_name][field]`` (chat's names) or ``raw[responses_name][field]`` (Responses')."""
    details = raw.get(chat_name, raw.get(responses_name))
    if details is None:
        return None
    if not isinstance(details, dict):
        raise _Malformed
    return details.get(field)


class Outcome:
    """A finished request: its status, timing, and what is needed to find its usage."""

    __slots__ = (
        "_cost",
        "_usage",
        "body",
        "disconnected",
        "elapsed",
        "events",
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
        self.events = 0  # events relayed (counted when an after_response hook or a tpm cap is set)
        self.ttfb: float | None = None  # seconds from the request to the first byte upstream
        self.elapsed = 0.0  # seconds from the request to the end of the answer
        self.disconnected = False  # the client went away before the end
        # How to price the usage, USD (set by the spend plugin's after_response, tryfirst):
        # ``cost`` is computed the first time something reads it, so no one pays for it unread.
        self.pricer: Callable[[Usage | None], float | None] | None = None
        self._cost: Any = _UNKNOWN
        self._usage: Any = _UNKNOWN  # usage() once read (the tpm count and hooks may all ask)

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
                return _usage_of(_decode_answer(self.body))
            if not any(b'"usage"' in block for block in self.last_events):
                return None  # a stream without usage: no need to take its events apart
            looked_at = 0
            for block in reversed(self.last_events):
                for event in _events_from_end(block):
                    data = data_of(event)
                    if not data or data == b"[DONE]":
                        continue
                    usage = _usage_of(_decode_answer(data))
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


def _events_from_end(block: bytes) -> Iterator[bytes]:
    """A block's events, last first, cut off its end: a long stream's whole burst (50 events
    in one block) is not split and copied for the three at its end that usage is read from."""
    pieces = block.rstrip(b"\n").rsplit(b"\n\n", _LAST_DATA_EVENTS + 1)
    yield from reversed(pieces[1:])
    if len(pieces) <= _LAST_DATA_EVENTS + 1:  # the first piece is one event
        yield pieces[0]
    else:  # it holds the rest of the block
        yield from reversed(split_events(pieces[0] + b"\n\n"))


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
