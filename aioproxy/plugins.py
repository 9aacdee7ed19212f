"""The plugin manager: built-ins, explicit plugins and entry points; hooks resolved for the hot path."""

from __future__ import annotations

import importlib.metadata
import logging
import operator
from collections.abc import Awaitable, Callable, Iterable
from types import CoroutineType
from typing import Any

import pluggy
from aiohttp import web

from . import hookspecs
from .config import Config
from .errors import ProxyError

__all__ = ["DEFAULT_PLUGINS", "Hook", "Hooks", "PluginLoadError", "make_plugin_manager"]

log = logging.getLogger("aioproxy")

ENTRY_POINT_GROUP = "aioproxy"

# Built-in behaviour, registered like any plugin (and trylast), so an installed plugin can replace
# it. Each is a class taking the Config: per-app state lives on the instance.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "aioproxy.builtins.config_auth:ConfigAuth",
    "aioproxy.builtins.config_models:ConfigModels",
    "aioproxy.observability.observer:observer",
    # The control plane (issue 12): database keys and teams, limits, spend and the request log.
    "aioproxy.control.database:Database",
    "aioproxy.control.keyauth:KeyAuth",
    "aioproxy.control.limits:Limits",
    "aioproxy.control.spend:Spend",
    # The operators' dashboard (issue 17), when [ui] enabled.
    "aioproxy.ui.dashboard:dashboard",
    # Scale-out (issue 13): the state shared through Redis, and the response cache.
    # Both contexts trylast; the state's, registered first, starts first (the cache uses its link).
    "aioproxy.state.shared:SharedState",
    "aioproxy.cache.response_cache:response_cache",
)


class PluginLoadError(Exception):
    """A plugin could not be loaded and ``strict`` was set."""


def _import(dotted: str) -> Any:
    module_name, _, attr = dotted.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _load_entry_points(pm: pluggy.PluginManager, config: Config, strict: bool) -> None:
    """Register every plugin in entry-point group ``aioproxy``; a broken one is logged and skipped."""
    disabled = set(config.plugins.disable)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        name = entry_point.name
        if name in disabled or pm.get_plugin(name) is not None or pm.is_blocked(name):
            continue
        try:
            plugin = entry_point.load()
        except Exception as exc:
            if strict:
                raise PluginLoadError(
                    f"plugin {name!r} ({entry_point.value}) failed to import: {exc!r}"
                ) from exc
            log.error(
                "plugin %r (%s) failed to import and is skipped: %r", name, entry_point.value, exc
            )
            continue
        if pm.is_registered(plugin):  # also passed in explicitly
            continue
        pm.register(plugin, name=name)


def make_plugin_manager(
    config: Config,
    plugins: Iterable[object] = (),
    *,
    load_entrypoints: bool = True,
    strict: bool | None = None,
) -> pluggy.PluginManager:
    """A PluginManager for one app: hookspecs, built-ins, ``plugins``, then entry points.

    Args:
        plugins: modules, classes or objects with ``@hookimpl`` functions, registered as given.
        load_entrypoints: also register installed plugins from entry-point group ``aioproxy``.
        strict: make a plugin that fails to import fatal (default: ``config.plugins.strict``).
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    disabled = set(config.plugins.disable)
    for dotted in DEFAULT_PLUGINS:
        name = dotted.rsplit(".", 1)[-1].partition(":")[0]
        if name in disabled:
            continue
        factory = _import(dotted)
        pm.register(factory(config), name=f"aioproxy.{name}")
    for plugin in plugins:
        pm.register(plugin)
    if load_entrypoints:
        _load_entry_points(pm, config, config.plugins.strict if strict is None else strict)
    pm.check_pending()
    return pm


def _caller(
    function: Callable[..., Any], argnames: tuple[str, ...]
) -> Callable[[dict[str, Any]], Any]:
    """``function`` called with the named arguments picked out of a kwargs dict, built once."""
    if not argnames:
        return lambda kwargs: function()
    if len(argnames) == 1:
        (name,) = argnames
        return lambda kwargs: function(kwargs[name])
    pick = operator.itemgetter(*argnames)
    return lambda kwargs: function(*pick(kwargs))


# Whether a result's type is awaitable, per type: ``hasattr`` on a type that lacks the name
# raises and clears an AttributeError with a formatted message, a sync hook's every call.
_AWAITABLE_TYPES: dict[type, bool] = {CoroutineType: True}


def _positional(
    function: Callable[..., Any], argnames: tuple[str, ...], spec: tuple[str, ...]
) -> Callable[..., Any]:
    """``function`` called with the hookspec's arguments ``spec`` given by position."""
    if argnames == spec:
        return function
    at = tuple(spec.index(name) for name in argnames)
    if not at:
        return lambda *args: function()
    if len(at) == 1:
        (index,) = at
        return lambda *args: function(args[index])
    pick = operator.itemgetter(*at)
    return lambda *args: function(*pick(args))


def _is_awaitable(result: Any) -> bool:
    # A coroutine, or any object with __await__ (what inspect.isawaitable checks, minus its ABC
    # machinery, which costs more than the rest of a sync hook call).
    kind = type(result)
    awaitable = _AWAITABLE_TYPES.get(kind)
    if awaitable is None:
        awaitable = _AWAITABLE_TYPES[kind] = hasattr(kind, "__await__")
    return awaitable


