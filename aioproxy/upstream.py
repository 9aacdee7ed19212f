"""Calling upstreams: the app's pooled ClientSession, timeouts, and client errors as ProxyErrors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from typing import NoReturn

import aiohttp
import msgspec

from .budget import BufferBudget
from .config import Config, Timeouts
from .context import Call, Deployment
from .errors import BadGateway, GatewayTimeout, ProxyError
from .h1client import H1Pool, UpstreamConnectError
from .headers import never_forwarded
from .masking import mask_of
from .replies import JSONReply, Reply, StreamReply
from .routes import Kind
from .streaming import (
    EventTooLarge,
    StreamStalled,
    data_of,
    iter_sse,
    iter_sse_blocks,
    split_events,
)
from .transport import SessionTransport, StreamTimeout, Transport, UpstreamResponse
from .transport import client_timeout as timeout_for

__all__ = [
    "ErrorReader",
    "Upstream",
    "answer_of",
    "closed_on_failure",
    "deployment_timeout",
    "failure_from",
    "forward",
    "forwardable",
    "make_session",
    "openai_error",
    "post_via",
    "read_capped",
    "read_upstream_error",
    "scrub",
    "scrub_bytes",
    "StreamTimeout",
    "stream_error",
    "timeout_for",
    "timeouts_of",
]

# Upstream bodies we read whole (answers and error bodies) are capped, so a hostile upstream cannot
# exhaust memory.
MAX_UPSTREAM_BODY = 64 * 1024 * 1024
_ERROR_PREVIEW = 300


def make_session(config: Config) -> aiohttp.ClientSession:
    """The app's one pooled session; per-call timeouts come from the deployment."""
    connector = aiohttp.TCPConnector(
        limit=config.upstream.max_connections,
        limit_per_host=0,
        ttl_dns_cache=300,
        enable_cleanup_closed=False,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout_for(config.upstream.timeouts),
        # A gateway serves many callers: never carry one caller's cookies into another's call.
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=True,
        raise_for_status=False,
    )


async def post_via(
    session: aiohttp.ClientSession,
    pool: H1Pool | None,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout | None,
) -> UpstreamResponse:
    """POST through ``pool`` when there is one, else ``session``; redirects never followed."""
    if pool is not None:
        return await pool.post(url, body, headers, timeout or session.timeout)
    return await session.post(
        url, data=body, headers=headers, timeout=timeout, allow_redirects=False
    )


def timeouts_of(deployment: Deployment, config: Config) -> Timeouts:
    """The deployment's timeouts (config ones are already merged over the global ones)."""
    return deployment.timeouts or config.upstream.timeouts


def deployment_timeout(call: Call, config: Config) -> aiohttp.ClientTimeout:
    return timeout_for(timeouts_of(call.deployment, config))


