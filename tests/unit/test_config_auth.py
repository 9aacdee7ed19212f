"""aioproxy.builtins.config_auth: the key a client presents, and the principal it maps to."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from aioproxy.builtins.config_auth import ConfigAuth, key_id, presented_key
from aioproxy.config import Config, Secret, parse_config
from aioproxy.context import ANONYMOUS, Principal
from aioproxy.errors import AuthenticationError


def request(headers: dict[str, str] | None = None) -> Any:
    return make_mocked_request("POST", "/v1/chat/completions", headers=headers or {})


def config(**auth: Any) -> Config:
    return parse_config({"auth": auth}, env={})


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ({"Authorization": "Bearer sk-1"}, "sk-1"),
        ({"Authorization": "bearer sk-1"}, "sk-1"),
        ({"Authorization": "BEARER sk-1"}, "sk-1"),
        ({"Authorization": "Bearer    sk-1   "}, "sk-1"),
        ({"Authorization": "  Bearer sk-1"}, "sk-1"),
        ({"authorization": "Bearer sk-1"}, "sk-1"),
        ({"api-key": "sk-2"}, "sk-2"),
        ({"Api-Key": "sk-2"}, "sk-2"),
        ({"x-api-key": "sk-3"}, "sk-3"),
        ({"X-API-Key": "sk-3"}, "sk-3"),
    ],
)
def test_presented_key(headers: dict[str, str], key: str) -> None:
    assert presented_key(request(headers)) == key


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer    "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "sk-1"},
        {"api-key": ""},
        {"x-api-key": ""},
    ],
    ids=[
        "none",
        "bearer-no-token",
        "bearer-spaces",
        "basic",
        "no-scheme",
        "empty-api-key",
        "empty-x-api-key",
    ],
)
def test_no_key_presented(headers: dict[str, str]) -> None:
    assert presented_key(request(headers)) is None


def test_header_precedence() -> None:
    every = {"Authorization": "Bearer a", "api-key": "b", "x-api-key": "c"}
    assert presented_key(request(every)) == "a"
    assert presented_key(request({"api-key": "b", "x-api-key": "c"})) == "b"
    # a non-Bearer Authorization falls through to the key headers
    assert presented_key(request({"Authorization": "Basic zzz", "x-api-key": "c"})) == "c"
    assert presented_key(request({"api-key": "", "x-api-key": "c"})) == "c"


def test_open_without_keys() -> None:
    auth = ConfigAuth(config())
    assert auth.open
    assert auth.authenticate(request()) is ANONYMOUS
    assert auth.authenticate(request({"Authorization": "Bearer whatever"})) is ANONYMOUS


def test_master_key() -> None:
    auth = ConfigAuth(config(master_key="sk-master"))
    assert not auth.open
    principal = auth.authenticate(request({"Authorization": "Bearer sk-master"}))
    assert principal == Principal("master", None, is_master=True, id=key_id("sk-master"))
    assert principal.allows("any-model")


def test_virtual_keys() -> None:
    auth = ConfigAuth(
        config(
            keys=[
                {"key": "sk-a", "name": "team-a", "models": ["m1", "m2"]},
                {"key": "sk-b"},
                {"key": "sk-c", "models": []},
            ]
        )
    )
    a = auth.authenticate(request({"api-key": "sk-a"}))
    assert a == Principal("team-a", frozenset({"m1", "m2"}), id=key_id("sk-a"))
    assert not a.is_master and a.allows("m1") and not a.allows("m3")
    b = auth.authenticate(request({"x-api-key": "sk-b"}))
    assert b == Principal("key-1", None, id=key_id("sk-b")) and b.allows("m3")
    assert a.id != b.id and "sk-" not in a.id
    c = auth.authenticate(request({"Authorization": "Bearer sk-c"}))
    assert c.name == "key-2" and not c.allows("m1")


def test_master_and_virtual_together() -> None:
    auth = ConfigAuth(config(master_key="sk-m", keys=[{"key": "sk-v", "name": "v"}]))
    assert auth.authenticate(request({"Authorization": "Bearer sk-m"})).is_master
    assert auth.authenticate(request({"Authorization": "Bearer sk-v"})).name == "v"


def test_virtual_keys_alone_close_the_proxy() -> None:
    auth = ConfigAuth(config(keys=[{"key": "sk-v"}]))
    assert not auth.open
    with pytest.raises(AuthenticationError):
        auth.authenticate(request())


def test_missing_key() -> None:
    auth = ConfigAuth(config(master_key="sk-m"))
    with pytest.raises(AuthenticationError) as caught:
        auth.authenticate(request())
    error = caught.value
    assert (error.status, error.type) == (401, "authentication_error")
    assert error.code == "missing_api_key"
    assert "Bearer" in error.message and "api-key" in error.message


@pytest.mark.parametrize("key", ["sk-wrong", "sk-m ", "SK-M", "sk-", "sk-mm", "sk-v\x00"])
def test_wrong_key(key: str) -> None:
    auth = ConfigAuth(config(master_key="sk-m", keys=[{"key": "sk-v"}]))
    with pytest.raises(AuthenticationError) as caught:
        auth.authenticate(request({"api-key": key}))
    assert (caught.value.status, caught.value.code) == (401, "invalid_api_key")
    assert caught.value.message == "Invalid API key"  # never echoes the key


def test_keys_never_shown_by_the_plugins_state() -> None:
    auth = ConfigAuth(config(master_key="sk-master-clear", keys=[{"key": "sk-virtual-clear"}]))
    stored = repr(vars(auth)) + str(vars(auth))
    assert "sk-master-clear" not in stored and "sk-virtual-clear" not in stored
    assert all(isinstance(key, Secret) for key in auth._principals)


def test_non_ascii_key() -> None:
    auth = ConfigAuth(config(master_key="clé-ünïcode"))
    assert auth.authenticate(request({"Authorization": "Bearer clé-ünïcode"})).is_master


def test_is_trylast_hookimpl() -> None:
    marker = ConfigAuth.authenticate.aioproxy_impl  # type: ignore[attr-defined]
    assert marker["trylast"] is True
