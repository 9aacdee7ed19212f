"""Gemini's errors (``{"error": {"code", "message", "status", "details"}}``) as OpenAI errors.

Statuses pass on as for every provider (plugins/README.md, section 5): INVALID_ARGUMENT and
FAILED_PRECONDITION 400, PERMISSION_DENIED 403, NOT_FOUND 404, RESOURCE_EXHAUSTED 429 (with
RetryInfo's delay as ``Retry-After``), INTERNAL 500, UNAVAILABLE 503, DEADLINE_EXCEEDED 504.
Except where the proxy's configuration is at fault: a key Gemini refuses (an ``API_KEY_*``
ErrorInfo, which Gemini sends with a 400, or UNAUTHENTICATED) is a 502 ``upstream_auth_failed``
that repeats nothing Gemini said, and an unknown ``models/...`` a 502 ``upstream_model_not_found``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import msgspec

from aioproxy import (
    BadGateway,
    BadRequest,
    Deployment,
    NotFound,
    PermissionDenied,
    ProxyError,
    RateLimited,
    UpstreamError,
    error_text,
    scrub,
)

from .answer import ErrorStatus

__all__ = ["STATUS_OF", "error_from", "map_error", "retry_after", "stream_error"]

# google.rpc.Code names and the HTTP status each comes with.
STATUS_OF: Mapping[str, int] = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNKNOWN": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# ErrorInfo reasons that blame the deployment's key or project, not the request.
_KEY_REASONS = ("API_KEY_", "SERVICE_DISABLED", "CONSUMER_", "ACCESS_TOKEN_", "BILLING_DISABLED")
# The router's context-window fallback looks for this code.
_CONTEXT_MARKERS = ("input token count", "exceeds the maximum number of tokens", "context window")


class _Body(msgspec.Struct):
    error: ErrorStatus | None = None


_decode_body = msgspec.json.Decoder(_Body | list[_Body]).decode


def _parse(body: bytes) -> ErrorStatus | None:
    """The ``error`` of a JSON error body; a stream asked for without ``alt=sse`` has it in a
    one-item array."""
    try:
        parsed = _decode_body(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if isinstance(parsed, list):
        parsed = parsed[0] if parsed else _Body()
    return parsed.error


def retry_after(error: ErrorStatus) -> str | None:
    """RetryInfo's ``retryDelay`` ("37s", "0.5s") as a Retry-After value: whole seconds, up."""
    for detail in error.details:
        if detail.get("@type") != _RETRY_INFO:
            continue
        delay = detail.get("retryDelay")
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                return None
            if math.isfinite(seconds) and seconds >= 0:
                return str(max(1, math.ceil(seconds)))
    return None


def _blames_key(error: ErrorStatus) -> bool:
    for detail in error.details:
        reason = detail.get("reason")
        if detail.get("@type") == _ERROR_INFO and str(reason).startswith(_KEY_REASONS):
            return True
    return False


def error_from(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    """A Gemini error answer (its status, body and headers) as the error the client sees."""
    error = _parse(body)
    if error is None:  # not Gemini's JSON
        error = ErrorStatus(message=error_text(body))
    return map_error(status, error, deployment, headers.get("retry-after"))


def stream_error(error: ErrorStatus, deployment: Deployment) -> ProxyError:
    """An ``error`` chunk in a stream, mapped as an answer with its status would be."""
    status = error.code if isinstance(error.code, int) and 400 <= error.code < 600 else None
    if status is None:
        status = STATUS_OF.get(error.status or "", 502)
    return map_error(status, error, deployment)


def map_error(
    status: int, error: ErrorStatus, deployment: Deployment, retry_header: str | None = None
) -> ProxyError:
    """Gemini's status and error in OpenAI terms; every word of Gemini's is scrubbed."""
    where = deployment.describe()
    if status == 401 or error.status == "UNAUTHENTICATED" or _blames_key(error):
        return BadGateway(
            f"Deployment {where} refused the proxy's credentials (Gemini answered {status})",
            code="upstream_auth_failed",
        )
    said = scrub(error.message, deployment) if error.message else None
    if status == 429:
        delay = retry_header or retry_after(error)
        return RateLimited(
            said or f"Deployment {where} is rate limited by Gemini",
            headers={"Retry-After": delay} if delay else None,
        )
    if status == 403:  # a resource the request names (a file, a tuned model) it may not use
        return PermissionDenied(
            said or f"Gemini refused access ({where})", code="permission_denied"
        )
    if status == 404:
        if said is not None and "models/" in said:  # the deployment's model id is unknown
            return BadGateway(
                f"Deployment {where}: Gemini answered 404: {said}",
                code="upstream_model_not_found",
            )
        return NotFound(said or f"Gemini found nothing ({where})", code="not_found")
    if 400 <= status < 500 and status != 499:
        text = said or f"Deployment {where} refused the request ({status})"
        lower = text.lower()
        code = "context_length_exceeded" if any(m in lower for m in _CONTEXT_MARKERS) else None
        return BadRequest(text, status=status, code=code)
    # A 5xx passes on with its status (the router retries it); CANCELLED (499) and statuses
    # outside HTTP's set are the upstream's failure: a 502.
    failed = status if 500 <= status < 600 else 502
    message = f"Deployment {where} failed (Gemini {error.status or status})"
    return UpstreamError(
        f"{message}: {said}" if said else message, status=failed, code="upstream_error"
    )
