"""The Provider base class, what it is given (ProviderConfig, an Upstream), and its settings."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import msgspec

from .config import Config, ConfigError, Timeouts
from .context import Call, Deployment
from .errors import ProxyError
from .h1client import H1Pool
from .replies import JSONReply, Reply, StreamReply
from .routes import PROVIDER_KINDS, Kind
from .transport import SessionTransport, UpstreamResponse
from .upstream import Upstream, forwardable, post_via

__all__ = [
    "JSONReply",
    "Provider",
    "ProviderConfig",
    "ProviderFactory",
    "Reply",
    "StreamReply",
    "UpstreamResponse",
    "check_settings",
    "decode_settings",
    "make_provider",
    "post_via",
]

log = logging.getLogger("aioproxy")


class ProviderConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What one provider may read of the config: never ``[auth]``."""

    name: str  # the provider name deployments use
    deployments: tuple[Deployment, ...]  # the configured ones naming this provider
    forward_headers: tuple[str, ...]  # [upstream] forward_headers, sanitised (headers.py)
    timeouts: Timeouts  # [upstream] timeouts, the default

    @classmethod
    def of(
        cls, name: str, config: Config, table: Mapping[str, tuple[Deployment, ...]]
    ) -> ProviderConfig:
        """``name``'s part of ``config``; ``table``: the configured deployments by model name."""
        return cls(
            name=name,
            deployments=tuple(d for ds in table.values() for d in ds if d.provider == name),
            forward_headers=forwardable(config.upstream.forward_headers),
            timeouts=config.upstream.timeouts,
        )


ProviderMethod = Callable[[Call], Awaitable[Reply]]


class Provider:
    """Serves deployments of one provider name.

    Subclass it and implement the endpoint kinds the provider supports, each an ``async def`` that
    takes the :class:`~aioproxy.context.Call` and returns a :class:`JSONReply` or (when
    ``call.stream``) a :class:`StreamReply`. Raise :class:`~aioproxy.errors.ProxyError` subclasses
    for failures; aiohttp client errors and timeouts are turned into 502/504 for you.

    One instance per app, created at start-up with the app's pooled ``session``; ``start`` and
    ``close`` bracket its life. Keep per-app state on the instance, never in module globals.
    ``pool`` is the app's lean keep-alive client (:mod:`aioproxy.h1client`), set before ``start``:
    pass it to :func:`aioproxy.upstream.forward` for plain POST pass-through calls.
    ``upstream`` (an :class:`~aioproxy.Upstream`, set by ``make_provider``) is the one way to
    call an upstream that the others give way to: ``post``/``guard``/``read``/``events``, or
    ``forward`` for OpenAI-compatible pass-through.
    """

    name: ClassVar[str] = ""
    # The shape of a deployment's ``settings`` table, as a msgspec Struct. The core checks every
    # configured deployment against it when the app is created, so a bad value or a key it does
    # not name (a typo) stops start-up with its field path; ``settings()`` gives a request its
    # deployment's settings, decoded once.
    settings_type: ClassVar[type[msgspec.Struct] | None] = None
    # True: keys ``settings_type`` does not name are left alone, for a provider whose settings
    # table also carries other plugins' keys (a typo then goes unnoticed).
    allow_unknown_settings: ClassVar[bool] = False

    def __init__(self, session: aiohttp.ClientSession, config: Config) -> None:
        self.session = session
        self.config = config
        self.pool: H1Pool | None = None
        self._upstream: Upstream | None = None
        self._settings: dict[int, tuple[dict[str, Any], Any]] = {}

    @property
    def upstream(self) -> Upstream:
        """The one way to call an upstream: the app's (set by make_provider), else one over
        ``session`` made on first use (a provider made outside an app)."""
        if self._upstream is None:
            self._upstream = Upstream(SessionTransport(self.session), self.config)
        return self._upstream

    @upstream.setter
    def upstream(self, upstream: Upstream) -> None:
        self._upstream = upstream

    def settings(self, deployment: Deployment) -> Any:
        """``deployment.settings`` as ``settings_type``, decoded once per settings table.

        A deployment a plugin made (never checked at start-up) with bad settings is a 500 that
        names it.
        """
        assert self.settings_type is not None, f"{type(self).__name__} has no settings_type"
        raw = deployment.settings
        cached = self._settings.get(id(raw))
        if cached is not None and cached[0] is raw:
            return cached[1]
        try:
            decoded = decode_settings(self.settings_type, raw, self.allow_unknown_settings)
        except msgspec.ValidationError as exc:
            raise ProxyError(
                f"Deployment {deployment.describe()} has invalid {self.name} settings: {exc}",
                code="invalid_settings",
            ) from None
        if len(self._settings) >= 1024:  # deployments made per request must not pile up
            self._settings.clear()
        self._settings[id(raw)] = (raw, decoded)  # holding raw keeps its id from being reused
        return decoded

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout: aiohttp.ClientTimeout,
    ) -> UpstreamResponse:
        """POST ``body`` to ``url`` through the app's lean pool (``self.pool``; the session when
        there is none, e.g. a provider made outside an app), never following a redirect.

        The answer has what a relay reads, either way: ``status``, ``headers``,
        ``content_type``, ``content_length``, ``content`` (a StreamReader), ``read()``,
        ``release()`` and ``close()``. :func:`aioproxy.upstream.answer_of` turns failures into
        the client's errors; release or close the answer on every path.
        """
        return await post_via(self.session, self.pool, url, body, headers, timeout)

    async def start(self) -> None:
        """Called once at app start-up, after ``__init__``."""

    async def close(self) -> None:
        """Called once at app clean-up."""

    async def chat_completions(self, call: Call) -> Reply:
        raise NotImplementedError

    async def responses(self, call: Call) -> Reply:
        raise NotImplementedError

    async def completions(self, call: Call) -> Reply:
        raise NotImplementedError

    async def embeddings(self, call: Call) -> Reply:
        raise NotImplementedError

    def methods(self) -> dict[Kind, ProviderMethod]:
        """The endpoint kinds this provider implements, each with its bound method."""
        served: dict[Kind, ProviderMethod] = {}
        for kind in PROVIDER_KINDS:
            if getattr(type(self), kind.value) is not getattr(Provider, kind.value):
                served[kind] = getattr(self, kind.value)
        return served


