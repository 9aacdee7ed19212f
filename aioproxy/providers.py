"""The Provider base class, what a provider answers with, and the per-app provider registry."""

from __future__ import annotations

import difflib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar

import aiohttp
import msgspec

from .config import Config, ConfigError
from .context import Call, Deployment
from .errors import ProxyError
from .h1client import H1Pool, H1Response
from .routes import PROVIDER_KINDS, Kind

__all__ = [
    "JSONReply",
    "Provider",
    "ProviderFactory",
    "Reply",
    "StreamReply",
    "UpstreamResponse",
    "check_settings",
    "decode_settings",
]

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode


class JSONReply:
    """A whole JSON answer: encoded ``body`` bytes, sent with ``status``."""

    __slots__ = ("body", "status", "headers")

    def __init__(
        self, body: bytes, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers

    @classmethod
    def of(cls, obj: object, status: int = 200) -> JSONReply:
        """Encode ``obj`` (dict, list, msgspec Struct, ...) as the answer."""
        return cls(_encode(obj), status)


class StreamReply:
    """A streamed answer: ``events`` yields complete SSE events (bytes ending in a blank line).

    An item may hold several events (a relay passes on what each network read completed, in
    one write); use ``aioproxy.streaming.split_events`` to take one apart.

    The proxy pulls the first event before it sends the response headers, so a provider that
    raises a ProxyError before its first event still answers with a proper status. ``close`` (if
    given) runs once the stream is over, also when the client went away: release upstream
    connections there. ``finished`` (if given) says whether the upstream's answer has ended:
    after the final event the proxy waits (up to 5 s) for the rest of ``events`` unless it says
    so, to let the upstream connection go back to its pool whole.
    """

    __slots__ = ("events", "close", "headers", "finished")

    def __init__(
        self,
        events: AsyncIterator[bytes],
        close: Callable[[], Any] | None = None,
        headers: Mapping[str, str] | None = None,
        finished: Callable[[], bool] | None = None,
    ) -> None:
        self.events = events
        self.close = close
        self.headers = headers
        self.finished = finished

    async def aclose(self) -> None:
        aclose = getattr(self.events, "aclose", None)
        try:
            if aclose is not None:
                await aclose()
        finally:
            if self.close is not None:
                result = self.close()
                if result is not None and isinstance(result, Awaitable):
                    await result


Reply = JSONReply | StreamReply
# An upstream's answer from Provider.post: the app's lean pool's, or the session's.
UpstreamResponse = aiohttp.ClientResponse | H1Response


async def post_via(
    session: aiohttp.ClientSession,
    pool: H1Pool | None,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    timeout: aiohttp.ClientTimeout | None,
) -> UpstreamResponse:
    """POST through ``pool`` when there is one, else ``session``; redirects never followed."""
    if pool is not None:
        return await pool.post(url, body, headers, timeout or session.timeout)
    return await session.post(
        url, data=body, headers=headers, timeout=timeout, allow_redirects=False
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
        self._settings: dict[int, tuple[dict[str, Any], Any]] = {}

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
