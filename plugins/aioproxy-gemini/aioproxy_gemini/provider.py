"""The ``gemini`` provider: chat completions and embeddings served by Google's Gemini API."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import quote

import msgspec
from msgspec import Meta
from multidict import CIMultiDict

from aioproxy import (
    DONE,
    INT,
    BadGateway,
    Call,
    Deployment,
    JSONReply,
    Provider,
    Reply,
    UpstreamResponse,
    data_of,
    decode_upstream,
    get_field,
    include_usage,
    invalid_answer,
    sse_data,
    sse_translation,
    upstream_headers,
)

from .answer import Answer, StreamTranslator, decode_answer, to_chat_completion
from .embeddings import (
    decode_batch,
    decode_single,
    embed_request,
    inputs_of,
    to_embeddings,
    wants_base64,
)
from .errors import error_from, stream_error
from .translate import Schemas, Thinking, to_gemini

__all__ = ["DEFAULT_API_BASE", "GeminiProvider", "GeminiSettings", "SafetySetting", "model_url"]

DEFAULT_API_BASE = "https://generativelanguage.googleapis.com"
_VERSIONS = ("/v1beta", "/v1", "/v1alpha")
_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


class SafetySetting(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One of Gemini's ``safetySettings``, as its API names them."""

    category: str  # HARM_CATEGORY_HARASSMENT, ...
    threshold: str  # BLOCK_NONE, BLOCK_ONLY_HIGH, ...


class GeminiSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's ``settings``; a key it does not name stops start-up (a typo, say)."""

    # The API version in the path, unless api_base already ends with one.
    api_version: Literal["v1beta", "v1", "v1alpha"] = "v1beta"
    # How JSON Schemas (response_format, tool parameters) are sent: "openapi" converts them to
    # Gemini's Schema (responseSchema, parameters; every model), "json_schema" sends them as
    # they are (responseJsonSchema, parametersJsonSchema; Gemini 2.5 and later).
    schemas: Schemas = "openapi"
    # How reasoning_effort is sent: as thinkingConfig.thinkingLevel (Gemini 3 and later) or as
    # a thinkingBudget in tokens (Gemini 2.5).
    thinking: Thinking = "level"
    safety_settings: tuple[SafetySetting, ...] = ()  # sent with every chat request
    embedding_task_type: str | None = None  # taskType of embeddings (RETRIEVAL_QUERY, ...)
    # Texts per batchEmbedContents call (Gemini takes 100); more inputs make several calls.
    embedding_batch_size: Annotated[int, Meta(ge=1, le=100)] = 100


def model_path(model: str) -> str:
    """``models/<id>`` (``tunedModels/...`` and other full names as they are)."""
    return model if "/" in model else f"models/{quote(model, safe='')}"


def model_url(api_base: str | None, model: str, method: str, version: str = "v1beta") -> str:
    """``{api_base}/{version}/models/{model}:{method}``; an api_base ending in a version keeps
    it."""
    base = (api_base or DEFAULT_API_BASE).rstrip("/")
    if not base.endswith(_VERSIONS):
        base = f"{base}/{version}"
    return f"{base}/{model_path(model)}:{method}"


