"""The ``bedrock`` provider: chat completions by Converse / ConverseStream, embeddings by
InvokeModel (Titan and Cohere), every request signed with SigV4 or sent with an API key."""

from __future__ import annotations

import asyncio
import importlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec
from msgspec import Meta

from aioproxy import (
    DONE,
    BadRequest,
    Call,
    ConfigError,
    Deployment,
    GatewayTimeout,
    JSONReply,
    Provider,
    ProxyError,
    Reply,
    StreamReply,
    UpstreamResponse,
    decode_upstream,
    get_field,
    include_usage,
    invalid_answer,
    scrub,
    sse_data,
    stream_incomplete,
    upstream_headers,
)

from . import embeddings
from .auth import BearerAuth, SigV4Signer, load_credentials, load_region
from .errors import error_from, stream_error
from .eventstream import FrameError, FrameReader, StreamStalled
from .translate import (
    StreamTranslator,
    decode_answer,
    decode_event,
    to_chat_completion,
    to_converse,
)

__all__ = ["BedrockProvider", "BedrockSettings"]

EVENT_STREAM = "application/vnd.amazon.eventstream"
_encode = msgspec.json.Encoder().encode
_MAX_SIGNERS = 256  # signers kept for deployments made per request by plugins
_CONCURRENT_INVOKES = 8  # Titan embeds a text a call: this many calls at once per request

_DIMENSIONS = msgspec.json.Decoder(Annotated[int, Meta(ge=1)] | None)


class BedrockSettings(msgspec.Struct, frozen=True, kw_only=True):
    """A deployment's ``settings``; a key it does not name stops start-up (a typo, say)."""

    # The AWS region; default: the AWS configuration's (AWS_REGION, the profile's region).
    region: Annotated[str, Meta(pattern=r"^[a-z0-9-]+$")] | None = None
    # Static credentials: this key id, with the deployment's api_key as the secret access key.
    # Without it, api_key alone is a Bedrock API key (a bearer token); without either, the
    # standard AWS chain's credentials (environment, profile, SSO, container or instance role).
    aws_access_key_id: str | None = None
    profile: str | None = None  # the shared files' profile the chain reads (AWS_PROFILE's)
    # Embeddings: the model's body format, when its id does not say (titan-embed / cohere.embed).
    embedding_format: embeddings.Family | None = None
    cohere_input_type: Literal[
        "search_document", "search_query", "classification", "clustering"
    ] = "search_document"


Auth = SigV4Signer | BearerAuth


