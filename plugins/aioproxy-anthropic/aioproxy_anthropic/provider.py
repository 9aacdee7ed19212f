"""The ``anthropic`` provider: chat completions served by Anthropic's Messages API."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

import msgspec
from msgspec import Meta
from multidict import CIMultiDict

from aioproxy import (
    DONE,
    Call,
    Deployment,
    JSONReply,
    Provider,
    Reply,
    decode_upstream,
    include_usage,
    invalid_answer,
    sse_data,
    sse_translation,
    upstream_headers,
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
            _headers(call, settings.anthropic_version),
            read_error=error_from,
        )
        with self.upstream.guard(response, call):
            if call.stream:
                translator = StreamTranslator(
                    model=call.model,
                    created=int(time.time()),
                    include_usage=include_usage(call.fields),
                )
                return sse_translation(
                    self.upstream, call, response, translator, _translate, last_event="message_stop"
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
        """The client's API version and beta flags, which describe its body, are sent as
        they are (its betas after the deployment's)."""
        settings: AnthropicSettings = self.settings(call.deployment)
        sent = call.request.headers
        headers = _headers(call, sent.get("anthropic-version") or settings.anthropic_version)
        if betas := sent.get("anthropic-beta"):
            configured = headers.get("anthropic-beta")
            headers["anthropic-beta"] = f"{configured},{betas}" if configured else betas
        return await self.upstream.forward(call, url, headers, read_error=error_from)


def _headers(call: Call, version: str) -> CIMultiDict[str]:
    """The call's headers (``upstream_headers``: the gateway's own, the deployment's
    ``anthropic-beta``, say), then the key, the API version and the content type, which
    neither may replace."""
    fixed = {"content-type": "application/json", "anthropic-version": version}
    if call.deployment.api_key:
        fixed["x-api-key"] = call.deployment.api_key
    if call.stream:
        fixed["accept"] = "text/event-stream"
    return upstream_headers(call, fixed)


def _decode(raw: bytes, deployment: Deployment) -> Answer:
    not_message = "an answer that is not an Anthropic message"
    message = decode_upstream(decode_answer, raw, deployment, not_message)
    if message.type != "message":
        raise invalid_answer(deployment, not_message)
    return message


def _translate(translator: StreamTranslator, deployment: Deployment, raw: bytes) -> Iterator[bytes]:
    """An Anthropic event as the chunks it gives; ``[DONE]`` after message_stop, and the events
    after it (there should be none) read but dropped."""
    return iter(()) if translator.finished else _chunks(translator, deployment, raw)


def _chunks(translator: StreamTranslator, deployment: Deployment, raw: bytes) -> Iterator[bytes]:
    try:
        event = parse_event(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        what = "a stream event that is not JSON of an Anthropic event's shape"
        raise invalid_answer(deployment, what) from None
    if event is None:
        return
    if event.type == "error":
        raise stream_error(event.error, deployment)
    for chunk in translator.feed(event):
        yield sse_data(chunk)
    if translator.finished:
        yield DONE
