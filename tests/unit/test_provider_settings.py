"""Provider.settings_type: checked when the app is created, decoded once per deployment."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from aioproxy import (
    ConfigError,
    Deployment,
    Provider,
    ProviderConfig,
    ProxyError,
    Upstream,
    UpstreamResponse,
    create_app,
    hookimpl,
)
from aioproxy.config import Timeouts, parse_config


class _NoTransport:
    """A Transport for providers that these tests never let call an upstream."""

    async def post(
        self, url: str, body: bytes, headers: Any, timeouts: Timeouts
    ) -> UpstreamResponse:
        raise AssertionError("no upstream call expected")

    async def close(self) -> None:
        pass


def built(cls: type[Provider]) -> Any:
    """``cls`` as the core makes it, outside an app."""
    config = parse_config({})
    return cls(Upstream(_NoTransport(), config), ProviderConfig.of(cls.name, config, {}))


class Knobs(msgspec.Struct, frozen=True):
    level: int = 1


class KnobProvider(Provider):
    name = "knobs"
    settings_type = Knobs


class Plugin:
    @hookimpl
    def register_providers(self, register: Any) -> None:
        register(KnobProvider, "knobs")


def deployment(**settings: Any) -> Deployment:
    return Deployment(name="k", provider="knobs", model="k", settings=settings)


def test_bad_settings_stop_create_app_with_the_field_path() -> None:
    config = {
        "models": [
            {"name": "ok", "provider": "knobs"},
            {"name": "bad", "provider": "knobs", "settings": {"level": "high"}},
        ]
    }
    with pytest.raises(
        ConfigError,
        match=r"model 'bad': invalid knobs settings: .*"
        r"at `\$\.models\[1\]\.settings\.level`",
    ):
        create_app(config, plugins=[Plugin()], load_entrypoints=False)


def test_settings_are_lax_about_strings_and_decoded_once() -> None:
    provider = built(KnobProvider)
    made = deployment(level="3")  # as ${VAR} gives it
    first = provider.settings(made)
    assert first == Knobs(level=3)
    assert provider.settings(made) is first  # cached for the same settings table
    assert provider.settings(deployment(level=4)) == Knobs(level=4)


def test_a_plugin_deployment_with_bad_settings_is_a_500_naming_it() -> None:
    provider = built(KnobProvider)
    with pytest.raises(ProxyError) as caught:
        provider.settings(deployment(level="high"))
    assert caught.value.status == 500 and caught.value.code == "invalid_settings"
    assert "k (knobs:k)" in caught.value.message


class Spaced(msgspec.Struct, frozen=True, kw_only=True):
    keep_alive: str = "1m"


class SpacedProvider(Provider):
    name = "spaced"
    settings_type = Spaced


class SharedProvider(SpacedProvider):
    allow_unknown_settings = True  # its settings table also holds other plugins' keys


def serving(provider: type[Provider]) -> object:
    class Registers:
        @hookimpl
        def register_providers(self, register: Any) -> None:
            register(provider, "spaced")

    return Registers()


def test_a_misspelt_setting_stops_create_app_naming_its_path() -> None:
    config = {"models": [{"name": "m", "provider": "spaced", "settings": {"keepalive": "5m"}}]}
    with pytest.raises(ConfigError) as caught:
        create_app(config, plugins=[serving(SpacedProvider)], load_entrypoints=False)
    assert str(caught.value) == (
        "model 'm': invalid spaced settings: Object contains unknown field `keepalive` "
        "(did you mean `keep_alive`?) - at `$.models[0].settings.keepalive`"
    )


def test_a_provider_can_leave_unknown_settings_to_other_plugins() -> None:
    config = {
        "models": [
            {"name": "m", "provider": "spaced", "settings": {"keep_alive": "5m", "cache_ttl": 3}}
        ]
    }
    create_app(config, plugins=[serving(SharedProvider)], load_entrypoints=False)
    provider = built(SharedProvider)
    made = Deployment(name="m", provider="spaced", model="m", settings={"keep_alive": "5m", "x": 1})
    assert provider.settings(made) == Spaced(keep_alive="5m")


def test_a_plugin_deployment_with_an_unknown_setting_is_a_500_naming_it() -> None:
    provider = built(SpacedProvider)
    made = Deployment(name="m", provider="spaced", model="m", settings={"keepalive": "5m"})
    with pytest.raises(ProxyError, match="unknown field `keepalive`") as caught:
        provider.settings(made)
    assert caught.value.status == 500 and caught.value.code == "invalid_settings"
