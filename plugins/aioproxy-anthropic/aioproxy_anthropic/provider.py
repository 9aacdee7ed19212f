"""The ``anthropic`` provider: chat completions served by Anthropic's Messages API."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Annotated

import msgspec
from msgspec import Meta
from multidict import CIMultiDict

from aioproxy import (
    DONE,
    BadGateway,
    Call,
    Deployment,
    JSONReply,
    Provider,
    ProxyError,
    Reply,
    StreamReply,
    UpstreamResponse,
    decode_upstream,
    expect_content_type,
    include_usage,
    invalid_answer,
    sse_data,
)

from .errors import error_from, stream_error
from .translate import (
    DEFAULT_MAX_TOKENS,
    Answer,
    StreamTranslator,
    decode_answer,
    messages_url,
    parse_event,
    to_anthropic,
    to_chat_completion,
)

__all__ = ["AnthropicProvider", "AnthropicSettings"]

ANTHROPIC_VERSION = "2023-06-01"

_encode = msgspec.json.Encoder().encode


class AnthropicSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's ``settings`` as this provider reads them.

    Keys it does not know are left alone: other plugins may keep their own settings there.
    """

    anthropic_version: Annotated[str, Meta(min_length=1)] = ANTHROPIC_VERSION
    default_max_tokens: Annotated[int, Meta(ge=1)] = DEFAULT_MAX_TOKENS


class AnthropicProvider(Provider):
    """Translates chat completions to ``POST {api_base}/v1/messages`` and the answer back."""

    settings_type = AnthropicSettings  # checked by the core at start-up

    async def chat_completions(self, call: Call) -> Reply:
        deployment = call.deployment
        settings: AnthropicSettings = self.settings(deployment)
        body = to_anthropic(call.fields, default_max_tokens=settings.default_max_tokens)
        response = await self.upstream.post(
            call,
            messages_url(deployment.api_base),
            _encode(body),
            _headers(deployment, settings, call.stream, call.upstream_headers),
            read_error=_read_error,
        )
        with self.upstream.guard(response, call):
            if call.stream:
                expect_content_type(response, "text/event-stream", deployment)
                translator = StreamTranslator(
                    model=call.model,
                    created=int(time.time()),
                    include_usage=include_usage(call.fields),
                )
                # close, not release: a client leaving mid-stream must not leave Anthropic writing.
                return StreamReply(
                    _events(self.upstream.events(response, call), response, translator, deployment),
                    close=response.close,
                    # Over once message_stop is relayed and the body has ended: then the proxy
                    # need not wait for the rest of the events.
                    finished=lambda: translator.finished and response.content.is_eof(),
                )
            message = _decode(await self.upstream.read(response, call), deployment)
        response.release()
        return JSONReply.of(to_chat_completion(message, model=call.model, created=int(time.time())))

    async def messages(self, call: Call) -> Reply:
        """Anthropic's own API, passed through: the client's body but ``model``, its stream
        relayed event by event (thinking, cache_control and every beta work unchanged)."""
        return await self._pass_through(call, messages_url(call.deployment.api_base))

    async def count_tokens(self, call: Call) -> Reply:
        """Anthropic's own count (exact), the client's body but ``model``."""
        return await self._pass_through(
            call, messages_url(call.deployment.api_base) + "/count_tokens"
        )

    async def _pass_through(self, call: Call, url: str) -> Reply:
        settings: AnthropicSettings = self.settings(call.deployment)
        headers = _pass_through_headers(call, settings)
        return await self.upstream.forward(call, url, headers, read_error=_read_error)


def _pass_through_headers(call: Call, settings: AnthropicSettings) -> dict[str, str]:
    """As ``_headers`` (the gateway's own, the deployment's, then what neither may replace),
    with the client's API version and beta flags, which describe its body, sent as it is."""
    deployment = call.deployment
    headers = dict(call.upstream_headers)
    for name, value in deployment.headers.items():
        headers[name.lower()] = value
    sent = call.request.headers
    headers["content-type"] = "application/json"
    headers["anthropic-version"] = sent.get("anthropic-version") or settings.anthropic_version
    if betas := sent.get("anthropic-beta"):
        configured = headers.get("anthropic-beta")
        headers["anthropic-beta"] = f"{configured},{betas}" if configured else betas
    if deployment.api_key:
        headers["x-api-key"] = deployment.api_key
    if call.stream:
        headers["accept"] = "text/event-stream"
    return headers


def _read_error(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    return error_from(status, body, deployment, headers.get("retry-after"))


def _headers(
    deployment: Deployment, settings: AnthropicSettings, stream: bool, own: Mapping[str, str]
) -> CIMultiDict[str]:
    """Built afresh for each call: the client's own key and headers never travel upstream.

    The gateway's ``own`` headers for the call (its request id, a traceparent) come first, then
    the deployment's extra ``headers`` (``anthropic-beta``, say), so that neither can replace the
    key, version or content type.
    """
    headers: CIMultiDict[str] = CIMultiDict(own)
    headers.update(deployment.headers)
    headers["content-type"] = "application/json"
    headers["anthropic-version"] = settings.anthropic_version
    if deployment.api_key:
        headers["x-api-key"] = deployment.api_key
    if stream:
        headers["accept"] = "text/event-stream"
    return headers


def _decode(raw: bytes, deployment: Deployment) -> Answer:
    not_message = "an answer that is not an Anthropic message"
    message = decode_upstream(decode_answer, raw, deployment, not_message)
    if message.type != "message":
        raise invalid_answer(deployment, not_message)
    return message


async def _events(
    events: AsyncGenerator[bytes, None],
    response: UpstreamResponse,
    translator: StreamTranslator,
    deployment: Deployment,
) -> AsyncIterator[bytes]:
    """Each Anthropic event of ``events`` (``upstream.events``: transport errors, stalls and
    oversized events already mapped) as the chunks it gives; ``[DONE]`` after message_stop.

    Read on to the end of the body after message_stop, so the connection goes back to the pool.
    """
    finished = False  # a local, not translator.finished: mypy would keep that narrowed
    try:
        async for raw in events:
            if finished:
                continue
            try:
                event = parse_event(raw)
            except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
                raise BadGateway(
                    f"Deployment {deployment.describe()} sent a stream event that is not JSON"
                    " of an Anthropic event's shape",
                    code="upstream_invalid_response",
                ) from None
            if event is None:
                continue
            if event.type == "error":
                raise stream_error(event.error, deployment)
            for chunk in translator.feed(event):
                yield sse_data(chunk)
            finished = translator.finished
            if finished:
                yield DONE
    finally:
        await events.aclose()  # now, also when the client left: see iter_sse
    if not translator.finished:
        raise BadGateway(
            f"Deployment {deployment.describe()} ended its stream before message_stop",
            code="upstream_stream_incomplete",
        )
    response.release()