class BedrockProvider(Provider):
    """Translates chat completions to ``POST {api_base}/model/{modelId}/converse`` (and
    ``/converse-stream``), embeddings to ``/model/{modelId}/invoke``."""

    settings_type = BedrockSettings  # checked by the core at start-up

    async def start(self) -> None:
        self._auth: dict[tuple[Any, ...], tuple[Auth, str]] = {}
        for deployment in self.config.deployments:  # a bad one stops start-up, naming it
            try:
                await self._auth_for(deployment)
            except ConfigError as exc:
                raise ConfigError(f"model '{deployment.name}': {exc}") from None
        if self.config.deployments:  # now, not in the first request's time (nor the loop's)
            await asyncio.to_thread(_import_botocore)

    def load_credentials(self, deployment: Deployment, settings: BedrockSettings) -> Any:
        """botocore credentials for ``deployment`` (blocking: called in a thread). A subclass
        may give its own, e.g. a test's with a clock of its own."""
        return load_credentials(settings.aws_access_key_id, deployment.api_key, settings.profile)

    async def _auth_for(self, deployment: Deployment) -> tuple[Auth, str]:
        """The deployment's signer (or API key) and its API base, made once per credentials."""
        settings: BedrockSettings = self.settings(deployment)
        key = (settings, deployment.api_key, deployment.api_base)
        known = self._auth.get(key)
        if known is not None:
            return known
        bearer = bool(deployment.api_key) and not settings.aws_access_key_id
        region = settings.region
        if not region and not (bearer and deployment.api_base):  # SigV4 and the URL need one
            region = await asyncio.to_thread(load_region, settings.profile)
            if not region:
                raise ConfigError(
                    "the bedrock provider needs a region (settings.region, AWS_REGION)"
                )
        auth: Auth
        if bearer:
            auth = BearerAuth(deployment.api_key or "")
        else:
            credentials = await asyncio.to_thread(self.load_credentials, deployment, settings)
            auth = SigV4Signer(credentials, region or "")
        base = deployment.api_base or f"https://bedrock-runtime.{region}.amazonaws.com"
        if len(self._auth) >= _MAX_SIGNERS:
            self._auth.clear()
        known = self._auth[key] = (auth, base.rstrip("/"))
        return known

    async def _post(self, call: Call, action: str, body: bytes, accept: str) -> UpstreamResponse:
        """POST ``body`` to the model's ``action`` (converse, converse-stream, invoke), signed:
        its 2xx answer, or the client's error."""
        deployment = call.deployment
        try:
            auth, base = await self._auth_for(deployment)
        except ConfigError as exc:  # a deployment a plugin made per request
            raise ProxyError(f"Deployment {deployment.describe()}: {exc}") from None
        # The model id is one path segment: its ':' and an ARN's '/' encoded, as AWS signs it.
        url = f"{base}/model/{quote(deployment.model, safe='')}/{action}"
        signed = {"content-type": "application/json", "accept": accept}
        # The gateway's own headers (request id, traceparent) and the deployment's are sent,
        # not signed; the signed ones and the signature replace any of theirs.
        headers = upstream_headers(call, await auth.headers(url, body, signed))
        return await self.upstream.post(call, url, body, headers, read_error=error_from)

    async def chat_completions(self, call: Call) -> Reply:
        deployment = call.deployment
        body = _encode(to_converse(call.fields))
        created = int(time.time())
        if not call.stream:
            response = await self._post(call, "converse", body, "application/json")
            with self.upstream.guard(response, call):
                raw = await self.upstream.read(response, call)
            response.release()
            answer = decode_upstream(
                decode_answer, raw, deployment, "an answer that is not a Converse answer"
            )
            completion = to_chat_completion(
                answer, id=_completion_id(response), model=call.model, created=created
            )
            return JSONReply.of(completion)
        response = await self._post(call, "converse-stream", body, EVENT_STREAM)
        with self.upstream.guard(response, call):
            if response.content_type != EVENT_STREAM:
                raise invalid_answer(
                    deployment, f"{response.content_type or 'no body'}, not a stream"
                )
            translator = StreamTranslator(
                id=_completion_id(response),
                model=call.model,
                created=created,
                include_usage=include_usage(call.fields),
            )
            reader = FrameReader(idle=self.upstream.timeouts(deployment).read)
            # close, not release: a client leaving mid-stream must not leave Bedrock writing.
            return StreamReply(
                self._events(call, response, reader, translator),
                close=response.close,
                finished=lambda: translator.finished and response.content.is_eof(),
            )

    async def _events(
        self,
        call: Call,
        response: UpstreamResponse,
        reader: FrameReader,
        translator: StreamTranslator,
    ) -> AsyncIterator[bytes]:
        """Each event-stream message as the chunks it gives, as it arrives; ``[DONE]`` after
        the last (metadata). Read on to the end of the body, so the connection is reused."""
        deployment = call.deployment
        done = False
        # Each chunk and the unfinished message's bytes count against the buffer budget; transport
        # errors as 502/504; the guard closes the answer on a failure.
        chunks = self.upstream.chunks(response, call, held=reader.pending)
        with self.upstream.guard(response, call):
            try:
                async for data in chunks:
                    for message in reader.feed(data):
                        if done:
                            continue
                        if message.kind != "event":
                            raise _exception_of(message.headers, message.payload, deployment)
                        try:
                            event = decode_event(message.payload)
                        except (msgspec.DecodeError, RecursionError):
                            raise invalid_answer(
                                deployment, "a stream event that is not JSON"
                            ) from None
                        for chunk in translator.feed(message.event_type, event):
                            yield sse_data(chunk)
                        if translator.finished:
                            done = True
                            yield DONE
            except FrameError as exc:
                raise invalid_answer(deployment, f"a broken event stream ({exc})") from None
            except StreamStalled as exc:
                raise GatewayTimeout(f"Deployment {deployment.describe()} sent {exc}") from None
            finally:
                await chunks.aclose()  # now, also when the client left: its bytes given back
        if not translator.stopped:
            raise stream_incomplete(deployment, "messageStop")
        response.release()
        if not done:  # the answer ended without its metadata event: finish without usage
            if translator.include_usage:
                yield sse_data(translator.usage_chunk(None))
            yield DONE

    async def embeddings(self, call: Call) -> Reply:
        deployment = call.deployment
        settings: BedrockSettings = self.settings(deployment)
        family = embeddings.family_of(deployment.model, settings.embedding_format)
        if family is None:
            raise BadRequest(
                f"Deployment {deployment.describe()} is not a Titan or Cohere embedding model;"
                " set its settings.embedding_format",
                param="model",
            )
        encoding = call.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
        dimensions = get_field(call.fields, "dimensions", _DIMENSIONS)
        texts = embeddings.texts_of(call.get("input"))
        limit = asyncio.Semaphore(_CONCURRENT_INVOKES)

        async def invoke(batch: list[str]) -> tuple[list[list[float]], int]:
            body = embeddings.request(family, batch, dimensions, settings.cohere_input_type)
            async with limit:
                response = await self._post(call, "invoke", body, "application/json")
                with self.upstream.guard(response, call):
                    raw = await self.upstream.read(response, call)
                response.release()
            try:
                vectors, tokens = embeddings.vectors(family, raw)
            except (msgspec.DecodeError, RecursionError):
                raise invalid_answer(
                    deployment, f"an answer that is not a {family} embedding"
                ) from None
            if len(vectors) != len(batch):
                raise invalid_answer(deployment, f"{len(vectors)} vectors for {len(batch)} inputs")
            counted = response.headers.get("x-amzn-bedrock-input-token-count")
            return vectors, tokens or (int(counted) if counted and counted.isdigit() else 0)

        answers = await asyncio.gather(*(invoke(b) for b in embeddings.batches(family, texts)))
        vectors = [vector for batch, _ in answers for vector in batch]
        tokens = sum(count for _, count in answers)
        as_base64 = encoding == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": embeddings.base64_vector(v) if as_base64 else v,
            }
            for i, v in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONReply.of({"object": "list", "data": data, "model": call.model, "usage": usage})


