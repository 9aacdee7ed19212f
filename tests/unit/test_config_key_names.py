"""Key names are unique at start-up (#9.7): no key can pass for another in logs or plugins."""

from __future__ import annotations

from typing import Any

import pytest

from aioproxy.config import ConfigError, ResponsesConfig, parse_config


def keys_config(keys: list[dict[str, Any]], master: bool = True) -> dict[str, Any]:
    auth: dict[str, Any] = {"keys": keys}
    if master:
        auth["master_key"] = "sk-master"
    return {"auth": auth}


@pytest.mark.parametrize(
    ("keys", "where", "master"),
    [
        ([{"key": "sk-a", "name": "a"}, {"key": "sk-b", "name": "a"}], "keys[1].name", True),
        ([{"key": "sk-a", "name": "master"}], "keys[0].name", True),
        ([{"key": "sk-a", "name": "master"}], "keys[0].name", False),
        ([{"key": "sk-a"}, {"key": "sk-b", "name": "key-0"}], "keys[1].name", True),
        ([{"key": "sk-a", "name": "key-1"}, {"key": "sk-b"}], "keys[0].name", True),
    ],
    ids=["twice", "master", "master-without-master-key", "generated-before", "generated-after"],
)
def test_a_key_name_used_twice_stops_start_up(
    keys: list[dict[str, Any]], where: str, master: bool
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(keys_config(keys, master), "test.toml")
    assert f"`$.auth.{where}`" in str(caught.value)
    assert "sk-" not in str(caught.value)


def test_distinct_names_and_unnamed_keys_are_fine() -> None:
    keys = [{"key": "sk-a"}, {"key": "sk-b", "name": "key-5"}, {"key": "sk-c", "name": "c"}]
    config = parse_config(keys_config(keys), "test.toml")
    assert len(config.auth.keys) == 3


def test_the_store_is_bounded_by_default() -> None:
    responses = ResponsesConfig()
    assert responses.ttl == 30 * 24 * 3600 and responses.max_bytes == 1 << 30
    config = parse_config({"responses": {"ttl": 60, "max_bytes": 1000}}, "test.toml")
    assert (config.responses.ttl, config.responses.max_bytes) == (60, 1000)
    with pytest.raises(ConfigError, match="ttl"):
        parse_config({"responses": {"ttl": 0}}, "test.toml")
