"""Relaying an OpenAI-compatible upstream's answer unchanged (``Upstream.forward``): a JSON
answer checked to be an object without an error in it, a stream event by event with its error
events turned into the client's error, secrets masked, and its final event checked."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ._aiohttp import arrived_chunk, read_any
from .budget import BufferBudget
from .context import Deployment
from .errors import ANTHROPIC_STATUSES, BadGateway, ProxyError
from .failures import error_event, raise_stream_failure, scrub_bytes, stream_error
from .routes import Kind
from .streaming import MAX_EVENT, SSEBlocks, data_of, split_events
from .transport import UpstreamResponse

__all__ = ["PassedEvents", "check_answer", "events"]


def check_answer(data: bytes, deployment: Deployment) -> None:
    """Refuse a 2xx answer that is plainly not a JSON object (an HTML error page, a proxy's
    banner), or that carries an error (still the upstream's error, whatever its status).

    Only its ends are looked at: the body is relayed as it is, and parsing a large answer (an
    embeddings list) whole would cost more than the rest of the hop; a client that decodes it
    still gets a JSON error of its own if its middle is broken.
    """
    if data[:64].lstrip()[:1] != b"{" or data[-64:].rstrip()[-1:] != b"}":
        raise BadGateway(
            f"Deployment {deployment.describe()} sent an answer that is not a JSON object",
            code="upstream_invalid_response",
        )
    # Anywhere in the object: an error may follow other fields. The search is quick (a short
    # answer's right here, no call); the decode (top-level keys only) runs only when it found
    # the key.
    short = len(data) <= _SCAN_BY_R_ABOVE
    if (data.find(_ERROR_KEY) >= 0 if short else _mentions_error(data)) and (
        error := stream_error(data, deployment)
    ):
        raise error


_ERROR_KEY = b'"error"'
_SCAN_BY_R_ABOVE = 2048  # bytes; below, the plain search is as cheap
_R_TRIES = 4  # "r"s looked at before the plain search takes over (a text has many)


def _mentions_error(data: bytes) -> bool:
    """Whether ``"error"`` occurs in ``data``, as ``data.find`` says, sooner for a long answer
    of numbers (embeddings): bytes' 7-byte search skips little over digits (its skip table
    takes ``2`` for the ``r`` it holds), while a one-byte search is memchr. So the ``r``s of a
    long answer (an embeddings answer has one or two) are found first, each checked for the
    key around it, and past a few (a text) the plain search goes on from there. Measured on
    the bench's 12 KB embeddings answer: 4.1 -> 0.6 us (~10 k instructions a request)."""
    if len(data) <= _SCAN_BY_R_ABOVE:
        return data.find(_ERROR_KEY) >= 0
    start = 0
    for _ in range(_R_TRIES):
        at = data.find(b"r", start)
        if at < 0:
            return False
        if at >= 2 and data.startswith(_ERROR_KEY, at - 2):  # its first "r" is its third byte
            return True
        start = at + 1
    # No key starts before start - 2: each would have an "r" looked at already.
    return data.find(_ERROR_KEY, max(0, start - 2)) >= 0


# How a complete stream ends, per endpoint kind: without it, the upstream cut the stream short.
_DONE = re.compile(rb"^data: ?\[DONE\]\s*$", re.MULTILINE)
# Responses events may come with or without an `event:` line: read the type either way.
_RESPONSE_END = re.compile(
    rb"^event: ?(?:response\.(?:completed|incomplete|failed)|error)\s*$"
    rb'|"type": ?"(?:response\.(?:completed|incomplete|failed)|error)"',
    re.MULTILINE,
)
# Anthropic's Messages stream ends with message_stop (its error event ends it too, raised).
_MESSAGE_END = re.compile(rb'^event: ?message_stop\s*$|"type": ?"message_stop"', re.MULTILINE)
_FINAL_EVENTS: dict[Kind, re.Pattern[bytes]] = {
    Kind.CHAT_COMPLETIONS: _DONE,
    Kind.COMPLETIONS: _DONE,
    Kind.RESPONSES: _RESPONSE_END,
    Kind.MESSAGES: _MESSAGE_END,
}


