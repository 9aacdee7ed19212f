"""Azure OpenAI's error answers as the client's errors: OpenAI's rules (``openai_error``), and
Azure's own codes read first: its content-filter refusal, its missing deployment or route, its
rate limit with a numeric code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from aioproxy import (
    BadGateway,
    BadRequest,
    Deployment,
    ProxyError,
    RateLimited,
    openai_error,
    scrub,
)

__all__ = ["azure_error"]

# The codes Azure refuses filtered content with: chat and completions (`content_filter`), images
# (`content_policy_violation`), both with `innererror.code` ResponsibleAIPolicyViolation.
_FILTER_CODES = frozenset({"content_filter", "content_policy_violation", "contentFilter"})
_POLICY_VIOLATION = "ResponsibleAIPolicyViolation"


class _InnerError(msgspec.Struct):
    code: str | None = None
    content_filter_result: dict[str, Any] | None = None


class _AzureError(msgspec.Struct):
    message: str | None = None
    param: str | None = None
    code: str | int | None = None
    innererror: _InnerError | None = None


class _AzureBody(msgspec.Struct):
    error: _AzureError | None = None


_decode_body = msgspec.json.Decoder(_AzureBody).decode


def azure_error(
    status: int, body: bytes, deployment: Deployment, headers: Mapping[str, str]
) -> ProxyError:
    """Azure OpenAI's error answer (status, body, headers) as the error the client sees."""
    try:
        error = _decode_body(body).error
    except msgspec.DecodeError:
        error = None
    if error is None:  # not Azure's shape (a gateway's page): OpenAI's rules
        return openai_error(status, body, deployment, headers)
    code = None if error.code is None else str(error.code)
    inner = error.innererror
    where = deployment.describe()
    said = scrub(error.message or f"status {status}", deployment)
    if status == 400 and (
        code in _FILTER_CODES or (inner is not None and inner.code == _POLICY_VIOLATION)
    ):
        filtered = _filtered_categories(inner)
        return BadRequest(
            said + (f" (filtered: {', '.join(filtered)})" if filtered else ""),
            param=error.param and scrub(error.param, deployment),
            code="content_filter",
        )
    if status == 404 and code == "DeploymentNotFound":  # the config's deployment name is wrong
        return BadGateway(
            f"Deployment {where}: Azure has no such deployment: {said}",
            code="upstream_model_not_found",
        )
    if status == 404 and code == "404":  # "Resource not found": a wrong api_base or api_version
        return BadGateway(
            f"Deployment {where}: Azure has no such resource or api_version: {said}",
            code="upstream_not_found",
        )
    if status == 429:  # Azure's code is "429"; the wait is in Retry-After
        retry_after = headers.get("Retry-After")
        return RateLimited(
            f"Deployment {where} is rate limited: {said}",
            headers={"Retry-After": retry_after} if retry_after else None,
        )
    return openai_error(status, body, deployment, headers)


def _filtered_categories(inner: _InnerError | None) -> list[str]:
    """The content-filter categories that struck (``hate``, ``jailbreak``...), in Azure's order."""
    results = inner.content_filter_result if inner is not None else None
    if not results:
        return []
    return [
        name
        for name, result in results.items()
        if isinstance(result, dict) and result.get("filtered") is True
    ]
