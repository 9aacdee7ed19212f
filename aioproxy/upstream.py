"""Calling upstreams: ``Upstream``, the one way a provider does (post, guard, read, events,
forward), over a Transport; failures come out as the client's ProxyErrors (failures.py)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractContextManager

import aiohttp

from . import passthrough
from .budget import BufferBudget
from .config import Config, Timeouts
from .context import Call, Deployment
from .errors import BadGateway, ProxyError
from .failures import (
    MAX_UPSTREAM_BODY,
    ErrorReader,
    as_proxy_error,
    openai_error,
    raise_stream_failure,
    scrub,
)
from .h1client import H1Pool
from .headers import never_forwarded
from .replies import JSONReply, Reply, StreamReply
from .request_ids import is_sane
from .streaming import iter_sse, iter_sse_blocks
from .transport import (
    SessionTransport,
    Transport,
    UpstreamResponse,
    client_timeout,
    make_session,
)

__all__ = ["ErrorReader", "Upstream", "forwardable", "make_session"]


async def _read_capped(
    response: UpstreamResponse, deployment: Deployment, budget: BufferBudget | None = None
) -> bytes:
    """The whole upstream body, refusing one over MAX_UPSTREAM_BODY. While it is read, its
    bytes count against the app's buffer ``budget`` (the Upstream's; for the deprecated
    callers, the one the lean pool's answers carry): BufferFull (a 503) when the gateway holds
    too much already."""
    if budget is None:
        budget = getattr(response, "budget", None)
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


async def _answer(
    sending: Awaitable[UpstreamResponse],
    deployment: Deployment,
    read_error: ErrorReader = openai_error,
    budget: BufferBudget | None = None,
    *,
    call: Call | None = None,
) -> UpstreamResponse:
    """The upstream's 2xx answer to a POST in flight, or the client's error: connect errors and
    timeouts as 502/504, a redirect as a 502 (never followed: it could carry the key to another
    host), any other status read (capped) by ``read_error``. Given the ``call``, the upstream's
    own request id (x-request-id, request-id or AWS's x-amzn-RequestId) is kept on it (error
    answers too)."""
    try:
        response = await sending
    except Exception as exc:  # connect errors and timeouts before any answer
        raise as_proxy_error(exc, deployment) from exc
    if call is not None:
        call.upstream_request_id = _upstream_id(response.headers, deployment)
    if response.status < 300:
        return response
    with _Guard(response, deployment):
        body = await _read_capped(response, deployment, budget)
        if response.status < 400:
            raise BadGateway(
                f"Deployment {deployment.describe()} answered with a redirect "
                f"({response.status}); redirects are not followed",
                code="upstream_redirect",
            )
        raise read_error(response.status, body, deployment, response.headers)
    raise AssertionError("unreachable")  # pragma: no cover


def _upstream_id(headers: Mapping[str, str], deployment: Deployment) -> str | None:
    """The upstream's own request id, kept by the rule the client's is (``request_ids``):
    1 to 128 printable ASCII characters, else dropped. It goes into logs and traces, so one
    that looks like a key, or holds the deployment's own (an upstream echoing what it was
    sent), is dropped too."""
    given = (  # AWS names it x-amzn-RequestId
        headers.get("x-request-id") or headers.get("request-id") or headers.get("x-amzn-requestid")
    )
    if given is None or not is_sane(given) or scrub(given, deployment) != given:
        return None
    return given


def _recount(budget: BufferBudget, counted: int, holding: int) -> int:
    """Count ``holding`` bytes where ``counted`` were (BufferFull, changing nothing, past the
    budget); what is counted now."""
    if holding > counted:
        budget.take(holding - counted)
    else:
        budget.give(counted - holding)
    return holding


class _Guard:
    """Close the upstream answer if the block fails (cancelled too: the client left, a
    first-byte timeout), with transport errors as the client's 502/504.

    A class, not a @contextmanager: it is on every call's path, and a generator-based one
    costs a generator and a wrapper object each time.
    """

    __slots__ = ("deployment", "response")

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
            raise as_proxy_error(exc, self.deployment) from exc


async def _forwarded(
    call: Call,
    deployment: Deployment,
    sending: Awaitable[UpstreamResponse],
    idle: float | None,
    budget: BufferBudget | None = None,
    read_error: ErrorReader = openai_error,
) -> Reply:
    """A pass-through POST's answer in flight as the client's reply: a stream relayed event by
    event (``idle``: the longest it may go without a complete event), anything else read whole
    and checked (passthrough.py); an error status read by ``read_error``. ``deployment``: the
    call's."""
    response = await _answer(sending, deployment, read_error, budget, call=call)
    with _Guard(response, deployment):
        if response.content_type == "text/event-stream":
            return StreamReply(
                passthrough.events(response, deployment, call.kind, idle, budget),
                close=response.close,
                finished=response.content.is_eof,
            )
        data = await _read_capped(response, deployment, budget)
        passthrough.check_answer(data, deployment)
    response.release()
    return JSONReply(data, response.status)


def forwardable(names: Iterable[str]) -> tuple[str, ...]:
    """``headers.forwarded_names`` without its warnings: those come where names are configured."""
    return tuple(dict.fromkeys(n.strip().lower() for n in names if never_forwarded(n) is None))


