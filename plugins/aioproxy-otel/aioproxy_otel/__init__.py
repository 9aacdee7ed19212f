"""OpenTelemetry traces for aioproxy: one span per request, a child per upstream attempt.

Installed, it is loaded from entry-point group ``aioproxy`` as ``otel``. It is configured by the
standard ``OTEL_*`` environment variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (without either it stays inactive), ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``, ``OTEL_SDK_DISABLED``; it
exports over OTLP/HTTP.
Spans carry the GenAI semantic conventions' attributes; prompts and completions are recorded
only when ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tracing import OTelPlugin

__all__ = ["OTelPlugin", "plugin"]

_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class _Inactive:
    """No endpoint configured (or the SDK disabled): no hooks, so no cost per request."""


def _from_environment() -> object:
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if disabled or not any(os.environ.get(name) for name in _ENDPOINTS):
        return _Inactive()
    from .tracing import OTelPlugin  # the SDK (~1 MiB) only when traces are exported

    return OTelPlugin()


def __getattr__(name: str) -> Any:
    if name == "OTelPlugin":
        from .tracing import OTelPlugin

        return OTelPlugin
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# What the entry point registers: active once an OTLP endpoint is set. It builds nothing until
# its first request: importing the plugin opens no connection and starts no thread.
plugin = _from_environment()