class GeminiProvider(Provider):
    """Chat completions as ``generateContent`` / ``streamGenerateContent?alt=sse``, embeddings
    as ``embedContent`` / ``batchEmbedContents``; the key in ``x-goog-api-key``."""

    settings_type = GeminiSettings  # checked by the core at start-up

    async def chat_completions(self, call: Call) -> Reply:
        deployment = call.deployment
        settings: GeminiSettings = self.settings(deployment)
        body = to_gemini(
            call.fields,
            schemas=settings.schemas,
            thinking=settings.thinking,
            safety_settings=settings.safety_settings,
        )
        n = get_field(call.fields, "n", INT) or 1  # to_gemini refused one below 1
        method = "streamGenerateContent?alt=sse" if call.stream else "generateContent"
        response = await self._post(call, settings, method, body)
        with self.upstream.guard(response, call):
            if call.stream:
                translator = StreamTranslator(
                    model=call.model,
                    created=int(time.time()),
                    n=n,
                    include_usage=include_usage(call.fields),
                )
                return sse_translation(
                    self.upstream,
                    call,
                    response,
                    translator,
                    _translate,
                    last_event="every candidate finished",
                    finished=response.content.is_eof,  # Gemini ends its stream by ending the body
                    trailer=_trailer,
                )
            raw = await self.upstream.read(response, call)
        response.release()
        answer = _decode(decode_answer, raw, deployment)
        if answer.error is not None:
            raise stream_error(answer.error, deployment)
        blocked = answer.prompt_feedback is not None and answer.prompt_feedback.block_reason
        if not answer.candidates and not blocked:
            raise BadGateway(
                f"Deployment {deployment.describe()} answered without any candidate",
                code="upstream_invalid_response",
            )
        created = int(time.time())
        return JSONReply.of(to_chat_completion(answer, model=call.model, created=created, n=n))

    async def embeddings(self, call: Call) -> Reply:
        deployment = call.deployment
        settings: GeminiSettings = self.settings(deployment)
        texts = inputs_of(call.fields)
        as_base64 = wants_base64(call.fields)
        model = model_path(deployment.model)
        vectors: list[list[float]] = []
        size = settings.embedding_batch_size
        for start in range(0, len(texts), size):  # one call at a time: Gemini's quota is per call
            batch = texts[start : start + size]
            body = embed_request(model, batch, call.fields, settings.embedding_task_type)
            single = len(batch) == 1
            method = "embedContent" if single else "batchEmbedContents"
            response = await self._post(call, settings, method, body)
            with self.upstream.guard(response, call):
                raw = await self.upstream.read(response, call)
            response.release()
            if single:
                vectors.append(_decode(decode_single, raw, deployment).embedding.values)
            else:
                got = [e.values for e in _decode(decode_batch, raw, deployment).embeddings]
                if len(got) != len(batch):
                    what = f"{len(got)} embeddings for {len(batch)} inputs"
                    raise invalid_answer(deployment, what)
                vectors += got
        return JSONReply.of(to_embeddings(vectors, model=call.model, as_base64=as_base64))

    async def _post(
        self, call: Call, settings: GeminiSettings, method: str, body: dict[str, Any]
    ) -> UpstreamResponse:
        deployment = call.deployment
        url = model_url(deployment.api_base, deployment.model, method, settings.api_version)
        return await self.upstream.post(
            call,
            url,
            _encode(body),
            _headers(call),
            read_error=error_from,
        )


def _headers(call: Call) -> CIMultiDict[str]:
    """The call's headers (``upstream_headers``), then the key and the content type, which
    none of those may replace."""
    fixed = {"content-type": "application/json"}
    if call.deployment.api_key:
        fixed["x-goog-api-key"] = call.deployment.api_key
    return upstream_headers(call, fixed)


def _decode(decode: Callable[[bytes], T], raw: bytes, deployment: Deployment) -> T:
    return decode_upstream(decode, raw, deployment, "an answer that is not Gemini's")


def _translate(
    translator: StreamTranslator, deployment: Deployment, event: bytes
) -> Iterator[bytes]:
    """A Gemini chunk as the chat chunks it gives, as it arrives."""
    data = data_of(event)
    if not data:
        return  # a comment or a keep-alive
    answer: Answer = _decode(decode_answer, data, deployment)
    if answer.error is not None:
        raise stream_error(answer.error, deployment)
    for chunk in translator.feed(answer):
        yield sse_data(chunk)


def _trailer(translator: StreamTranslator) -> Iterator[bytes]:
    """Once Gemini's body has ended with every candidate finished: the usage chunk (if asked
    for), then ``[DONE]``."""
    if translator.include_usage:
        yield sse_data(translator.usage_chunk())
    yield DONE
