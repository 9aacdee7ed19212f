"""Anthropic's errors (error answers, stream ``error`` events) as the OpenAI errors clients see."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from aioproxy import BadGateway, Deployment, ProxyError, data_of, error_text, scrub, split_events

__all__ = ["STATUS_OF_TYPE", "ErrorDetail", "error_from", "map_error", "stream_error"]

# Anthropic's error types and the HTTP status each comes with.
STATUS_OF_TYPE: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}

# The router's context-window fallback looks for this code (or these words in the message).
_CONTEXT_MARKERS = ("prompt is too long", "context window", "context length")


class ErrorDetail(msgspec.Struct):
    """An error's ``type`` and ``message``, in an answer or a stream's ``error`` event."""

    type: str | None = None
    message: str | None = None


class _Body(msgspec.Struct):
    """``{"type": "error", "error": {"type", "message"}, "request_id"}``."""

    error: ErrorDetail | None = None
    request_id: str | None = None


_decode_body = msgspec.json.Decoder(_Body).decode
_SSE_SCAN = 64 * 1024  # bytes of an SSE error body looked through for its error event


def _parse_body(body: bytes) -> _Body:
    """An error body: Anthropic's JSON, or an SSE body's first event carrying an error (a
    stream refused with an error status); empty when neither."""
    try:
        return _decode_body(body)
    except msgspec.DecodeError:
        pass
    head = body[:_SSE_SCAN]
    if b"data:" not in head:
        return _Body()
    for event in split_events(head.replace(b"\r\n", b"\n")):
        try:
            parsed = _decode_body(data_of(event))
        except msgspec.DecodeError:
            continue
        if parsed.error is not None and parsed.error.message is not None:
            return parsed
    return _Body()


def error_from(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    """An Anthropic error answer (its status, body and headers) as the error the client sees."""
    parsed = _parse_body(body)
    detail = parsed.error or ErrorDetail()
    message = detail.message
    if message is None:  # not Anthropic's JSON
        message = error_text(body)
    retry_after = headers.get("retry-after")
    return map_error(status, detail.type, message, deployment, retry_after, parsed.request_id)


def stream_error(error: ErrorDetail | None, deployment: Deployment) -> ProxyError:
    """A stream's ``error`` event (its ``error`` member), mapped as an answer with that error
    type's status would be."""
    detail = error or ErrorDetail()
    # An error of no type this knows: the upstream broke, not the request (502, not 500).
    status = STATUS_OF_TYPE.get(detail.type or "", 502)
    return map_error(status, detail.type, detail.message, deployment)


def map_error(
    status: int,
    kind: str | None,
    message: str | None,
    deployment: Deployment,
    retry_after: str | None = None,
    request_id: str | None = None,
) -> ProxyError:
    """Anthropic's status, error type and message in OpenAI terms.

    Statuses pass on as they are, as for every provider, except where the proxy's configuration
    is at fault: 401/403 mean the deployment's key was refused, not the client's (a 502 that
    repeats nothing Anthropic said), and a 404 means the deployment's model id or api_base is
    wrong (a 502, which the router retries on another deployment). 529, a status outside HTTP's
    set, is a 503. Failures of the upstream (5xx, 529) name the deployment. Every message
    Anthropic wrote is scrubbed of anything key-like.
    """
    where = deployment.describe()
    if 300 <= status < 400:
        return BadGateway(
            f"Deployment {where} answered with a redirect ({status}); redirects are not followed",
            code="upstream_redirect",
        )
    if status in (401, 403):
        return BadGateway(
            f"Deployment {where} refused the proxy's credentials (Anthropic answered {status})",
            code="upstream_auth_failed",
        )
    said = scrub(message, deployment) if message else None
    headers = {"Retry-After": retry_after} if retry_after else None
    if status == 529 or kind == "overloaded_error":
        return ProxyError(
            _upstream_failure(where, "is overloaded (Anthropic 529)", said, request_id, deployment),
            status=503,
            type="server_error",
            code="overloaded",
            headers=headers,
        )
    if status == 500:
        return ProxyError(
            _upstream_failure(where, "failed (Anthropic 500)", said, request_id, deployment),
            status=500,
            type="api_error",
            code=kind and scrub(kind, deployment),
            caused_by_upstream=True,
        )
    if status >= 500:  # an edge proxy's 502/503/504: the upstream is unwell, not the request
        return ProxyError(
            _upstream_failure(where, f"answered {status}", said, request_id, deployment),
            status=status,
            type="upstream_error",
            code="upstream_error",
        )
    if status == 429:
        return ProxyError(
            said or f"Deployment {where} is rate limited by Anthropic",
            status=429,
            type="rate_limit_error",
            code="rate_limit_exceeded",
            headers=headers,
        )
    if status == 404:  # the deployment's model id (`model: ...`), or a wrong api_base
        unknown_model = kind == "not_found_error" and (said or "").startswith("model:")
        return BadGateway(
            f"Deployment {where}: Anthropic answered 404: {said or 'not found'}",
            code="upstream_model_not_found" if unknown_model else "upstream_not_found",
        )
    if status == 413:
        return ProxyError(
            said or "The request is too large for Anthropic",
            status=413,
            type="invalid_request_error",
            code="request_too_large",
        )
    text = said or f"Deployment {where} refused the request ({status})"
    code = "context_length_exceeded" if any(m in text.lower() for m in _CONTEXT_MARKERS) else None
    return ProxyError(text, status=status, type="invalid_request_error", code=code)


def _upstream_failure(
    where: str, what: str, said: str | None, request_id: str | None, deployment: Deployment
) -> str:
    message = f"Deployment {where} {what}"
    if said:
        message += f": {said}"
    if request_id:  # what Anthropic's support asks for; upstream text too, so scrubbed
        message += f" (request_id {scrub(request_id, deployment)})"
    return message
