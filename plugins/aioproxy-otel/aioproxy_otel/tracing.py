"""The hooks: a SERVER span per request (continuing the client's W3C traceparent), a CLIENT
span per upstream attempt (whose traceparent goes upstream), GenAI attributes, TTFT as an event."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import msgspec
from aiohttp import web
from opentelemetry import trace
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from aioproxy import (
    Call,
    ClientDisconnected,
    Deployment,
    Outcome,
    ProxyError,
    hookimpl,
    mask_client_text,
    request_id,
)

from .answer import answer_facts

__all__ = ["OTelPlugin"]

CAPTURE_ENV = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_SPAN = "otel.span"  # keys in call.state
_ATTEMPT = "otel.attempt"
# gen_ai.operation.name by endpoint kind (the semantic conventions' well-known values).
_OPERATIONS = {
    "chat_completions": "chat",
    "responses": "chat",
    "messages": "chat",  # Anthropic's Messages API is its chat
    "completions": "text_completion",
    "embeddings": "embeddings",
}
# gen_ai.provider.name by provider plugin, where the conventions name it otherwise.
_PROVIDER_NAMES = {"azure": "azure.ai.openai", "bedrock": "aws.bedrock", "gemini": "gcp.gemini"}
_MAX_MODEL = 128  # a model name no deployment has, as a span holds it
_W3C = TraceContextTextMapPropagator()  # what goes upstream: W3C traceparent, whatever else is set
_encode = msgspec.json.Encoder().encode
AppContext = Callable[[web.Application], AsyncIterator[None]]  # what register_contexts takes
# A stream its client left midway (its 200 went out): the error.type its span ends with.
_CLIENT_GONE = ClientDisconnected.default_code
_MAX_CACHED = 4096  # attempt attributes kept, by deployment and operation
_MAX_PATH = 128  # a path no route has, as a span holds it (the client's text)
# http.request.method's values: the conventions' known methods, any other "_OTHER".
_METHODS = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "QUERY", "TRACE"}
)


def _now_ns() -> int:
    return time.time_ns()


def _build_provider() -> TracerProvider:
    """A provider from the standard OTEL_* variables, exporting over OTLP/HTTP in batches."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=_resource())  # reads OTEL_TRACES_SAMPLER and the limits
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # OTEL_BSP_*, OTLP_*
    return provider


