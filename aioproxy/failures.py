"""Every way a call to an upstream fails, as the ProxyError the client sees: transport errors
and timeouts (502/504), upstream error answers (their status and words, scrubbed of secrets),
errors inside a 2xx answer or a stream, and failures while a stream is read."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping
from typing import NoReturn

import aiohttp
import msgspec

from .context import Deployment
from .errors import BadGateway, GatewayTimeout, ProxyError
from .h1client import UpstreamConnectError
from .masking import mask_of
from .streaming import EventTooLarge, StreamStalled, data_of, split_events

__all__ = [
    "MAX_UPSTREAM_BODY",
    "ErrorReader",
    "as_proxy_error",
    "error_event",
    "is_transport_error",
    "openai_error",
    "raise_stream_failure",
    "read_upstream_error",
    "scrub",
    "scrub_bytes",
    "stream_error",
]

# Upstream bodies read whole (answers and error bodies) are capped, so a hostile upstream cannot
# exhaust memory.
MAX_UPSTREAM_BODY = 64 * 1024 * 1024
_ERROR_PREVIEW = 300

# What reading from an upstream raises when the network or the upstream fails (not a bug).
_TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError, OSError)


def is_transport_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the network's or the upstream's failure, not the proxy's bug."""
    return isinstance(exc, _TRANSPORT_ERRORS)


def as_proxy_error(exc: BaseException, deployment: Deployment | None) -> ProxyError:
    """A transport error or timeout as the 502/504 the client should see (a ProxyError as it
    is; anything else as a 502 naming only its class)."""
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


def raise_stream_failure(exc: Exception, deployment: Deployment) -> NoReturn:
    """Raise a failure met while a stream is read as the client's error (any other, a bug or a
    ProxyError, as it is)."""
    if isinstance(exc, StreamStalled):
        raise GatewayTimeout(f"Deployment {deployment.describe()} sent {exc}") from exc
    if isinstance(exc, _TRANSPORT_ERRORS):
        raise as_proxy_error(exc, deployment) from exc
    if isinstance(exc, EventTooLarge):
        raise BadGateway(
            f"Deployment {deployment.describe()}: {exc}", code="upstream_too_large"
        ) from exc
    raise exc


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
        # The upstream's own failure, whatever code it chose (even "internal_error").
        caused_by_upstream=True if status >= 500 else None,
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


def error_event(data: bytes, deployment: Deployment) -> ProxyError:
    """An SSE event named ``error`` (whatever its data) as the client's 502."""
    return _upstream_error(502, _json_error_fields(data), data, deployment, "sent an error")


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
