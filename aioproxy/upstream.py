"""Calling upstreams: the app's pooled ClientSession, timeouts, and client errors as ProxyErrors."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from functools import lru_cache

import aiohttp
import msgspec

from .config import Config, Timeouts
from .context import Call, Deployment
from .errors import BadGateway, GatewayTimeout, ProxyError
from .h1client import H1Pool, UpstreamConnectError
from .providers import JSONReply, Reply, StreamReply, UpstreamResponse, post_via
from .routes import Kind
from .streaming import EventTooLarge, iter_sse_blocks

__all__ = [
    "answer_of",
    "closed_on_failure",
    "deployment_timeout",
    "failure_from",
    "forward",
    "make_session",
    "openai_error",
    "read_capped",
    "read_upstream_error",
    "scrub",
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


@lru_cache(maxsize=256)
def timeout_for(timeouts: Timeouts) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(
        total=timeouts.total, connect=timeouts.connect, sock_read=timeouts.read
    )


def timeouts_of(deployment: Deployment, config: Config) -> Timeouts:
    """The deployment's timeouts (config ones are already merged over the global ones)."""
    return deployment.timeouts or config.upstream.timeouts


def deployment_timeout(call: Call, config: Config) -> aiohttp.ClientTimeout:
    assert call.deployment is not None
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


_KEYLIKE = re.compile(r"\b(?:sk|key|api[-_]?key)[-_][A-Za-z0-9*_\-.]{6,}", re.IGNORECASE)


def scrub(text: str, deployment: Deployment) -> str:
    """Remove anything key-like from upstream text before a client sees it."""
    for secret in (deployment.api_key, *deployment.headers.values()):
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return _KEYLIKE.sub("***", text)


class _UpstreamErrorBody(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None


class _UpstreamError(msgspec.Struct):
    error: _UpstreamErrorBody | str | None = None
    message: str | None = None


_decode_error = msgspec.json.Decoder(_UpstreamError).decode


def read_upstream_error(status: int, body: bytes, deployment: Deployment) -> ProxyError:
    """An upstream's error answer as the error the client sees.

    4xx and 5xx statuses pass through with the upstream's message (scrubbed of anything key-like),
    except 401/403, which mean the *proxy's* upstream key was refused: the client's key is fine, so
    that is a 502 for the client, without the upstream's words.
    """
    where = deployment.describe()
    if status in (401, 403):
        return BadGateway(
            f"Deployment {where} refused the proxy's credentials (upstream status {status})",
            code="upstream_auth_failed",
        )
    message, type_, param, code = None, None, None, None
    try:
        parsed = _decode_error(body)
        if isinstance(parsed.error, _UpstreamErrorBody):
            message, type_, param = parsed.error.message, parsed.error.type, parsed.error.param
            code = None if parsed.error.code is None else str(parsed.error.code)
        elif isinstance(parsed.error, str):
            message = parsed.error
        else:
            message = parsed.message
    except msgspec.DecodeError:
        pass
    if message is None:
        text = body[:_ERROR_PREVIEW].decode("utf-8", "replace").strip()
        message = f"Deployment {where} answered {status}" + (f": {text}" if text else "")
    elif status >= 500:  # the upstream failed, not the request: say which deployment
        message = f"Deployment {where} answered {status}: {message}"
    if type_ is None:
        type_ = "invalid_request_error" if status < 500 else "upstream_error"
    return ProxyError(
        scrub(message, deployment),
        status=status,
        type=type_,
        param=param and scrub(param, deployment),
        code=code and scrub(code, deployment),
    )


async def read_capped(
    response: UpstreamResponse, deployment: Deployment
) -> bytes:
    """The whole upstream body, refusing one over MAX_UPSTREAM_BODY."""
    length = response.content_length
    if length is not None and length <= MAX_UPSTREAM_BODY:
        return await response.read()
    chunks, size = [], 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_UPSTREAM_BODY:
            raise BadGateway(
                f"Deployment {deployment.describe()} sent an answer too large",
                code="upstream_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


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
    *,
    call: Call | None = None,
) -> UpstreamResponse:
    """The upstream's 2xx answer to a POST in flight (``Provider.post(...)``), or the client's
    error: connect errors and timeouts as 502/504, a redirect as a 502 (never followed: it could
    carry the key to another host), any other status read (capped) by ``read_error``. The
    caller owns the answer: read it inside :func:`closed_on_failure`, then release it.
    Given the ``call``, the upstream's own request id is kept on it (error answers too)."""
    try:
        response = await sending
    except Exception as exc:  # connect errors and timeouts before any answer
        raise failure_from(exc, deployment) from exc
    if call is not None:
        headers = response.headers
        call.upstream_request_id = headers.get("x-request-id") or headers.get("request-id")
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
    ) -> bool:
        if exc is None:
            return False
        self.response.close()
        if isinstance(exc, Exception) and not isinstance(exc, ProxyError):
            raise failure_from(exc, self.deployment) from exc
        return False


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
    deployment = call.deployment
    assert deployment is not None
    payload = call.body() if body is None else body
    response = await answer_of(
        post_via(session, pool, url, payload, headers, timeout), deployment, call=call
    )
    with closed_on_failure(response, deployment):
        if response.content_type == "text/event-stream":
            return StreamReply(
                _relay(response, deployment, call.kind),
                close=response.close,
                finished=response.content.is_eof,
            )
        data = await read_capped(response, deployment)
        _check_json(data, deployment)
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
    response: UpstreamResponse, deployment: Deployment, kind: Kind
) -> AsyncIterator[bytes]:
    last = b""
    blocks = iter_sse_blocks(response.content)
    try:
        async for block in blocks:
            last = block
            yield block
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise failure_from(exc, deployment) from exc
    except EventTooLarge as exc:
        raise BadGateway(f"Deployment {deployment.describe()}: {exc}", code="upstream_too_large")
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