def failure_from(exc: BaseException, deployment: Deployment | None) -> ProxyError:
    """An aiohttp client error or timeout as the 502/504 the client should see."""
    where = deployment.describe() if deployment is not None else "the upstream"
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return GatewayTimeout(f"Deployment {where} did not answer in time")
    if isinstance(exc, (aiohttp.ClientConnectorError, UpstreamConnectError)):
        return BadGateway(f"Could not connect to deployment {where}", code="upstream_unreachable")
    if isinstance(exc, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return BadGateway(
            f"Deployment {where} closed the connection before answering in full",
            code="upstream_disconnected",
        )
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return BadGateway(f"Connection to deployment {where} failed", code="upstream_error")
    return BadGateway(f"Deployment {where} failed: {type(exc).__name__}", code="upstream_error")


def scrub(text: str, deployment: Deployment) -> str:
    """Mask every form of the deployment's secrets (key, header values, URL credentials; as
    sent, URL-, JSON- or base64-encoded) and anything key-like in upstream text."""
    return mask_of(deployment).text(text)


def scrub_bytes(data: bytes, deployment: Deployment) -> bytes:
    """:func:`scrub` for raw bytes, e.g. a relayed event."""
    return mask_of(deployment).bytes(data)


class _UpstreamErrorBody(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _UpstreamError(msgspec.Struct):
    error: _UpstreamErrorBody | str | None = None
    message: str | None = None


class _AnyError(msgspec.Struct):
    """Whether a JSON object (an answer, an event) carries an error, whatever its shape."""

    error: object = None


_decode_error = msgspec.json.Decoder(_UpstreamError).decode
_decode_any_error = msgspec.json.Decoder(_AnyError).decode
_SSE_ERROR_SCAN = 64 * 1024  # bytes of an SSE error body looked through for its error event

ErrorFields = tuple[str | None, str | None, str | None, str | None]  # message, type, param, code


def _json_error_fields(body: bytes) -> ErrorFields | None:
    try:
        parsed = _decode_error(body)
    except msgspec.DecodeError:
        return None
    if isinstance(parsed.error, _UpstreamErrorBody):
        error = parsed.error
        code = None if error.code is None else str(error.code)
        return error.message, error.type, error.param, code
    if isinstance(parsed.error, str):
        return parsed.error, None, None, None
    return parsed.message, None, None, None


def _error_fields(body: bytes) -> ErrorFields | None:
    """An error body's fields: a JSON error object, or an SSE body's first error event."""
    fields = _json_error_fields(body)
    if fields is not None or b"data:" not in body[:_SSE_ERROR_SCAN]:
        return fields
    for event in split_events(body[:_SSE_ERROR_SCAN].replace(b"\r\n", b"\n")):
        fields = _json_error_fields(data_of(event))
        if fields is not None and fields[0] is not None:
            return fields
    return None
# A 404 whose words are about the model, as servers without OpenAI's code say it ("The model
# `x` does not exist.", 'model "x" not found'); a missing route's 404 ("Not Found") is not.
_ABOUT_MODEL = re.compile(r"\bmodel\b", re.IGNORECASE)


def read_upstream_error(status: int, body: bytes, deployment: Deployment) -> ProxyError:
    """An upstream's error answer as the error the client sees.

    4xx and 5xx statuses pass through with the upstream's message (scrubbed of anything key-like),
    except where the proxy's configuration is at fault, not the request: 401/403 mean the
    *proxy's* upstream key was refused (a 502, without the upstream's words), and a 404 about
    the model (OpenAI's ``model_not_found``; vLLM's and Ollama's words) means the deployment's
    upstream model id is wrong (a 502, which the router retries on another deployment).
    """
    return _upstream_error(status, _error_fields(body), body, deployment, f"answered {status}")


def _upstream_error(
    status: int, fields: ErrorFields | None, body: bytes, deployment: Deployment, what: str
) -> ProxyError:
    where = deployment.describe()
    if status in (401, 403):
        return BadGateway(
            f"Deployment {where} refused the proxy's credentials (upstream status {status})",
            code="upstream_auth_failed",
        )
    message, type_, param, code = fields or (None, None, None, None)
    said = message if message is not None else body[:_ERROR_PREVIEW].decode("utf-8", "replace")
    if status == 404 and (code == "model_not_found" or _ABOUT_MODEL.search(said)):
        return BadGateway(
            scrub(f"Deployment {where}: the upstream has no such model: {said}", deployment),
            code="upstream_model_not_found",
        )
    if message is None:
        text = said.strip()
        message = f"Deployment {where} {what}" + (f": {text}" if text else "")
    elif status >= 500:  # the upstream failed, not the request: say which deployment
        message = f"Deployment {where} {what}: {message}"
    if type_ is None:
        type_ = "invalid_request_error" if status < 500 else "upstream_error"
    return ProxyError(
        scrub(message, deployment),
        status=status,
        type=scrub(type_, deployment),
        param=param and scrub(param, deployment),
        code=code and scrub(code, deployment),
    )


def stream_error(data: bytes, deployment: Deployment) -> ProxyError | None:
    """The error an upstream's event (or 2xx answer) carries, as the client's error; None when
    it carries none (``"error": null``). Its status is the one the error names (vLLM, LiteLLM:
    ``"code": 429``), else 502."""
    try:
        if not _decode_any_error(data).error:
            return None
    except msgspec.DecodeError:
        return None
    fields = _json_error_fields(data)
    code = fields[3] if fields is not None else None
    status = int(code) if code is not None and code.isdigit() and 400 <= int(code) < 600 else 502
    return _upstream_error(status, fields, data, deployment, "sent an error")


async def read_capped(
    response: UpstreamResponse, deployment: Deployment
) -> bytes:
    """The whole upstream body, refusing one over MAX_UPSTREAM_BODY. While it is read, its
    bytes count against the app's buffer budget (the lean pool's answers carry it): BufferFull
    (a 503) when the gateway holds too much already."""
    budget: BufferBudget | None = getattr(response, "budget", None)
    length = response.content_length
    if length is not None and length <= MAX_UPSTREAM_BODY:
        if budget is None:
            return await response.read()
        budget.take(length)
        try:
            return await response.read()
        finally:
            budget.give(length)
    chunks, size = [], 0
    try:
        async for chunk in response.content.iter_any():
            if budget is not None:
                budget.take(len(chunk))
            size += len(chunk)
            chunks.append(chunk)
            if size > MAX_UPSTREAM_BODY:
                raise BadGateway(
                    f"Deployment {deployment.describe()} sent an answer too large",
                    code="upstream_too_large",
                )
        return b"".join(chunks)
    finally:
        if budget is not None:
            budget.give(size)


def _check_json(body: bytes, deployment: Deployment) -> None:
    """Refuse an answer that is plainly not a JSON object (an HTML error page, a proxy's banner).

    Only its ends are looked at: the body is relayed as it is, and parsing a large answer (an
    embeddings list) whole would cost more than the rest of the hop; a client that decodes it
    still gets a JSON error of its own if its middle is broken.
    """
    if body[:64].lstrip()[:1] != b"{" or body[-64:].rstrip()[-1:] != b"}":
        raise BadGateway(
            f"Deployment {deployment.describe()} sent an answer that is not a JSON object",
            code="upstream_invalid_response",
        )


ErrorReader = Callable[[int, bytes, Deployment, Mapping[str, str]], ProxyError]


def openai_error(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    """An OpenAI-format error answer as the client's error, with Retry-After kept on a 429."""
    error = read_upstream_error(status, body, deployment)
    retry_after = headers.get("Retry-After")
    if retry_after is not None and error.status == 429:
        error.headers = {"Retry-After": retry_after}
    return error


async def answer_of(
    sending: Awaitable[UpstreamResponse],
    deployment: Deployment,
    read_error: ErrorReader = openai_error,
) -> UpstreamResponse:
    """The upstream's 2xx answer to a POST in flight (``Provider.post(...)``), or the client's
    error: connect errors and timeouts as 502/504, a redirect as a 502 (never followed: it could
    carry the key to another host), any other status read (capped) by ``read_error``. The
    caller owns the answer: read it inside :func:`closed_on_failure`, then release it."""
    try:
        response = await sending
    except Exception as exc:  # connect errors and timeouts before any answer
        raise failure_from(exc, deployment) from exc
    if response.status < 300:
        return response
    with closed_on_failure(response, deployment):
        body = await read_capped(response, deployment)
        if response.status < 400:
            raise BadGateway(
                f"Deployment {deployment.describe()} answered with a redirect "
                f"({response.status}); redirects are not followed",
                code="upstream_redirect",
            )
        raise read_error(response.status, body, deployment, response.headers)
    raise AssertionError("unreachable")  # pragma: no cover


class closed_on_failure:  # noqa: N801 - used like a function: `with closed_on_failure(...)`
    """Close the upstream answer if the block fails (cancelled too: the client left, a
    first-byte timeout), with client errors as the client's 502/504.

    A class, not a @contextmanager: it is on every call's path, and a generator-based one
    costs a generator and a wrapper object each time.
    """

    __slots__ = ("response", "deployment")

    def __init__(self, response: UpstreamResponse, deployment: Deployment) -> None:
        self.response = response
        self.deployment = deployment

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object
    ) -> None:
        if exc is None:
            return
        self.response.close()
        if isinstance(exc, Exception) and not isinstance(exc, ProxyError):
            raise failure_from(exc, self.deployment) from exc


async def forward(
    call: Call,
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout | None,
    body: bytes | None = None,
    *,
    pool: H1Pool | None = None,
) -> Reply:
    """POST the call's body to an OpenAI-compatible ``url`` and relay the answer.

    A streamed answer (``text/event-stream``) is relayed event by event; anything else is read
    whole and checked to be a JSON object. Given the app's ``pool`` (``Provider.pool``), the
    call goes through that lean client instead of ``session``.
    """
    payload = call.body() if body is None else body
    sending = post_via(session, pool, url, payload, headers, timeout)
    return await _relay_answer(call, sending, getattr(timeout, "event", None))


async def _relay_answer(
    call: Call, sending: Awaitable[UpstreamResponse], idle: float | None
) -> Reply:
    """The answer to a pass-through POST in flight: :func:`forward`'s relay (``idle``: the
    longest a stream may go without a complete event)."""
    deployment = call.deployment
    response = await answer_of(sending, deployment)
    with closed_on_failure(response, deployment):
        if response.content_type == "text/event-stream":
            return StreamReply(
                _relay(response, deployment, call.kind, idle),
                close=response.close,
                finished=response.content.is_eof,
            )
        data = await read_capped(response, deployment)
        _check_json(data, deployment)
        if data.find(b'"error"', 0, 64) >= 0 and (error := stream_error(data, deployment)):
            raise error  # an error answered with a 2xx status: still the upstream's error
    response.release()
    return JSONReply(data, response.status)


# How a complete stream ends, per endpoint kind: without it, the upstream cut the stream short.
_DONE = re.compile(rb"^data: ?\[DONE\]\s*$", re.M)
# Responses events may come with or without an `event:` line: read the type either way.
_RESPONSE_END = re.compile(
    rb'^event: ?(?:response\.(?:completed|incomplete|failed)|error)\s*$'
    rb'|"type": ?"(?:response\.(?:completed|incomplete|failed)|error)"',
    re.M,
)
_FINAL_EVENTS: dict[Kind, re.Pattern[bytes]] = {
    Kind.CHAT_COMPLETIONS: _DONE,
    Kind.COMPLETIONS: _DONE,
    Kind.RESPONSES: _RESPONSE_END,
}


async def _relay(
    response: UpstreamResponse, deployment: Deployment, kind: Kind, idle: float | None
) -> AsyncIterator[bytes]:
    """The upstream's events as they come. An error event ends the stream as the client's error
    (raised: the handler sends it as one event, scrubbed); other events naming an error (a
    Responses ``response.failed``) go out scrubbed. Only blocks holding ``error`` are looked
    into, so the common event costs one search. No complete event for ``idle`` seconds is a
    timeout."""
    last = b""
    blocks = iter_sse_blocks(
        response.content, idle=idle, budget=getattr(response, "budget", None)
    )
    try:
        async for block in blocks:
            if b"error" in block:  # the rare block worth a closer look (measured: ~1 ns a byte)
                block, error = _errors_in(block, deployment, kind)
                if error is not None:
                    if block:
                        yield block
                    raise error
            last = block
            yield block
    except Exception as exc:
        _raise_stream_failure(exc, deployment)
    finally:
        # When the client leaves (or the proxy stops after the final event) the inner generator
        # is closed here and now, not later by a task the loop would spawn to finalize it.
        await blocks.aclose()
    final = _FINAL_EVENTS.get(kind)
    last_event = last.rstrip(b"\n").rpartition(b"\n\n")[2]
    if final is not None and final.search(last_event) is None:
        raise BadGateway(
            f"Deployment {deployment.describe()} ended its stream before it was complete",
            code="upstream_stream_incomplete",
        )
    response.release()


def _raise_stream_failure(exc: Exception, deployment: Deployment) -> NoReturn:
    """Raise a failure met while a stream is read as the client's error (others as they are)."""
    if isinstance(exc, StreamStalled):
        raise GatewayTimeout(f"Deployment {deployment.describe()} sent {exc}") from exc
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        raise failure_from(exc, deployment) from exc
    if isinstance(exc, EventTooLarge):
        raise BadGateway(f"Deployment {deployment.describe()}: {exc}", code="upstream_too_large")
    raise exc


_ERROR_EVENT = re.compile(rb"^event: ?error[ \t]*$", re.M)  # an SSE event named "error"


def _errors_in(
    block: bytes, deployment: Deployment, kind: Kind
) -> tuple[bytes, ProxyError | None]:
    """A block's events up to its first error event (those naming an error scrubbed), and that
    event as the client's error. An error event: data with an ``error`` object, or (but in the
    Responses API, where it is a final event of the protocol) an event named ``error``."""
    kept: list[bytes] = []
    for event in split_events(block):
        data = data_of(event) if b'"error"' in event or b"event:" in event else b""
        error = stream_error(data, deployment) if b'"error"' in data else None
        named = _ERROR_EVENT.search(event) is not None
        if error is None and named and kind is not Kind.RESPONSES:
            fields = _json_error_fields(data)
            error = _upstream_error(502, fields, data, deployment, "sent an error")
        if error is not None:
            return b"".join(kept), error
        kept.append(scrub_bytes(event, deployment) if named or _names_an_error(event) else event)
    return b"".join(kept), None


def _names_an_error(event: bytes) -> bool:
    """Whether an event holds an error (``response.failed``'s), not only ``"error": null``
    (every Responses event that carries the response object has one)."""
    return event.count(b'"error"') > event.count(b'"error":null') + event.count(b'"error": null')


def forwardable(names: Iterable[str]) -> tuple[str, ...]:
    """``headers.forwarded_names`` without its warnings: those come where names are configured."""
    return tuple(dict.fromkeys(n.strip().lower() for n in names if never_forwarded(n) is None))


class Upstream:
    """The app's upstream client as providers use it: ``provider.upstream``. Every transport
    failure comes out as the client's ProxyError (502/504, naming the deployment); redirects
    are never followed. Timeouts are the call's deployment's (else ``[upstream] timeouts``)."""

    __slots__ = ("transport", "session", "pool", "_config", "_timeouts", "_forwarded")

    def __init__(
        self,
        transport: Transport,
        config: Config,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.transport = transport
        # For providers still built the old way (factory(session, config), provider.pool).
        if session is None and isinstance(transport, SessionTransport):
            session = transport.session
        self.session = session
        self.pool = transport if isinstance(transport, H1Pool) else None
        self._config = config
        self._timeouts = config.upstream.timeouts
        self._forwarded = forwardable(config.upstream.forward_headers)

    def timeouts(self, deployment: Deployment) -> Timeouts:
        return deployment.timeouts or self._timeouts

    def _send(
        self, call: Call, url: str, body: bytes, headers: Mapping[str, str]
    ) -> Awaitable[UpstreamResponse]:
        return self.transport.post(url, body, headers, self.timeouts(call.deployment))

    async def post(
        self,
        call: Call,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        *,
        read_error: ErrorReader = openai_error,
    ) -> UpstreamResponse:
        """POST ``body`` to ``url``: its 2xx answer, or the client's error (connect errors and
        timeouts as 502/504, a redirect as a 502, other statuses read by ``read_error``).
        The caller owns the answer: read it inside :meth:`guard`, then release it."""
        return await answer_of(self._send(call, url, body, headers), call.deployment, read_error)

    def guard(self, response: UpstreamResponse, call: Call) -> AbstractContextManager[None]:
        """Close ``response`` if the block fails (cancelled too), with transport errors as
        the client's 502/504."""
        return closed_on_failure(response, call.deployment)

    async def read(self, response: UpstreamResponse, call: Call) -> bytes:
        """The whole body, refusing one over 64 MiB, counted against the buffer budget."""
        return await read_capped(response, call.deployment)

    async def events(self, response: UpstreamResponse, call: Call) -> AsyncGenerator[bytes, None]:
        """The answer's SSE events one by one; transport errors, a stall longer than the
        deployment's ``read`` timeout and an oversized event as the client's errors."""
        deployment = call.deployment
        budget = getattr(response, "budget", None)
        events = iter_sse(response.content, idle=self.timeouts(deployment).read, budget=budget)
        try:
            async for event in events:
                yield event
        except Exception as exc:
            _raise_stream_failure(exc, deployment)
        finally:
            await events.aclose()  # now, also when the client left: see iter_sse

    async def forward(
        self, call: Call, url: str, headers: Mapping[str, str], body: bytes | None = None
    ) -> Reply:
        """POST the call's body (or ``body``) to an OpenAI-compatible ``url`` and relay the
        answer: a stream event by event, anything else read whole and checked to be JSON."""
        payload = call.body() if body is None else body
        sending = self._send(call, url, payload, headers)
        return await _relay_answer(call, sending, self.timeouts(call.deployment).read)

    def client_headers(self, call: Call) -> dict[str, str]:
        """The configured ``forward_headers`` the client sent, lower-cased (never a
        credential or hop-by-hop header: headers.py)."""
        sent = call.request.headers
        return {name: value for name in self._forwarded if (value := sent.get(name)) is not None}
