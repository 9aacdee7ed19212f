"""Settings a provider declares ``Secret`` are masked like the deployment's key."""

from __future__ import annotations

import msgspec
import pytest

from aioproxy import Config, ConfigError, Deployment, Provider, Secret, parse_config, scrub
from aioproxy.providers import check_settings

TOKEN = "tok-7f3a9c2e1b5d8f4a6c0e"  # nothing key-like about it: only the declaration masks it


class Nested(msgspec.Struct, frozen=True):
    password: Secret
    user: str


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    token: Secret | None = None
    region: str = "eu"
    logins: tuple[Nested, ...] = ()


class VaultProvider(Provider):
    settings_type = Settings


def _config(settings: dict[str, object]) -> Config:
    return parse_config({"models": [{"name": "m", "provider": "vault", "settings": settings}]})


def test_declared_secrets_are_marked_at_start_up_and_masked() -> None:
    config = _config(
        {"token": TOKEN, "region": "eu-west", "logins": [{"user": "ann", "password": "pw-4242"}]}
    )
    check_settings(config, {"vault": VaultProvider})
    settings = config.models[0].settings
    assert isinstance(settings["token"], Secret) and settings["token"] == TOKEN
    assert isinstance(settings["logins"][0]["password"], Secret)
    assert not isinstance(settings["region"], Secret)
    assert TOKEN not in repr(settings)
    deployment = Deployment(name="m", provider="vault", model="m", settings=settings)
    said = scrub(f"bad token {TOKEN} for ann:pw-4242 in eu-west", deployment)
    assert said == "bad token *** for ann:*** in eu-west"
    check_settings(config, {"vault": VaultProvider})  # idempotent


def test_a_secret_in_a_deployment_made_by_a_plugin_is_masked() -> None:
    deployment = Deployment(name="m", provider="p", model="m", settings={"t": Secret(TOKEN)})
    assert scrub(f"echo {TOKEN}", deployment) == "echo ***"


def test_a_secret_setting_of_the_wrong_type_stops_start_up() -> None:
    with pytest.raises(ConfigError, match=r"Expected `str`, got `int` - at `\$.models\[0\]"):
        check_settings(_config({"token": 5}), {"vault": VaultProvider})