class PassedEvents(SSEBlocks):
    """The upstream's events as they come. An error event ends the stream as the client's error
    (raised: the handler sends it as one event, scrubbed); other events naming an error (a
    Responses ``response.failed``) go out scrubbed. Only blocks holding ``error`` are looked
    into, so the common event costs one search. No complete event for ``idle`` seconds is a
    timeout. Unfinished events count against ``budget`` (the Upstream's; else the one the
    lean pool's answer carries).

    The SSE blocks of the body themselves (an SSEBlocks), not an iterator around them: a stream
    makes one iterator, and a block costs one ``__anext__``, not two (measured: ~90 bytecodes a
    stream less). Nor an async generator: no event loop's async-generator hooks (a WeakSet
    entry made, then removed), generator frame or ``aclose``. It ends for good once it fails,
    is read to its end or is closed, its held budget bytes given back (dropped unclosed,
    SSEBlocks.__del__ gives them back)."""

    __slots__ = ("_deployment", "_error", "_kind", "_last", "_response", "transform")

    def __init__(
        self,
        response: UpstreamResponse,
        deployment: Deployment,
        kind: Kind,
        idle: float | None,
        budget: BufferBudget | None = None,
    ) -> None:
        if budget is None:
            budget = getattr(response, "budget", None)
        SSEBlocks.__init__(self, response.content, MAX_EVENT, idle, time.monotonic, budget, b"\n\n")
        self._response = response
        self._deployment = deployment
        self._kind = kind
        self._last = b""  # the last block passed on: the stream's final event is checked there
        # An error event found after events passed on with it: raised by the next read.
        self._error: ProxyError | None = None
        # What each block passed on goes through first (the usage tap's strip), if set; a block
        # it empties passes nothing on. In here, not an iterator around this one (measured: ~20
        # bytecodes and a coroutine a block less, and the outer iterator's aclose).
        self.transform: Callable[[bytes], bytes] | None = None

    def __aiter__(self) -> PassedEvents:
        return self

    async def __anext__(self) -> bytes:
        content = self._content
        if content is None:
            raise StopAsyncIteration
        try:
            if (error := self._error) is not None:
                raise error
            transform = self.transform
            while True:
                chunk = arrived_chunk(content)  # read_any's, with no coroutine, if it came
                if chunk is None:
                    chunk = await read_any(content)
                if not self._pending and chunk.endswith(b"\n\n") and chunk.find(b"\r") < 0:
                    block = chunk  # the usual case (as in SSEBlocks): whole events
                elif not (block := self._completed(chunk)):
                    continue
                # The rare block worth a closer look (measured: ~1 ns a byte). ``find``, not
                # ``in``: ``b"..." in block`` first tries its operand as an integer, raising and
                # clearing a TypeError per event.
                if block.find(b"error") >= 0:
                    block, error = _errors_in(block, self._deployment, self._kind)
                    if error is not None:
                        if block and transform is not None:
                            block = transform(block)
                        if not block:
                            raise error
                        self._error = error  # the events before it go out first
                        return block
                self._last = block
                if transform is None:
                    return block
                if block := transform(block):
                    return block
        except StopAsyncIteration:
            self.close()  # read to its end
        except Exception as exc:  # noqa: BLE001 - raise_stream_failure maps every failure
            self.close()
            raise_stream_failure(exc, self._deployment)
        except BaseException:
            self.close()
            raise
        self._check_complete()
        raise StopAsyncIteration

    def _check_complete(self) -> None:
        """A stream that ended without its kind's final event was cut short: the client's 502;
        a complete one lets its upstream answer go."""
        final = _FINAL_EVENTS.get(self._kind)
        last_event = self._last.rstrip(b"\n").rpartition(b"\n\n")[2]
        if final is not None and final.search(last_event) is None:
            raise BadGateway(
                f"Deployment {self._deployment.describe()} ended its stream before it was complete",
                code="upstream_stream_incomplete",
            )
        self._response.release()


_ERROR_EVENT = re.compile(rb"^event: ?error[ \t]*$", re.MULTILINE)  # an SSE event named "error"


events = PassedEvents  # made at once: no function around it (~20 bytecodes a stream)


def _errors_in(block: bytes, deployment: Deployment, kind: Kind) -> tuple[bytes, ProxyError | None]:
    """A block's events up to its first error event (those naming an error scrubbed), and that
    event as the client's error. An error event: data with an ``error`` object, or (but in the
    Responses API, where it is a final event of the protocol) an event named ``error``."""
    kept: list[bytes] = []
    for event in split_events(block):
        data = data_of(event) if b'"error"' in event or b"event:" in event else b""
        error = stream_error(data, deployment) if b'"error"' in data else None
        named = _ERROR_EVENT.search(event) is not None
        if error is None and named and kind is not Kind.RESPONSES:
            error = error_event(data, deployment)
        if error is not None:
            if kind is Kind.MESSAGES:  # Anthropic's error type says the status it stands for
                error.status = ANTHROPIC_STATUSES.get(error.type, error.status)
            return b"".join(kept), error
        kept.append(scrub_bytes(event, deployment) if named or _names_an_error(event) else event)
    return b"".join(kept), None


def _names_an_error(event: bytes) -> bool:
    """Whether an event holds an error (``response.failed``'s), not only ``"error": null``
    (every Responses event that carries the response object has one)."""
    return event.count(b'"error"') > event.count(b'"error":null') + event.count(b'"error": null')
