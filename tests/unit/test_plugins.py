"""aioproxy.plugins: the plugin manager (built-ins, explicit, entry points) and the Hook caller."""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import types
from collections.abc import Iterator
from typing import Any

import aiohttp
import pluggy
import pytest

from aioproxy import Provider, ProviderConfig, Upstream, hookspecs
from aioproxy.config import Config, parse_config
from aioproxy.context import Principal
from aioproxy.deployments import deployments_from
from aioproxy.hookspecs import PER_REQUEST_HOOKS, hookimpl
from aioproxy.plugins import Hook, Hooks, PluginLoadError, make_plugin_manager
from aioproxy.providers import make_provider, registrar
from aioproxy.transport import SessionTransport

GOOD_MODULE = "aioproxy_unit_fake_plugin"
MISSING_MODULE = "aioproxy_unit_no_such_module"


def config(**raw: Any) -> Config:
    return parse_config(raw, env={})


# --- make_plugin_manager -------------------------------------------------------------------------


def test_builtins_registered_by_name() -> None:
    pm = make_plugin_manager(config(), load_entrypoints=False)
    assert pm.get_plugin("aioproxy.config_auth") is not None
    assert pm.get_plugin("aioproxy.config_models") is not None
    assert pm.project_name == "aioproxy"
    assert set(hookspecs.HOOK_NAMES) <= {name for name in dir(pm.hook) if not name.startswith("_")}


def test_builtins_get_the_config() -> None:
    cfg = config(models=[{"name": "m", "provider": "p"}], auth={"master_key": "k"})
    pm = make_plugin_manager(cfg, load_entrypoints=False)
    assert pm.get_plugin("aioproxy.config_models").table["m"][0].name == "m"
    assert pm.get_plugin("aioproxy.config_auth").open is False


@pytest.mark.parametrize("name", ["config_auth", "config_models"])
def test_disable_builtin(name: str) -> None:
    pm = make_plugin_manager(config(plugins={"disable": [name]}), load_entrypoints=False)
    assert pm.get_plugin(f"aioproxy.{name}") is None
    other = ({"config_auth", "config_models"} - {name}).pop()
    assert pm.get_plugin(f"aioproxy.{other}") is not None


class Explicit:
    @hookimpl
    def map_model(self, model: str) -> None:
        return None


def test_explicit_plugins_after_builtins() -> None:
    explicit = Explicit()
    pm = make_plugin_manager(config(), [explicit], load_entrypoints=False)
    assert pm.is_registered(explicit)
    names = [name for name, _ in pm.list_name_plugin()]
    assert names.index("aioproxy.config_models") < names.index(pm.get_name(explicit))
    # registered later and not trylast: pluggy calls it before the built-in
    impls = pm.hook.map_model.get_hookimpls()
    assert impls[-1].plugin is explicit


def test_explicit_plugin_with_unknown_hook_is_refused() -> None:
    class Typo:
        @hookimpl
        def map_modle(self, model: str) -> None: ...

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(config(), [Typo()], load_entrypoints=False)


# --- entry points --------------------------------------------------------------------------------


