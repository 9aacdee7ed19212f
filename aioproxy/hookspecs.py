"""Every hook aioproxy calls, declared and documented in one place.

Three kinds of hook:

* ``register_*`` run once at start-up, synchronously, with a ``register`` callback.
* Decisions (``authenticate``, ``map_model``) run per request; each implementation returns ``None``
  ("not mine"), a value, or an awaitable of either. The first non-None result wins. Raising a
  :class:`~aioproxy.errors.ProxyError` refuses the request with that error.
* Lifecycle hooks (``before_request``, ``before_attempt``, ``after_attempt``, ``after_response``,
  ``before_refusal``, ``on_error``) run per request (the attempt hooks per upstream try;
  ``before_refusal`` for a request refused for what it asked); every implementation runs, in
  pluggy's order, and may be ``async def``.

Per-request hooks are resolved into plain lists of functions when the app starts, so a hook with no
implementations costs nothing, and pluggy's ``tryfirst``/``trylast`` order holds. Wrappers
(``wrapper=True``/``hookwrapper=True``) are refused on per-request hooks: pluggy's wrappers are
synchronous and cannot wrap an ``async def`` implementation.

An implementation may accept any subset of a hook's arguments, by name.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeAlias, TypeVar, overload

import pluggy

if TYPE_CHECKING:
    from aiohttp import web
    from aiohttp.typedefs import Handler

    from .config import Config
    from .context import Call, Deployment, Principal
    from .errors import ProxyError
    from .outcome import Outcome
    from .providers import ProviderFactory
    from .routes import Kind

PROJECT = "aioproxy"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

T = TypeVar("T")
MaybeAwaitable: TypeAlias = T | Awaitable[T]


class RegisterProvider(Protocol):
    """``register(OpenAIProvider)``: under the class's ``name``; ``register(cls, "other")``: under
    another name too. ``register("openai", cls)`` is the deprecated older form."""

    @overload
    def __call__(self, provider: ProviderFactory, name: str | None = None) -> None: ...
    @overload
    def __call__(self, provider: str, name: ProviderFactory) -> None: ...


class RegisterRoute(Protocol):
    def __call__(self, method: str, path: str, handler: Handler) -> None: ...


class RegisterContext(Protocol):
    def __call__(self, context: Callable[[web.Application], AsyncIterator[None]]) -> None: ...


@hookspec
def register_providers(register: RegisterProvider, config: Config) -> None:
    """Register provider implementations.

    Runs once when an app is created. Call ``register(factory)`` for each provider this plugin
    offers: ``factory`` is a :class:`~aioproxy.Provider` subclass, registered under its ``name``
    (what a config's ``provider = "..."`` names), or any callable taking ``(upstream,
    provider_config)`` and returning a Provider, with ``register(factory, name)``. A later
    registration of the same name replaces an earlier one, so a plugin can replace a bundled
    provider. Synchronous.
    """


@hookspec
def register_routes(register: RegisterRoute, config: Config) -> None:
    """Add routes to the app.

    Runs once when an app is created (with its ``config``), before the route table is frozen. Call
    ``register(method, path, handler)``; ``handler`` is an ordinary aiohttp handler, and the app's
    error middleware renders its exceptions as OpenAI errors. Synchronous.
    """


@hookspec
def register_contexts(register: RegisterContext, app: web.Application, config: Config) -> None:
    """Add what a plugin holds for the app's life: a database, a background task.

    Runs once when an app is created (with its ``config``). Call ``register(context)`` with an
    async generator function taking the ``web.Application``: the part before its ``yield`` runs
    as the app starts (an exception there stops the start-up; a ConfigError's message is shown),
    the part after it as the app stops, once in-flight requests are done (aiohttp's
    ``cleanup_ctx``). It may keep its state in the app under its own ``web.AppKey``. ``app`` is
    the app being built, for what must be added before it starts (e.g. an
    ``on_response_prepare`` signal). Synchronous.
    """


@hookspec
def authenticate(request: web.Request, kind: Kind) -> MaybeAwaitable[Principal | None]:
    """Say who is calling.

    Runs first for every API request (not for ``/health``), before the body is read. ``request`` is
    the aiohttp request (read headers only); ``kind`` is the endpoint kind. Return a
    :class:`~aioproxy.context.Principal`, ``None`` to defer to the next implementation, or raise
    :class:`~aioproxy.errors.AuthenticationError` to refuse. The first non-None result wins; when
    every implementation returns ``None`` the request is refused with 401. Built-in: the config's
    master and virtual keys (``trylast``). May be ``async def``.
    """


@hookspec
def map_model(
    principal: Principal, model: str, kind: Kind, call: Call
) -> MaybeAwaitable[Deployment | Sequence[Deployment] | None]:
    """Say which deployments serve ``model`` for ``principal``.

    Runs after ``authenticate`` and the body is read, and again for each fallback model name;
    ``model`` is the name asked for, ``kind`` the endpoint kind, ``call`` the request so far.
    Return a :class:`~aioproxy.context.Deployment`, a sequence of them (the router chooses among
    them by the model's strategy, and retries on another), or ``None`` to defer. Give each
    deployment a stable ``id`` so its health (latency, cooldown) is tracked across requests. The
    first non-None result wins; when none answers, the client gets 404 ``model_not_found``.
    Built-in: the config's ``[[models]]`` table (``trylast``). May be ``async def``.
    """


@hookspec
def list_models(principal: Principal) -> Iterable[str] | None:
    """Model names to show ``principal`` on ``/v1/models``, besides the config's own.

    Runs for every models request; every implementation runs and the names are merged. Only return
    names that ``map_model`` can serve. Synchronous.
    """


@hookspec
def before_request(call: Call) -> MaybeAwaitable[None]:
    """Inspect, change or refuse a request before the provider is called.

    Runs after ``map_model``; ``call.deployment`` is set. Change the body with ``call.set(name,
    value)`` / ``call.pop(name)``, or re-route by ``call.route_to(deployment)``; raise a ProxyError
    to refuse (the client gets that error). Every implementation runs. May be ``async def``.
    """


@hookspec
def before_attempt(call: Call, deployment: Deployment, attempt: int) -> MaybeAwaitable[None]:
    """Observe an upstream attempt about to start: the first, each retry and each fallback.

    Runs after ``before_request``, once per try, just before the provider is called;
    ``deployment`` is the one tried (``call.deployment``) and ``attempt`` counts the request's
    tries from 1. Add headers for this try's upstream call to ``call.upstream_headers`` (a
    trace's ``traceparent``, say). Every implementation runs; exceptions are logged and
    swallowed. May be ``async def``. Not called at all when no plugin implements it, nor for a
    deployment that reaches no upstream (``Deployment.upstream`` False: a response-cache hit).
    """


@hookspec
def after_attempt(
    call: Call,
    deployment: Deployment,
    attempt: int,
    status: int,
    error: Exception | None,
    elapsed: float,
) -> MaybeAwaitable[None]:
    """Observe an upstream attempt that ended: answered, or failed (and perhaps to be retried).

    Runs once per ``before_attempt``, with the same ``call``, ``deployment`` and ``attempt``
    (an attempt its client's leaving cut short too: status 499, a ``ClientDisconnected``; one
    the gateway's stop cut short: 503, a ``ServerShutdown``).
    ``status`` is the upstream answer's status as the client
    would see it (502/504 for a connection failure or timeout); ``error`` the failure, or
    ``None`` when the answer began (a JSON answer read, a stream's first event come);
    ``elapsed`` the seconds the try took (the upstream's time to first byte, for a stream).
    ``call.upstream_request_id`` holds the upstream's own id when it sent one. Every
    implementation runs; exceptions are logged and swallowed. May be ``async def``.
    """


@hookspec
def after_response(call: Call, outcome: Outcome) -> MaybeAwaitable[None]:
    """Observe a finished request: status, timing and usage, for logging, metering or billing.

    ``call`` is the request as it was served (``call.deployment`` answered it); ``outcome`` holds
    status, timing and what usage needs. Runs after the last byte has gone to the client (for streams, after the stream ended, also when
    the client went away: see ``outcome.disconnected``; a stream cut short after its status
    went out keeps that status, ``outcome.error_code`` naming the failure: an upstream's, which
    ``on_error`` heard with its ``sent_status`` set, or the stop's, ``server_shutdown``).
    ``outcome.usage()`` decodes the token
    usage when the upstream reported it. Every implementation runs; exceptions are logged and
    swallowed, as the response is already sent. May be ``async def``.
    """


@hookspec
def before_refusal(call: Call, error: ProxyError) -> MaybeAwaitable[None]:
    """Count, or answer otherwise, a request refused for what it asked.

    Runs when an authenticated caller's request is refused for its own fault before any
    deployment was chosen, before ``on_error`` hears it: ``error`` is the refusal (a 400 for
    its body; a 408 for a body that did not arrive in time; a 413 for one too large; a 403 for
    a model its key may not use; a 404 for one not served; not a 429, a cap's), ``call`` the
    request, with no fields if its body was refused, and ``model`` ``""`` unless the path or
    the body named one. No ``before_request`` sees such a request and no upstream does: this
    is where a plugin counts it (the limits plugin: one request toward the key's and its
    team's rpm). Raise a ProxyError to answer with it instead (the limits plugin's 429 when a
    window is already full); ``on_error`` then hears that one. Every implementation runs,
    whichever raises: the first ProxyError raised answers, any other exception is logged.
    May be ``async def``.
    """


@hookspec
def on_error(request: web.Request, error: Exception, call: Call | None) -> MaybeAwaitable[None]:
    """Observe a failed request.

    Runs when a request fails with any exception, before the error is rendered; ``call`` is
    ``None`` when the failure came before the caller was authenticated (an unknown route's 404
    and a wrong method's 405, which no handler takes, and the ingress checks' refusals, 403 for
    a Host or Origin not allowed and 415, included) and for ``/v1/models`` and
    ``/v1/models/{model}``, which make no call. A request refused
    while its body was read has a call with no fields, and ``model`` ``""`` unless the path or
    the body named one. A request whose client went away
    (its handler cancelled) is reported as :class:`~aioproxy.errors.ClientDisconnected` (499),
    and one cancelled because run.py's shutdown grace ran out as
    :class:`~aioproxy.errors.ServerShutdown` (503 ``server_shutdown``; one whose stream had sent
    its status, with its first event or a keep-alive comment, keeps it: ``sent_status``). The
    stop marks its requests when the grace runs out, and aiohttp cancels them only after a wait
    of its own (up to about the grace again): a client that leaves in between is reported as
    the stop's too. Observe only: the client gets the
    error whatever this does, and exceptions raised here are logged and swallowed. Every
    implementation runs. May be ``async def``.
    """


def _hook_names() -> Iterable[str]:
    return (name for name, value in globals().items() if hasattr(value, "aioproxy_spec"))


HOOK_NAMES: tuple[str, ...] = tuple(_hook_names())
PER_REQUEST_HOOKS = (
    "authenticate",
    "map_model",
    "list_models",
    "before_request",
    "before_attempt",
    "after_attempt",
    "after_response",
    "before_refusal",
    "on_error",
)