class Hook:
    """A per-request hook's implementations as plain functions, in pluggy's call order.

    Each implementation is bound at start-up to a caller that picks its arguments from the
    call's keyword arguments, so that a request pays for calling the functions and nothing else.
    """

    __slots__ = ("callers", "functions", "implemented", "name", "positional")

    def __init__(self, caller: pluggy.HookCaller) -> None:
        self.name = caller.name
        impls = caller.get_hookimpls()
        for impl in impls:
            if impl.hookwrapper or impl.wrapper:
                raise TypeError(
                    f"plugin {impl.plugin_name!r}: hook {caller.name!r} is called per request and "
                    "takes no wrappers (pluggy's wrappers cannot wrap async implementations)"
                )
        # pluggy calls the last-registered first, tryfirst before, trylast after: reversed list.
        ordered = list(reversed(impls))
        self.functions = tuple(impl.function for impl in ordered)
        self.callers = tuple(_caller(impl.function, tuple(impl.argnames)) for impl in ordered)
        # Whether any plugin implements it: what ``bool(hook)`` says, as an attribute for the
        # request path (a truth test of the hook is a Python call: ~5 bytecodes each time).
        self.implemented = bool(self.callers)
        # The same, called with the hookspec's arguments in its order (``logged``): an
        # implementation that takes them all, as declared, is called as it is.
        names = tuple(caller.spec.argnames) if caller.spec is not None else ()
        self.positional = tuple(
            _positional(impl.function, tuple(impl.argnames), names) for impl in ordered
        )

    def __bool__(self) -> bool:
        return self.implemented

    async def first(self, **kwargs: Any) -> Any:
        """The first non-None result, awaiting awaitable results in turn."""
        for call in self.callers:
            result = call(kwargs)
            if result is not None and _is_awaitable(result):
                result = await result
            if result is not None:
                return result
        return None

    async def each(self, **kwargs: Any) -> list[Any]:
        """Run every implementation in turn; the non-None results."""
        results = []
        for call in self.callers:
            result = call(kwargs)
            if result is not None and _is_awaitable(result):
                result = await result
            if result is not None:
                results.append(result)
        return results

    async def each_answering(self, **kwargs: Any) -> None:
        """Run every implementation in turn, whichever of them raises: the first ProxyError (or
        aiohttp HTTP error, which the error middleware renders as one) raised is raised once
        all have run (it answers the request); any other exception is logged (a plugin's bug
        does not turn the answer into a 500 nor stop the others)."""
        answer: ProxyError | web.HTTPException | None = None
        for index, call in enumerate(self.callers):
            try:
                result = call(kwargs)
                if result is not None and _is_awaitable(result):
                    await result
            except (ProxyError, web.HTTPException) as exc:
                if answer is None:
                    answer = exc
            except Exception:  # noqa: BLE001 - logged, and the others still run
                self._failed(index)
        if answer is not None:
            raise answer

    def logged(self, *args: Any) -> Awaitable[None] | None:
        """Run every implementation with the hookspec's arguments, in its order; one that raises
        is logged, and the others still run. A plain call: None when every implementation has
        run (the usual case: a sync hook pays no coroutine), else the awaitable that awaits the
        first awaitable result and runs the rest in turn."""
        # Each function's index is looked up only when one fails or is awaited (enumerate()
        # costs a request ~6 bytecodes a hook).
        for function in self.positional:
            try:
                result = function(*args)
            except Exception:  # noqa: BLE001 - logged, and the others still run
                self._failed(self.positional.index(function))
                continue
            if result is not None and _is_awaitable(result):
                return self._logged_from(self.positional.index(function), result, args)
        return None

    async def _logged_from(
        self, index: int, pending: Awaitable[Any], args: tuple[Any, ...]
    ) -> None:
        try:
            await pending
        except Exception:  # noqa: BLE001 - logged, and the others still run
            self._failed(index)
        for later in range(index + 1, len(self.positional)):
            try:
                result = self.positional[later](*args)
                if result is not None and _is_awaitable(result):
                    await result
            except Exception:  # noqa: BLE001 - logged, and the others still run
                self._failed(later)

    def _failed(self, index: int) -> None:
        function = self.functions[index]
        log.exception(
            "a %s hook (%s) failed", self.name, getattr(function, "__qualname__", function)
        )

    def each_sync(self, **kwargs: Any) -> list[Any]:
        results = []
        for call in self.callers:
            result = call(kwargs)
            if result is not None:
                results.append(result)
        return results


class Hooks:
    """The per-request hooks of one plugin manager, resolved once when the app starts."""

    def __init__(self, pm: pluggy.PluginManager) -> None:
        self.authenticate = Hook(pm.hook.authenticate)
        self.map_model = Hook(pm.hook.map_model)
        self.list_models = Hook(pm.hook.list_models)
        self.before_request = Hook(pm.hook.before_request)
        self.before_attempt = Hook(pm.hook.before_attempt)
        self.after_attempt = Hook(pm.hook.after_attempt)
        self.after_response = Hook(pm.hook.after_response)
        self.before_refusal = Hook(pm.hook.before_refusal)
        self.on_error = Hook(pm.hook.on_error)