ProviderFactory = Callable[[aiohttp.ClientSession, Config], Provider]


def make_provider(factory: ProviderFactory, upstream: Upstream, config: ProviderConfig) -> Provider:
    """The one place a provider is built, on ``upstream`` (not started yet).

    ``config`` is what the provider will get instead of the whole Config; meanwhile factories
    still take ``(session, config)``, the Config ``upstream`` was made from.
    """
    session = upstream.session
    if session is None:
        raise TypeError("make_provider needs an Upstream with a session (Upstream(..., session=))")
    provider = factory(session, upstream._config)  # noqa: SLF001 - until factories take config
    if isinstance(provider, Provider):
        provider.pool = upstream.pool
        provider.upstream = upstream
    return provider


def decode_settings(
    settings_type: type[msgspec.Struct], raw: dict[str, Any], allow_unknown: bool = False
) -> Any:
    """``raw`` as ``settings_type``; a key it does not name is refused unless ``allow_unknown``.

    Lax about types, as ``${VAR}`` in a config gives strings ("0.05"). Raises ValidationError,
    whose message ends with the field's path (``- at `$.keep_alive```).
    """
    if not allow_unknown:
        _refuse_unknown_keys(settings_type, raw)
    return msgspec.convert(raw, settings_type, strict=False)


def _refuse_unknown_keys(settings_type: type[msgspec.Struct], raw: dict[str, Any]) -> None:
    # Checked here rather than by forbid_unknown_fields, which a plugin's Struct may not set.
    known = getattr(settings_type, "__struct_encode_fields__", None)
    if known is None:
        return
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise msgspec.ValidationError(f"Object contains unknown field `{key}`{hint} - at `$.{key}`")


def check_settings(config: Config, factories: Mapping[str, ProviderFactory]) -> None:
    """Check every configured deployment's settings against its provider's ``settings_type``."""
    for i, entry in enumerate(config.models):
        factory = factories.get(entry.provider)
        settings_type = getattr(factory, "settings_type", None)
        if settings_type is None:
            continue
        try:
            decode_settings(
                settings_type, entry.settings, getattr(factory, "allow_unknown_settings", False)
            )
        except msgspec.ValidationError as exc:
            path = f"$.models[{i}].settings"
            message = str(exc)
            where = message.replace("`$", f"`{path}") if "`$" in message else f"{message} - at `{path}`"
            raise ConfigError(
                f"model '{entry.name}': invalid {entry.provider} settings: {where}"
            ) from None