def _resource() -> Resource:
    """The standard variables' resource (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``);
    named ``aioproxy`` when neither names the service (the SDK would say ``unknown_service``).
    Attributes given to ``Resource.create`` would win over both variables."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "aioproxy"}))
    return resource


class OTelPlugin:
    """Traces requests. ``tracer_provider`` (default: one built from the environment when the
    first request comes) and ``capture_content`` (default: the environment's) are for tests and
    embedding."""

    def __init__(
        self, tracer_provider: TracerProvider | None = None, capture_content: bool | None = None
    ) -> None:
        self._provider = tracer_provider
        self._tracer: trace.Tracer | None = None
        if capture_content is None:
            capture_content = os.environ.get(CAPTURE_ENV, "").strip().lower() in ("true", "1")
        self.capture_content = capture_content
        self._attempts: dict[tuple[str | None, ...], dict[str, Any]] = {}

    @property
    def tracer(self) -> trace.Tracer:
        if self._tracer is None:
            if self._provider is None:
                disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
                self._provider = TracerProvider() if disabled else _build_provider()
                if disabled:
                    self._tracer = trace.NoOpTracer()
                    return self._tracer
            self._tracer = self._provider.get_tracer("aioproxy_otel")
        return self._tracer

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Export every finished span now (blocking: call it from a thread in async code)."""
        return self._provider.force_flush(timeout_millis) if self._provider is not None else True

    def shutdown(self) -> None:
        if self._provider is not None:
            self._provider.shutdown()

    @hookimpl
    def register_contexts(self, register: Callable[[AppContext], None]) -> None:
        register(self._export_at_cleanup)

    async def _export_at_cleanup(self, app: web.Application) -> AsyncIterator[None]:
        """The app stops: export the spans still in the batch now. The SDK's own exit handler
        would, but run.py's workers end with os._exit, which skips it. (Flushed, not shut
        down: the plugin may serve another app.)"""
        yield
        if self._provider is not None:
            await asyncio.to_thread(self._provider.force_flush)

    # -- the request span ---------------------------------------------------------------------

    def _request_span(self, call: Call) -> Span:
        """The call's SERVER span, started (back-dated to the call's start) on first need."""
        span: Span | None = call.state.get(_SPAN)
        if span is None:
            operation = _OPERATIONS.get(call.kind.value, call.kind.value)
            started = _now_ns() - int((time.monotonic() - call.started) * 1e9)
            attributes = {
                "gen_ai.operation.name": operation,
                "aioproxy.request_id": call.request_id,
                "aioproxy.key": call.principal.name,
            }
            model = call.model  # "": a request refused before its body named one
            if model and not call.routed:
                # A name no deployment has is the client's text, whatever it pasted there (a
                # key, say): masked, cut short, and kept out of the span's name (whose variety
                # a tracing backend pays for).
                model = mask_client_text(call.request, model[:_MAX_MODEL])
                attributes["gen_ai.request.model"] = model
                model = ""
            elif model:
                attributes["gen_ai.request.model"] = model
            span = self.tracer.start_span(
                f"{operation} {model}" if model else operation,
                context=extract(call.request.headers),  # the client's traceparent, if any
                kind=SpanKind.SERVER,
                start_time=started,
                attributes=attributes,
            )
            call.state[_SPAN] = span
            call.state["otel.started_ns"] = started
        return span

    @hookimpl
    def before_request(self, call: Call) -> None:
        span = self._request_span(call)
        if self.capture_content:
            prompt = call.get("messages", call.get("input", call.get("prompt")))
            if prompt is not None:
                span.set_attribute("gen_ai.input.messages", _encode(prompt).decode())

    @hookimpl
    def after_response(self, call: Call, outcome: Outcome) -> None:
        span: Span | None = call.state.get(_SPAN)
        if span is None or not span.is_recording():
            return
        if outcome.ttfb is not None and outcome.stream:
            started: int = call.state["otel.started_ns"]
            span.add_event(
                "gen_ai.first_token",
                {"gen_ai.response.time_to_first_chunk": outcome.ttfb},
                timestamp=started + int(outcome.ttfb * 1e9),
            )
        # One set_attributes: each call takes the span's lock and checks what it is given.
        attributes: dict[str, Any] = {"http.response.status_code": outcome.status}
        usage = outcome.usage()
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.prompt_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.completion_tokens
        model, reasons = answer_facts(outcome)
        if model:
            attributes["gen_ai.response.model"] = model
        if reasons:
            attributes["gen_ai.response.finish_reasons"] = reasons
        if self.capture_content and outcome.body is not None:
            attributes["gen_ai.output.messages"] = outcome.body.decode("utf-8", "replace")
        if call.routed and call.deployment.upstream:  # a cache hit calls no provider
            attributes["gen_ai.provider.name"] = _provider_name(call.deployment)
        if outcome.status >= 400:
            attributes["error.type"] = str(outcome.status)
            span.set_status(Status(StatusCode.ERROR))
        elif outcome.disconnected:  # a stream its client left midway (its 200 went out)
            attributes["error.type"] = _CLIENT_GONE
            span.set_status(Status(StatusCode.ERROR))
        elif outcome.error_code is not None:  # one the gateway's stop cut midway
            attributes["error.type"] = outcome.error_code
            span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)
        span.end()

    @hookimpl
    def on_error(self, request: web.Request, error: Exception, call: Call | None) -> None:
        """The request failed: its span (one made now if it failed before it had one) ends."""
        if call is not None:
            span = self._request_span(call)
            self._end_attempt(call, error, getattr(error, "status", 500))
        else:
            span = self._refused_span(request)
        if not span.is_recording():
            return
        # The status the client got: a stream cut after its 200 keeps it (error.type says why).
        status = (error.sent_status or error.status) if isinstance(error, ProxyError) else 500
        span.set_attribute("http.response.status_code", status)
        if call is not None and call.routed and call.deployment.upstream:
            span.set_attribute("gen_ai.provider.name", _provider_name(call.deployment))
        _set_error(span, error)
        if call is not None and isinstance(error, ProxyError) and error.sent_status:
            # A stream cut after its status went out. Cut by its upstream, after_response
            # follows (relay.py) with what the stream had (its first token, any usage) and ends
            # the span; cancelled (the stop, its client), after_response came first and ended
            # it, or none comes: ended when the request's task ends.
            _end_with_task(span)
        else:
            span.end()

    def _refused_span(self, request: web.Request) -> Span:
        """The SERVER span of a request refused before it had a call: its key refused, no route
        (404) or method (405) took it, the ingress checks refused it (403 Host or Origin, 415),
        or a model route refused it. Its HTTP attributes only: no model or operation
        is known, and the client's path and method are held as the conventions allow (a path
        masked where it holds a key and cut short, an unknown method ``_OTHER``)."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        method = request.method
        attributes = {
            "http.request.method": method if method in _METHODS else "_OTHER",
            "url.path": mask_client_text(request, request.path)[:_MAX_PATH],  # as logged
            "aioproxy.request_id": request_id(request),  # the one its answer carries
        }
        if route is not None:
            attributes["http.route"] = route
        return self.tracer.start_span(
            f"aioproxy {route or 'request'}",
            context=extract(request.headers),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )

    # -- the attempt spans ----------------------------------------------------------------------

    @hookimpl
    def before_attempt(self, call: Call, deployment: Deployment, attempt: int) -> None:
        parent = self._request_span(call)
        operation = _OPERATIONS.get(call.kind.value, call.kind.value)
        attributes = dict(self._attempt_attributes(deployment, operation))
        attributes["aioproxy.attempt"] = attempt
        span = self.tracer.start_span(
            f"{operation} {deployment.model}",
            context=trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes=attributes,
        )
        call.state[_ATTEMPT] = span
        # The upstream continues this attempt's trace.
        _W3C.inject(call.upstream_headers, context=trace.set_span_in_context(span))

    def _attempt_attributes(self, deployment: Deployment, operation: str) -> dict[str, Any]:
        """An attempt span's attributes but its number: the same for every attempt on one
        deployment, so made once (parsing its address each time cost as much as the rest)."""
        # Keyed by all it is made of: a deployment edited at run time keeps its id.
        key = (
            deployment.id,
            deployment.name,
            deployment.provider,
            deployment.model,
            deployment.api_base,
            operation,
        )
        attributes = self._attempts.get(key)
        if attributes is None:
            name = deployment.id or deployment.describe()
            attributes = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": _provider_name(deployment),
                "gen_ai.request.model": deployment.model,
                "aioproxy.deployment": name,
            }
            if deployment.api_base:
                where = urlsplit(deployment.api_base)
                if where.hostname:
                    attributes["server.address"] = where.hostname
                if where.port:
                    attributes["server.port"] = where.port
            if len(self._attempts) < _MAX_CACHED:  # deployments made at run time come and go
                self._attempts[key] = attributes
        return attributes

    @hookimpl
    def after_attempt(self, call: Call, status: int, error: Exception | None) -> None:
        self._end_attempt(call, error, status)

    def _end_attempt(self, call: Call, error: BaseException | None, status: int) -> None:
        span: Span | None = call.state.pop(_ATTEMPT, None)
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if call.upstream_request_id:
            span.set_attribute("aioproxy.upstream_request_id", call.upstream_request_id)
        if error is not None:
            _set_error(span, error)
        span.end()


def _provider_name(deployment: Deployment) -> str:
    return _PROVIDER_NAMES.get(deployment.provider, deployment.provider)


def _end_with_task(span: Span) -> None:
    """End ``span`` when the request's task ends, unless something ended it first."""

    def end(_task: object) -> None:
        if span.is_recording():
            span.end()

    task = asyncio.current_task()
    if task is None:  # pragma: no cover - hooks run in the request's task
        span.end()
    else:
        task.add_done_callback(end)


def _set_error(span: Span, error: BaseException) -> None:
    """``error.type``: the error's code (``rate_limit_exceeded``), else its status (an
    upstream's error without a code: ``500``), else its class; never its message, which may
    quote the request."""
    if isinstance(error, ProxyError):
        # (A stream cut after its 200 is named by its type when it has no code, as it is logged.)
        fallback = error.type if error.sent_status else str(error.status)
        span.set_attribute("error.type", error.code or fallback)
    else:
        span.set_attribute("error.type", type(error).__qualname__)
    span.set_status(Status(StatusCode.ERROR))
