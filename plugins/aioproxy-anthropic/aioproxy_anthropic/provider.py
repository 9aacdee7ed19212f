"""The ``anthropic`` provider: chat completions served by Anthropic's Messages API."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

import aiohttp
import msgspec
from msgspec import Meta
from multidict import CIMultiDict

from aioproxy import (
    BadGateway,
    Call,
    Deployment,
    JSONReply,
    Provider,
    ProxyError,
    Reply,
    StreamReply,
)
from aioproxy.providers import UpstreamResponse
from aioproxy.streaming import DONE, iter_sse, sse_data
from aioproxy.upstream import (
    answer_of,
    closed_on_failure,
    deployment_timeout,
    failure_from,
    read_capped,
)

from .errors import error_from, stream_error
from .translate import (
    DEFAULT_MAX_TOKENS,
    StreamTranslator,
    messages_url,
    parse_event,
    to_anthropic,
    to_chat_completion,
)

__all__ = ["AnthropicProvider", "AnthropicSettings"]

ANTHROPIC_VERSION = "2023-06-01"

_encode = msgspec.json.Encoder().encode
_decode_message = msgspec.json.Decoder(dict[str, Any]).decode


class AnthropicSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's ``settings`` as this provider reads them.

    Keys it does not know are left alone: other plugins may keep their own settings there.
    """

    anthropic_version: Annotated[str, Meta(min_length=1)] = ANTHROPIC_VERSION
    default_max_tokens: Annotated[int, Meta(ge=1)] = DEFAULT_MAX_TOKENS


class AnthropicProvider(Provider):
    """Translates chat completions to ``POST {api_base}/v1/messages`` and the answer back."""

    name = "anthropic"
    settings_type = AnthropicSettings  # checked by the core at start-up

    async def chat_completions(self, call: Call) -> Reply:
        deployment = call.deployment
        assert deployment is not None
        settings: AnthropicSettings = self.settings(deployment)
        body = to_anthropic(call.json(), default_max_tokens=settings.default_max_tokens)
        response = await answer_of(
            self.post(
                messages_url(deployment.api_base),
                _encode(body),
                _headers(deployment, settings, call.stream, call.upstream_headers),
                deployment_timeout(call, self.config),
            ),
            deployment,
            _read_error,
            call=call,
        )
        with closed_on_failure(response, deployment):
            if call.stream:
                _expect(response, "text/event-stream", deployment)
                translator = StreamTranslator(
                    model=call.model, created=int(time.time()), include_usage=_include_usage(call)
                )
                # close, not release: a client leaving mid-stream must not leave Anthropic writing.
                return StreamReply(
                    _events(response, translator, deployment),
                    close=response.close,
                    # Over once message_stop is relayed and the body has ended: then the proxy
                    # need not wait for the rest of the events.
                    finished=lambda: translator.finished and response.content.is_eof(),
                )
            message = _decode(await read_capped(response, deployment), deployment)
        response.release()
        return JSONReply.of(to_chat_completion(message, model=call.model, created=int(time.time())))


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


def _include_usage(call: Call) -> bool:
    options = call.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _expect(response: UpstreamResponse, content_type: str, deployment: Deployment) -> None:
    if response.content_type != content_type:
        raise BadGateway(
            f"Deployment {deployment.describe()} answered {response.content_type or 'no body'}"
            f", not {content_type}",
            code="upstream_invalid_response",
        )


def _decode(raw: bytes, deployment: Deployment) -> dict[str, Any]:
    try:
        message = _decode_message(raw)
    except msgspec.DecodeError:
        message = None
    if message is None or message.get("type") != "message":
        raise BadGateway(
            f"Deployment {deployment.describe()} sent an answer that is not an Anthropic message",
            code="upstream_invalid_response",
        )
    return message


async def _events(
    response: UpstreamResponse, translator: StreamTranslator, deployment: Deployment
) -> AsyncIterator[bytes]:
    """Each Anthropic event as it arrives, as the chunks it gives; ``[DONE]`` after message_stop.

    Read on to the end of the body after message_stop, so the connection goes back to the pool.
    """
    events = iter_sse(response.content)
    try:
        async for raw in events:
            if translator.finished:
                continue
            try:
                event = parse_event(raw)
            except msgspec.DecodeError:
                raise BadGateway(
                    f"Deployment {deployment.describe()} sent a stream event that is not JSON",
                    code="upstream_invalid_response",
                ) from None
            if event is None:
                continue
            if event.get("type") == "error":
                raise stream_error(event, deployment)
            for chunk in translator.feed(event):
                yield sse_data(chunk)
            if translator.finished:
                yield DONE
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        raise failure_from(exc, deployment) from exc
    finally:
        await events.aclose()  # now, also when the client left: see iter_sse
    if not translator.finished:
        raise BadGateway(
            f"Deployment {deployment.describe()} ended its stream before message_stop",
            code="upstream_stream_incomplete",
        )
    response.release()