@pytest.fixture
def good_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A plugin module that an entry point can import, as an installed distribution would ship."""
    module = types.ModuleType(GOOD_MODULE)

    @hookimpl
    def list_models(principal: Principal) -> list[str]:
        return ["from-entry-point"]

    module.list_models = list_models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, GOOD_MODULE, module)
    return module


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[importlib.metadata.EntryPoint]]:
    """What ``importlib.metadata.entry_points`` reports: a test fills the list."""
    installed: list[importlib.metadata.EntryPoint] = []
    groups_asked: list[str] = []

    def fake_entry_points(*, group: str) -> importlib.metadata.EntryPoints:
        groups_asked.append(group)
        return importlib.metadata.EntryPoints(ep for ep in installed if ep.group == group)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    yield installed
    assert set(groups_asked) <= {"aioproxy"}


def ep(name: str, value: str, group: str = "aioproxy") -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=group)


def test_entry_point_plugin_registers(
    entry_points: list[importlib.metadata.EntryPoint], good_module: types.ModuleType
) -> None:
    entry_points.append(ep("good", GOOD_MODULE))
    pm = make_plugin_manager(config())
    assert pm.get_plugin("good") is good_module
    assert ["from-entry-point"] in pm.hook.list_models(principal=Principal("p"))


def test_entry_points_of_other_groups_ignored(
    entry_points: list[importlib.metadata.EntryPoint], good_module: types.ModuleType
) -> None:
    entry_points.append(ep("elsewhere", GOOD_MODULE, group="pytest11"))
    pm = make_plugin_manager(config())
    assert pm.get_plugin("elsewhere") is None


def test_entry_points_not_loaded_when_asked_not_to(
    entry_points: list[importlib.metadata.EntryPoint], good_module: types.ModuleType
) -> None:
    entry_points.append(ep("good", GOOD_MODULE))
    assert make_plugin_manager(config(), load_entrypoints=False).get_plugin("good") is None


def test_broken_entry_point_logged_and_skipped(
    entry_points: list[importlib.metadata.EntryPoint],
    good_module: types.ModuleType,
    caplog: pytest.LogCaptureFixture,
) -> None:
    entry_points.extend([ep("broken", MISSING_MODULE), ep("good", GOOD_MODULE)])
    with caplog.at_level(logging.ERROR, logger="aioproxy"):
        pm = make_plugin_manager(config())
    assert pm.get_plugin("broken") is None
    assert pm.get_plugin("good") is good_module  # the rest still load
    [record] = [r for r in caplog.records if r.name == "aioproxy"]
    assert record.levelno == logging.ERROR
    assert "'broken'" in record.getMessage() and MISSING_MODULE in record.getMessage()
    assert "ModuleNotFoundError" in record.getMessage()


def test_broken_entry_point_attribute_is_skipped(
    entry_points: list[importlib.metadata.EntryPoint], good_module: types.ModuleType
) -> None:
    entry_points.append(ep("no-attr", f"{GOOD_MODULE}:NoSuchThing"))
    assert make_plugin_manager(config()).get_plugin("no-attr") is None


@pytest.mark.parametrize("how", ["argument", "config"])
def test_broken_entry_point_strict_raises(
    entry_points: list[importlib.metadata.EntryPoint], how: str
) -> None:
    entry_points.append(ep("broken", MISSING_MODULE))
    with pytest.raises(PluginLoadError, match="'broken'") as caught:
        if how == "argument":
            make_plugin_manager(config(), strict=True)
        else:
            make_plugin_manager(config(plugins={"strict": True}))
    assert isinstance(caught.value.__cause__, ImportError)
    assert MISSING_MODULE in str(caught.value)


def test_strict_argument_overrides_config(
    entry_points: list[importlib.metadata.EntryPoint],
) -> None:
    entry_points.append(ep("broken", MISSING_MODULE))
    pm = make_plugin_manager(config(plugins={"strict": True}), strict=False)
    assert pm.get_plugin("broken") is None


def test_disabled_entry_point_is_never_imported(
    entry_points: list[importlib.metadata.EntryPoint],
) -> None:
    # strict, yet no error: a disabled plugin is not even imported
    entry_points.append(ep("broken", MISSING_MODULE))
    pm = make_plugin_manager(config(plugins={"disable": ["broken"], "strict": True}))
    assert pm.get_plugin("broken") is None


def test_duplicate_entry_point_registered_once(
    entry_points: list[importlib.metadata.EntryPoint], good_module: types.ModuleType
) -> None:
    entry_points.extend([ep("good", GOOD_MODULE), ep("good", GOOD_MODULE)])
    pm = make_plugin_manager(config())
    assert [name for name, _ in pm.list_name_plugin()].count("good") == 1


def test_entry_point_also_passed_explicitly_registered_once(
    entry_points: list[importlib.metadata.EntryPoint], good_module: types.ModuleType
) -> None:
    entry_points.append(ep("good", GOOD_MODULE))
    pm = make_plugin_manager(config(), [good_module])
    assert pm.is_registered(good_module)
    assert [plugin for _, plugin in pm.list_name_plugin()].count(good_module) == 1


def test_entry_point_named_like_builtin_does_not_replace_it(
    entry_points: list[importlib.metadata.EntryPoint],
) -> None:
    entry_points.append(ep("aioproxy.config_auth", MISSING_MODULE))
    pm = make_plugin_manager(config(), strict=True)  # skipped before it is imported
    assert type(pm.get_plugin("aioproxy.config_auth")).__name__ == "ConfigAuth"


# --- Hook ----------------------------------------------------------------------------------------


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    return manager


def named(
    name: str,
    result: Any = None,
    calls: list[str] | None = None,
    is_async: bool = False,
    **marks: bool,
) -> object:
    """A throwaway plugin whose ``map_model`` records its name and returns ``result``."""
    if is_async:

        async def map_model(model: str) -> Any:
            if calls is not None:
                calls.append(name)
            return result

    else:

        def map_model(model: str) -> Any:  # type: ignore[misc]
            if calls is not None:
                calls.append(name)
            return result

    plugin = types.SimpleNamespace(map_model=hookimpl(**marks)(map_model))
    return plugin


def test_empty_hook_is_falsy(pm: pluggy.PluginManager) -> None:
    hook = Hook(pm.hook.before_request)
    assert not hook and hook.callers == () and hook.name == "before_request"
    assert not hook.implemented  # the same, as an attribute


def test_a_hook_with_implementations_is_truthy(pm: pluggy.PluginManager) -> None:
    pm.register(named("a", "x"))
    hook = Hook(pm.hook.map_model)
    assert hook and hook.implemented


async def test_empty_hook_first_is_none_and_each_is_empty(pm: pluggy.PluginManager) -> None:
    hook = Hook(pm.hook.map_model)
    assert await hook.first(principal=None, model="m", kind=None, call=None) is None
    assert await hook.each(principal=None, model="m", kind=None, call=None) == []


async def test_order_honours_tryfirst_trylast_and_registration(pm: pluggy.PluginManager) -> None:
    calls: list[str] = []
    pm.register(named("plain-early", calls=calls))
    pm.register(named("last", calls=calls, trylast=True))
    pm.register(named("first", calls=calls, tryfirst=True))
    pm.register(named("plain-late", calls=calls))
    hook = Hook(pm.hook.map_model)
    assert hook
    await hook.each(model="m")
    assert calls == ["first", "plain-late", "plain-early", "last"]
    # the same order pluggy itself uses
    calls.clear()
    pm.hook.map_model(principal=None, model="m", kind=None, call=None)
    assert calls == ["first", "plain-late", "plain-early", "last"]


async def test_first_returns_first_non_none_and_stops(pm: pluggy.PluginManager) -> None:
    calls: list[str] = []
    pm.register(named("c", result="from-c", calls=calls, trylast=True))
    pm.register(named("b", result="from-b", calls=calls))
    pm.register(named("a", result=None, calls=calls, tryfirst=True))
    assert await Hook(pm.hook.map_model).first(model="m") == "from-b"
    assert calls == ["a", "b"]


async def test_first_awaits_async_impls(pm: pluggy.PluginManager) -> None:
    calls: list[str] = []
    pm.register(named("sync-none", None, calls, trylast=True))
    pm.register(named("async-value", "async-result", calls, is_async=True))
    pm.register(named("async-none", None, calls, is_async=True, tryfirst=True))
    assert await Hook(pm.hook.map_model).first(model="m") == "async-result"
    assert calls == ["async-none", "async-value"]


async def test_first_falsy_but_not_none_wins(pm: pluggy.PluginManager) -> None:
    pm.register(named("later", "x", trylast=True))
    pm.register(named("zero", 0))
    assert await Hook(pm.hook.map_model).first(model="m") == 0


async def test_each_runs_all_and_collects_non_none(pm: pluggy.PluginManager) -> None:
    calls: list[str] = []
    pm.register(named("a", "ra", calls))
    pm.register(named("b", None, calls, is_async=True))
    pm.register(named("c", "rc", calls, is_async=True))
    assert await Hook(pm.hook.map_model).each(model="m") == ["rc", "ra"]
    assert calls == ["c", "b", "a"]


def test_each_sync(pm: pluggy.PluginManager) -> None:
    pm.register(named("a", ["x"]))
    pm.register(named("b", None))
    assert Hook(pm.hook.map_model).each_sync(model="m") == [["x"]]


async def test_impl_gets_only_the_arguments_it_names(pm: pluggy.PluginManager) -> None:
    seen: dict[str, Any] = {}

    class Partial:
        @hookimpl
        def map_model(self, call: Any, model: str) -> str:  # any subset, any order
            seen.update(call=call, model=model)
            return "ok"

    pm.register(Partial())
    result = await Hook(pm.hook.map_model).first(principal="P", model="m", kind="K", call="C")
    assert result == "ok" and seen == {"call": "C", "model": "m"}


async def test_exception_propagates(pm: pluggy.PluginManager) -> None:
    class Refuses:
        @hookimpl
        async def before_request(self, call: Any) -> None:
            raise PermissionError("no")

    pm.register(Refuses())
    with pytest.raises(PermissionError):
        await Hook(pm.hook.before_request).each(call=None)


@pytest.mark.parametrize("marker", [{"wrapper": True}, {"hookwrapper": True}])
def test_wrapper_on_per_request_hook_is_refused(
    pm: pluggy.PluginManager, marker: dict[str, bool]
) -> None:
    class Wraps:
        @hookimpl(**marker)
        def authenticate(self, request: Any) -> Any:
            return (yield)

    pm.register(Wraps(), name="wrapping-plugin")
    with pytest.raises(TypeError, match="'wrapping-plugin'.*'authenticate'"):
        Hook(pm.hook.authenticate)


def test_hooks_resolves_every_per_request_hook(pm: pluggy.PluginManager) -> None:
    pm.register(named("a", "x"))
    hooks = Hooks(pm)
    for name in PER_REQUEST_HOOKS:
        hook = getattr(hooks, name)
        assert isinstance(hook, Hook) and hook.name == name
    assert hooks.map_model and not hooks.before_request


def test_hook_is_a_snapshot(pm: pluggy.PluginManager) -> None:
    hook = Hook(pm.hook.map_model)
    pm.register(named("late", "x"))
    assert not hook  # resolved once; later registrations need a new Hook
    assert Hook(pm.hook.map_model)


# --- providers: registration, construction, ProviderConfig ---------------------------------------


class ToyProvider(Provider):
    pass


class NamedProvider(Provider):
    name = "azure-toy"


def test_a_provider_name_comes_from_its_class() -> None:
    assert (ToyProvider.name, NamedProvider.name) == ("toy", "azure-toy")
    assert type("Plain", (ToyProvider,), {}).name == "plain"  # each subclass gets its own


def test_register_takes_the_class_and_an_optional_second_name() -> None:
    factories: dict[str, Any] = {}
    register = registrar(factories)
    register(ToyProvider)
    register(ToyProvider, "toy2")
    assert factories == {"toy": ToyProvider, "toy2": ToyProvider}
    with pytest.raises(TypeError, match="no provider name"):
        register(lambda upstream, config: ToyProvider(upstream, config))


def test_the_old_register_form_still_works_with_a_deprecation_warning() -> None:
    factories: dict[str, Any] = {}
    with pytest.warns(DeprecationWarning, match="register"):
        registrar(factories)("old", ToyProvider)
    assert factories == {"old": ToyProvider}


async def test_make_provider_gives_the_upstream_and_only_the_provider_config() -> None:
    cfg = config(
        auth={"master_key": "sk-master"},
        models=[
            {"name": "a", "provider": "toy", "model": "m"},
            {"name": "b", "provider": "other", "model": "m"},
        ],
    )
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(SessionTransport(session), cfg, session)
        provider_config = ProviderConfig.of("toy", cfg, deployments_from(cfg))
        provider = make_provider(ToyProvider, upstream, provider_config)
    assert provider.upstream is upstream
    assert provider.config is provider_config
    assert [d.name for d in provider_config.deployments] == ["a"]
    assert not hasattr(provider_config, "auth")


async def test_make_provider_still_takes_a_session_config_factory_with_a_warning() -> None:
    made: list[tuple[Any, Any]] = []

    def old_factory(session: aiohttp.ClientSession, config: Config) -> Provider:
        made.append((session, config))
        return ToyProvider(session, config)  # type: ignore[arg-type]

    cfg = config()
    async with aiohttp.ClientSession() as session:
        upstream = Upstream(SessionTransport(session), cfg, session)
        with pytest.warns(DeprecationWarning, match="takes \\(session, config\\)") as warned:
            provider = make_provider(old_factory, upstream, ProviderConfig.of("toy", cfg, {}))
    assert len(warned) == 1  # once, not again from Provider.__init__
    assert made == [(session, cfg)]
    assert provider.upstream is upstream


# --- Hook.logged: the hookspec's arguments by position, no coroutine while all are sync --------


def _attempt_recorder(
    name: str, calls: list[Any], is_async: bool = False, fail: bool = False
) -> Any:
    """A plugin whose before_attempt takes only (deployment, attempt), records and may fail."""

    def record(deployment: Any, attempt: int) -> None:
        calls.append((name, deployment, attempt))
        if fail:
            raise RuntimeError(f"{name} broke")

    if is_async:

        async def before_attempt(deployment: Any, attempt: int) -> None:
            record(deployment, attempt)

    else:

        def before_attempt(deployment: Any, attempt: int) -> None:  # type: ignore[misc]
            record(deployment, attempt)

    return types.SimpleNamespace(before_attempt=hookimpl(before_attempt))


def test_logged_calls_sync_impls_at_once_with_the_arguments_they_name(
    pm: pluggy.PluginManager,
) -> None:
    calls: list[Any] = []

    class Whole:
        @hookimpl
        def before_attempt(self, call: Any, deployment: Any, attempt: int) -> None:
            calls.append(("whole", call, deployment, attempt))

    pm.register(_attempt_recorder("part", calls))
    pm.register(Whole())
    assert Hook(pm.hook.before_attempt).logged("the-call", "dep", 2) is None  # nothing to await
    assert calls == [("whole", "the-call", "dep", 2), ("part", "dep", 2)]


async def test_logged_awaits_from_the_first_async_impl_on_in_order(
    pm: pluggy.PluginManager,
) -> None:
    calls: list[Any] = []
    pm.register(_attempt_recorder("third", calls), name="third")
    pm.register(_attempt_recorder("second", calls, is_async=True), name="second")
    pm.register(_attempt_recorder("first", calls), name="first")
    rest = Hook(pm.hook.before_attempt).logged("call", "dep", 1)
    assert rest is not None
    assert [name for name, *_ in calls] == ["first"]  # the rest waits for the await, in order
    await rest
    assert [name for name, *_ in calls] == ["first", "second", "third"]


async def test_logged_logs_a_failing_impl_and_runs_the_others(
    pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[Any] = []
    pm.register(_attempt_recorder("after-async", calls, fail=True), name="d")
    pm.register(_attempt_recorder("async-broken", calls, is_async=True, fail=True), name="c")
    pm.register(_attempt_recorder("ok", calls), name="b")
    pm.register(_attempt_recorder("sync-broken", calls, fail=True), name="a")
    with caplog.at_level(logging.ERROR, logger="aioproxy"):
        rest = Hook(pm.hook.before_attempt).logged("call", "dep", 1)
        assert rest is not None
        await rest
    assert [name for name, *_ in calls] == ["sync-broken", "ok", "async-broken", "after-async"]
    failures = [r.getMessage() for r in caplog.records if "before_attempt hook" in r.getMessage()]
    assert len(failures) == 3 and all("failed" in message for message in failures)