def _import_botocore() -> None:
    """The botocore modules requests use (signer, event-stream decoder)."""
    for name in ("botocore.auth", "botocore.awsrequest", "botocore.eventstream"):
        importlib.import_module(name)


def _completion_id(response: UpstreamResponse) -> str:
    """``chatcmpl-`` and AWS's request id (what AWS support asks for), else a fresh one."""
    request_id = response.headers.get("x-amzn-requestid")
    return f"chatcmpl-{request_id or uuid.uuid4().hex}"


class _ExceptionBody(msgspec.Struct):
    message: str | None = None
    Message: str | None = None


_decode_exception = msgspec.json.Decoder(_ExceptionBody).decode


def _exception_of(headers: Mapping[str, Any], payload: bytes, deployment: Deployment) -> ProxyError:
    """A stream's exception message (``:exception-type``, JSON ``message``) or error message
    (``:error-code``, ``:error-message``) as the client's error."""
    kind = str(headers.get(":exception-type") or headers.get(":error-code") or "")
    message = headers.get(":error-message")
    if message is None:
        try:
            parsed = _decode_exception(payload)
            message = parsed.message or parsed.Message
        except msgspec.DecodeError:
            message = scrub(payload[:300].decode("utf-8", "replace"), deployment)
    return stream_error(kind, str(message) if message is not None else None, deployment)
