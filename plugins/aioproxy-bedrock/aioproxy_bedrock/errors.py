"""Bedrock's errors (error answers, a stream's exception events) as the OpenAI errors clients see."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from aioproxy import (
    BadGateway,
    BadRequest,
    Deployment,
    GatewayTimeout,
    PermissionDenied,
    ProxyError,
    RateLimited,
    error_text,
    scrub,
)

__all__ = ["STATUS_OF_TYPE", "error_from", "error_type", "map_error"]

# Bedrock runtime's exceptions and the HTTP status each comes with (its API reference). A
# stream's exception events name them in camel case (throttlingException): compared folded.
STATUS_OF_TYPE: Mapping[str, int] = {
    "validationexception": 400,
    "accessdeniedexception": 403,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 408,
    "modelerrorexception": 424,
    "modelstreamerrorexception": 424,
    "throttlingexception": 429,
    "modelnotreadyexception": 429,
    "servicequotaexceededexception": 400,
    "internalserverexception": 500,
    "serviceunavailableexception": 503,
}
# AWS's answers when the proxy's own credentials are refused: the request is not to blame.
_CREDENTIAL_ERRORS = frozenset(
    {
        "unrecognizedclientexception",
        "invalidsignatureexception",
        "signaturedoesnotmatch",
        "expiredtokenexception",
        "incompletesignatureexception",
        "missingauthenticationtokenexception",
        "invalidclienttokenid",
    }
)
# The router's context-window fallback looks for this code (or these words in the message).
_CONTEXT_MARKERS = ("too long", "context window", "context length", "too many input tokens")


class _Body(msgspec.Struct):
    """``{"message": ...}`` (``Message`` from some front ends), ``__type`` at times."""

    message: str | None = None
    Message: str | None = None
    type: str | None = msgspec.field(default=None, name="__type")


_decode_body = msgspec.json.Decoder(_Body).decode


def error_type(name: str | None) -> str:
    """An AWS error type as this module keys it: ``ValidationException:http://...``,
    ``com.amazon...#ValidationException`` or ``validationException`` as ``validationexception``."""
    if not name:
        return ""
    return name.partition(":")[0].rpartition("#")[2].strip().lower()


def error_from(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    """A Bedrock error answer (``status``, body, headers) as the error the client sees."""
    try:
        parsed = _decode_body(body)
        message = parsed.message or parsed.Message
    except msgspec.DecodeError:  # not Bedrock's JSON
        parsed = _Body()
        message = error_text(body)
    kind = error_type(headers.get("x-amzn-errortype") or parsed.type)
    return map_error(status, kind, message, deployment, headers.get("retry-after"))


def map_error(
    status: int,
    kind: str,
    message: str | None,
    deployment: Deployment,
    retry_after: str | None = None,
) -> ProxyError:
    """Bedrock's status, exception type (folded, see :func:`error_type`) and message in OpenAI
    terms.

    ThrottlingException is a 429, ValidationException a 400, AccessDeniedException a 403
    (the deployment's role may not use the model: an operator's fix, said without AWS's words,
    which name the account and role); ModelNotReadyException and ServiceUnavailableException
    are 503s, for the router to retry. The proxy's own credentials refused is a 502, as for every
    provider; so is an unknown model id (``upstream_model_not_found``). Every message Bedrock
    wrote is scrubbed of anything key-like.
    """
    where = deployment.describe()
    if kind in _CREDENTIAL_ERRORS or (status == 403 and kind != "accessdeniedexception"):
        return BadGateway(
            f"Deployment {where} refused the proxy's AWS credentials (Bedrock answered {status})",
            code="upstream_auth_failed",
        )
    said = scrub(message, deployment) if message else None
    if kind == "accessdeniedexception":
        return PermissionDenied(
            f"Deployment {where}: access to the model was denied by AWS", code="access_denied"
        )
    if kind == "throttlingexception" or (status == 429 and kind != "modelnotreadyexception"):
        return RateLimited(
            said or f"Deployment {where} is rate limited by Bedrock",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    if kind in ("modelnotreadyexception", "serviceunavailableexception") or status == 503:
        return ProxyError(
            f"Deployment {where} is unavailable: {said or 'service unavailable'}",
            status=503,
            type="server_error",
            code="model_not_ready" if kind == "modelnotreadyexception" else "service_unavailable",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    if kind == "resourcenotfoundexception" or status == 404:
        return BadGateway(
            f"Deployment {where}: Bedrock answered 404: {said or 'not found'}",
            code="upstream_model_not_found",
        )
    if kind == "modeltimeoutexception" or status == 408:
        return GatewayTimeout(f"Deployment {where}: the model timed out: {said or 'timeout'}")
    if kind in ("modelerrorexception", "modelstreamerrorexception") or status == 424:
        return BadGateway(
            f"Deployment {where}: the model failed: {said or 'model error'}", code="model_error"
        )
    if status >= 500 or kind == "internalserverexception":
        return ProxyError(
            f"Deployment {where} failed (Bedrock {status}): {said or 'internal error'}",
            status=max(status, 500),
            type="server_error",
            code="upstream_error",
            caused_by_upstream=True,
        )
    text = said or f"Deployment {where} refused the request ({status})"
    code = "context_length_exceeded" if any(m in text.lower() for m in _CONTEXT_MARKERS) else None
    return BadRequest(text, status=status if 400 <= status < 500 else 400, code=code)


def stream_error(kind: str, message: str | None, deployment: Deployment) -> ProxyError:
    """A stream's exception event (``:exception-type``, its message) as an answer with that
    exception's status would be; one of a type this does not know is a 502."""
    folded = error_type(kind)
    status = STATUS_OF_TYPE.get(folded)
    if status is None:
        return BadGateway(
            f"Deployment {deployment.describe()} sent a stream exception: "
            f"{scrub(kind, deployment)}: {scrub(message or '', deployment)}",
            code="upstream_error",
        )
    return map_error(status, folded, message, deployment)