class Upstream:
    """The app's upstream client as providers use it: ``provider.upstream``. Every transport
    failure comes out as the client's ProxyError (502/504, naming the deployment); redirects
    are never followed. Timeouts are the call's deployment's (else ``[upstream] timeouts``)."""

    __slots__ = ("_config", "_forwarded", "_timeouts", "budget", "pool", "session", "transport")

    def __init__(
        self,
        transport: Transport,
        config: Config,
        session: aiohttp.ClientSession | None = None,
        budget: BufferBudget | None = None,
    ) -> None:
        self.transport = transport
        # What every answer read through it counts against, whichever transport (or session)
        # it came by: the given one, else the lean pool's.
        self.budget = budget if budget is not None else getattr(transport, "budget", None)
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
        deployment = call.deployment
        sending = self.transport.post(url, body, headers, self.timeouts(deployment))
        return await _answer(sending, deployment, read_error, self.budget, call=call)

    def guard(self, response: UpstreamResponse, call: Call) -> AbstractContextManager[None]:
        """Close ``response`` if the block fails (cancelled too), with transport errors as
        the client's 502/504."""
        return _Guard(response, call.deployment)

    async def read(self, response: UpstreamResponse, call: Call) -> bytes:
        """The whole body, refusing one over 64 MiB, counted against the buffer budget."""
        return await _read_capped(response, call.deployment, self.budget)

    async def events(self, response: UpstreamResponse, call: Call) -> AsyncGenerator[bytes, None]:
        """The answer's SSE events one by one; transport errors, a stall longer than the
        deployment's ``read`` timeout and an oversized event as the client's errors."""
        deployment = call.deployment
        idle = self.timeouts(deployment).read
        events = iter_sse(response.content, idle=idle, budget=self.budget)
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - raise_stream_failure maps every failure
            raise_stream_failure(exc, deployment)
        finally:
            await events.aclose()  # now, also when the client left: see iter_sse

    async def lines(self, response: UpstreamResponse, call: Call) -> AsyncGenerator[bytes, None]:
        """The answer's lines one by one (NDJSON, say), each ending in ``\\n``; as with
        :meth:`events`, transport errors, a stall longer than the deployment's ``read`` timeout
        and an oversized line come out as the client's errors."""
        deployment = call.deployment
        idle = self.timeouts(deployment).read
        blocks = iter_sse_blocks(response.content, idle=idle, budget=self.budget, end=b"\n")
        try:
            async for block in blocks:
                for line in block.split(b"\n")[:-1]:  # the block ends in one
                    yield line + b"\n"
        except Exception as exc:  # noqa: BLE001 - mapped, or raised again as it is
            raise_stream_failure(exc, deployment)
        finally:
            await blocks.aclose()

    async def chunks(
        self, response: UpstreamResponse, call: Call, held: Callable[[], int] | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The answer's body in the chunks it arrives in, for a framing the provider decodes
        itself (AWS's binary event stream). A chunk counts against the gateway's buffer budget
        (past it, the client's 503 ``gateway_buffers_full``) until the next one is asked for,
        and so does ``held()``: the bytes the provider's decoder keeps of an unfinished
        message. Transport errors come out as the client's 502/504."""
        budget = self.budget
        counted = 0  # bytes this answer holds against the budget
        try:
            async for chunk in response.content.iter_any():
                if budget is not None:
                    counted = _recount(budget, counted, len(chunk) + (held() if held else 0))
                yield chunk
                if budget is not None:  # the chunk is fed: what is unfinished of it is held
                    counted = _recount(budget, counted, held() if held else 0)
        except Exception as exc:  # noqa: BLE001 - mapped, or raised again as it is
            raise_stream_failure(exc, call.deployment)
        finally:
            if budget is not None:
                budget.give(counted)

    async def forward(
        self,
        call: Call,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
        *,
        read_error: ErrorReader = openai_error,
    ) -> Reply:
        """POST the call's body (or ``body``) to an OpenAI-compatible ``url`` (or, for the
        Messages API, an Anthropic one) and relay the answer: a stream event by event,
        anything else read whole and checked to be JSON; an error status read by
        ``read_error`` (an upstream with error codes of its own: Azure's, Anthropic's)."""
        deployment = call.deployment
        timeouts = self.timeouts(deployment)
        payload = call.body() if body is None else body
        sending = self.transport.post(url, payload, headers, timeouts)
        return await _forwarded(call, deployment, sending, timeouts.read, self.budget, read_error)

    def client_headers(self, call: Call) -> dict[str, str]:
        """The configured ``forward_headers`` the client sent, lower-cased (never a
        credential or hop-by-hop header: headers.py)."""
        sent = call.request.headers
        return {name: value for name in self._forwarded if (value := sent.get(name)) is not None}

    async def request(
        self, deployment: Deployment, method: str, url: str, headers: Mapping[str, str]
    ) -> JSONReply:
        """``method`` (``GET``, ``DELETE``, ...) on ``url`` for ``deployment``, no body: the
        upstream's 2xx JSON answer as it is, its errors as the client's (as :meth:`post`).

        For calls outside a request, such as the Responses API's retrieve and delete. Goes
        through the app's ClientSession, since the transport only POSTs."""
        session = self.session
        assert session is not None, "Upstream.request needs a session"
        sending = session.request(
            method,
            url,
            headers=headers,
            timeout=client_timeout(self.timeouts(deployment)),
            allow_redirects=False,
        )
        response = await _answer(sending, deployment, budget=self.budget)
        with _Guard(response, deployment):  # the session's answers count as the pool's do
            body = await _read_capped(response, deployment, self.budget)
        response.release()
        return JSONReply(body, response.status)
