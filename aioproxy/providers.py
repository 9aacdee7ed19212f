"""The Provider base class, what it is given (ProviderConfig, an Upstream), and its settings."""

from __future__ import annotations

import difflib
import inspect
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import msgspec

from .config import Config, ConfigError, Secret, Timeouts
from .context import Call, Deployment
from .errors import ProxyError
from .h1client import H1Pool
from .headers import forwarded_names
from .masking import mark_secrets, secrets_in
from .replies import JSONReply, Reply, StreamReply
from .routes import PROVIDER_KINDS, Kind
from .transport import SessionTransport, UpstreamResponse
from .upstream import Upstream, forwardable

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
    "registrar",
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
    takes the :class:`~aioproxy.Call` and returns a :class:`JSONReply` or (when ``call.stream``)
    a :class:`StreamReply`. Raise :class:`~aioproxy.ProxyError` subclasses for failures.

    One instance per app, made at start-up by the core with the app's :class:`~aioproxy.Upstream`
    (``self.upstream``: the one way to call an upstream, whose transport errors come out as the
    client's 502/504) and its :class:`ProviderConfig` (``self.config``); ``start`` and ``close``
    bracket its life. Keep per-app state on the instance, never in module globals.
    """

    # What a config's ``provider = "..."`` names: the class name without "Provider", lower case
    # ("OpenAIProvider" -> "openai"), unless the class sets it.
    name: ClassVar[str] = ""
    # The shape of a deployment's ``settings`` table, as a msgspec Struct. The core checks every
    # configured deployment against it when the app is created, so a bad value or a key it does
    # not name (a typo) stops start-up with its field path; ``settings()`` gives a request its
    # deployment's settings, decoded once.
    settings_type: ClassVar[type[msgspec.Struct] | None] = None
    # True: keys ``settings_type`` does not name are left alone, for a provider whose settings
    # table also carries other plugins' keys (a typo then goes unnoticed).
    allow_unknown_settings: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" not in cls.__dict__:
            cls.name = cls.__name__.removesuffix("Provider").lower()

    def __init__(self, upstream: Upstream, config: ProviderConfig) -> None:
        if not isinstance(upstream, Upstream):  # the deprecated (session, Config) form
            warnings.warn(  # type: ignore[unreachable]  # untyped legacy callers
                f"{type(self).__name__}(session, config) is deprecated: a provider takes "
                "(upstream, provider_config)",
                DeprecationWarning,
                stacklevel=2,
            )
            upstream = Upstream(SessionTransport(upstream), config, upstream)
        self.upstream = upstream
        # A ProviderConfig; the whole Config for a provider still made the deprecated way.
        self.config = config
        self._settings: dict[int, tuple[dict[str, Any], Any]] = {}

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """Deprecated: use ``self.upstream``. The app's ClientSession."""
        return self.upstream.session

    @property
    def pool(self) -> H1Pool | None:
        """Deprecated: use ``self.upstream``. The app's lean keep-alive pool, if it has one."""
        return self.upstream.pool

    @pool.setter
    def pool(self, pool: H1Pool | None) -> None:
        self.upstream.pool = pool

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

    async def request(
        self, deployment: Deployment, method: str, url: str, headers: Mapping[str, str]
    ) -> JSONReply:
        """``method`` on ``url`` for ``deployment``, no body (see :meth:`Upstream.request`)."""
        return await self.upstream.request(deployment, method, url, headers)

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

    async def messages(self, call: Call) -> Reply:
        """Anthropic's Messages API natively (else bridged onto chat completions)."""
        raise NotImplementedError

    async def count_tokens(self, call: Call) -> Reply:
        """``/v1/messages/count_tokens`` natively: exact (else the bridge's estimate)."""
        raise NotImplementedError

    def methods(self) -> dict[Kind, ProviderMethod]:
        """The endpoint kinds this provider implements, each with its bound method."""
        served: dict[Kind, ProviderMethod] = {}
        for kind in PROVIDER_KINDS:
            if getattr(type(self), kind.value) is not getattr(Provider, kind.value):
                served[kind] = getattr(self, kind.value)
        return served


# What ``register`` takes: a Provider subclass, or any callable of the same arguments.
ProviderFactory = Callable[[Upstream, ProviderConfig], Provider]


def make_provider(factory: ProviderFactory, upstream: Upstream, config: ProviderConfig) -> Provider:
    """The one place a provider is built, on ``upstream`` (not started yet).

    A factory of the deprecated form ``(session, config)`` (its first parameter named
    ``session``) still gets the app's session and whole Config, with a DeprecationWarning.
    """
    if not _is_legacy(factory):
        return factory(upstream, config)
    warnings.warn(
        f"provider factory {getattr(factory, '__name__', factory)!r} takes (session, config): "
        "deprecated, take (upstream, provider_config)",
        DeprecationWarning,
        stacklevel=2,
    )
    legacy: Callable[[Any, Config], Provider] = factory  # type: ignore[assignment]
    with warnings.catch_warnings():  # warned once, above, not again by Provider.__init__
        warnings.simplefilter("ignore", DeprecationWarning)
        provider = legacy(upstream.session, upstream._config)  # the legacy form only
    if isinstance(provider, Provider):
        provider.upstream = upstream
    return provider


def _is_legacy(factory: ProviderFactory) -> bool:
    """Whether ``factory`` takes the deprecated ``(session, config)``: by its first parameter's
    name (start-up only)."""
    try:
        parameters = list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # a builtin or a callable with no signature
        return False
    return bool(parameters) and parameters[0] == "session"


def registrar(factories: dict[str, ProviderFactory]) -> Callable[..., None]:
    """The ``register`` callback of ``register_providers``, filling ``factories`` by name.

    ``register(OpenAIProvider)`` registers under the class's ``name``; ``register(cls, "other")``
    under another name. The deprecated ``register("openai", cls)`` still works, with a
    DeprecationWarning.
    """

    def register(provider: ProviderFactory | str, name: Any = None) -> None:
        if isinstance(provider, str):
            warnings.warn(
                f"register({provider!r}, factory) is deprecated: register(factory) takes the "
                "name from the class (or register(factory, name))",
                DeprecationWarning,
                stacklevel=2,
            )
            factory, name = name, provider
        else:
            factory = provider
        if name is None:
            name = getattr(factory, "name", "")
            if not name:
                raise TypeError(f"{factory!r} has no provider name: register(factory, name)")
        factories[name] = factory

    return register


def decode_settings(
    settings_type: type[msgspec.Struct], raw: dict[str, Any], allow_unknown: bool = False
) -> Any:
    """``raw`` as ``settings_type``; a key it does not name is refused unless ``allow_unknown``.

    Lax about types, as ``${VAR}`` in a config gives strings ("0.05"); a field typed ``Secret``
    (a token) is one. Raises ValidationError, whose message ends with the field's path
    (``- at `$.keep_alive```).
    """
    if not allow_unknown:
        _refuse_unknown_keys(settings_type, raw)
    return msgspec.convert(raw, settings_type, strict=False, dec_hook=_secret_hook)


def _secret_hook(type_: type, obj: Any) -> Any:
    if type_ is not Secret:
        raise NotImplementedError
    if not isinstance(obj, str):
        raise TypeError(f"Expected `str`, got `{type(obj).__name__}`")  # msgspec adds the path
    return Secret(obj)


def _refuse_unknown_keys(settings_type: type[msgspec.Struct], raw: dict[str, Any]) -> None:
    # Checked here rather than by forbid_unknown_fields, which a plugin's Struct may not set.
    known = getattr(settings_type, "__struct_encode_fields__", None)
    if known is None:
        return
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise msgspec.ValidationError(
                f"Object contains unknown field `{key}`{hint} - at `$.{key}`"
            )


def check_settings(config: Config, factories: Mapping[str, ProviderFactory]) -> None:
    """Check every configured deployment's settings against its provider's ``settings_type``,
    and mark the values it declares ``Secret`` as such in the settings table, so that they are
    masked as the key is (masking.py); log the ``forward_headers`` that are never forwarded
    (once per app: ProviderConfig and the Upstream drop them silently)."""
    forwarded_names(config.upstream.forward_headers)
    for i, entry in enumerate(config.models):
        factory = factories.get(entry.provider)
        settings_type = getattr(factory, "settings_type", None)
        if settings_type is None:
            continue
        try:
            decoded = decode_settings(
                settings_type, entry.settings, getattr(factory, "allow_unknown_settings", False)
            )
        except msgspec.ValidationError as exc:
            path = f"$.models[{i}].settings"
            message = str(exc)
            where = (
                message.replace("`$", f"`{path}") if "`$" in message else f"{message} - at `{path}`"
            )
            raise ConfigError(
                f"model '{entry.name}': invalid {entry.provider} settings: {where}"
            ) from None
        # In place: every deployment made of this entry shares its table (and so its mask).
        if secrets := frozenset(secrets_in(decoded)):
            mark_secrets(entry.settings, secrets)
