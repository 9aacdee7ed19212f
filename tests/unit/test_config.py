"""aioproxy.config: the TOML shape, defaults, ``${VAR}`` expansion, errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from aioproxy.config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    Secret,
    TimeoutOverrides,
    Timeouts,
    load_config,
    parse_config,
)
from aioproxy.context import Deployment

# The README's documented config, verbatim but for the commented-out lines made real.
DOCUMENTED = """
[auth]
master_key = "${AIOPROXY_MASTER_KEY}"     # sees every model
[[auth.keys]]                             # virtual keys, optionally limited to some models
key = "sk-team-a"
name = "team-a"
models = ["gpt-test"]

[[models]]
name = "gpt-test"                   # the model name clients send
provider = "openai"                 # provider plugin name
model = "gpt-4o-mini"               # the model id sent upstream (default: name)
api_base = "http://127.0.0.1:9000/v1"
api_key = "sk-upstream"             # sent upstream; never the client's key
weight = 2.5
timeouts = { connect = 10, read = 600, total = 900 }
headers = { "OpenAI-Organization" = "org-1" }
settings = { delay = 0.05 }

[server]
max_body_size = 33554432            # bytes; larger bodies get 413

[upstream]
timeouts = { connect = 10, read = 600 }
forward_headers = ["openai-beta", "x-request-id"]   # the only client headers sent upstream

[aliases]
chat_completions = ["/openai/v1/chat/completions"]

[plugins]
strict = false
disable = []
"""

ENV = {"AIOPROXY_MASTER_KEY": "sk-master-from-env"}


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "aioproxy.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def parse(raw: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    return parse_config(raw, "test.toml", env={} if env is None else env)


def config_error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(raw, env)
    return str(caught.value)


def test_load_documented_shape(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, DOCUMENTED), env=ENV)

    assert config.auth.master_key == "sk-master-from-env"
    assert isinstance(config.auth.master_key, Secret)
    [vkey] = config.auth.keys
    assert (vkey.key, vkey.name, vkey.models) == ("sk-team-a", "team-a", ["gpt-test"])
    assert isinstance(vkey.key, Secret)
    [model] = config.models
    assert (model.name, model.provider, model.model) == ("gpt-test", "openai", "gpt-4o-mini")
    assert model.api_base == "http://127.0.0.1:9000/v1"
    assert model.api_key == "sk-upstream" and isinstance(model.api_key, Secret)
    assert model.weight == 2.5
    assert model.timeouts == TimeoutOverrides(connect=10.0, read=600.0, total=900.0)
    assert model.headers == {"OpenAI-Organization": "org-1"}
    assert model.settings == {"delay": 0.05}
    assert config.server.max_body_size == 33554432
    assert config.upstream.timeouts == Timeouts(connect=10.0, read=600.0, total=None)
    assert config.upstream.forward_headers == ["openai-beta", "x-request-id"]
    assert config.aliases == {"chat_completions": ["/openai/v1/chat/completions"]}
    assert config.plugins.strict is False and config.plugins.disable == []


def test_defaults() -> None:
    config = parse({})
    assert config == Config()
    assert config.auth.master_key is None and config.auth.keys == []
    assert config.models == []
    assert (config.server.host, config.server.port) == ("127.0.0.1", 4000)
    assert config.server.max_body_size == 32 * 1024 * 1024
    assert config.upstream.timeouts == Timeouts(connect=10.0, read=120.0, total=None)
    assert config.upstream.forward_headers == ["openai-beta", "x-request-id"]
    assert config.upstream.max_connections == 0
    assert config.plugins.strict is False and config.plugins.disable == []
    assert config.aliases == {}


def test_model_entry_defaults() -> None:
    [entry] = parse({"models": [{"name": "m", "provider": "p"}]}).models
    assert entry.model is None and entry.api_base is None and entry.api_key is None
    assert entry.weight == 1.0 and entry.timeouts is None
    assert entry.headers == {} and entry.settings == {}


def test_default_config_file_loads() -> None:
    config = load_config(DEFAULT_CONFIG_PATH, env={})
    assert [m.name for m in config.models] == ["echo", "echo-slow", "echo-embedding"]


# --- ${VAR} expansion ----------------------------------------------------------------------------


def test_expansion_everywhere() -> None:
    env = {"KEY": "sk-1", "ORG": "org-9", "HOST": "example.test", "TOK": "t0k", "M": "gpt-x"}
    config = parse(
        {
            "auth": {"master_key": "${KEY}", "keys": [{"key": "${TOK}", "models": ["${M}", "y"]}]},
            "models": [
                {
                    "name": "${M}",
                    "provider": "openai",
                    "api_base": "https://${HOST}:8443/v1",
                    "headers": {"Authorization": "Bearer ${TOK}", "OpenAI-Organization": "${ORG}"},
                    "settings": {"nested": {"deep": ["a", "${ORG}-${ORG}"]}, "n": 3},
                }
            ],
            "upstream": {"forward_headers": ["x-${ORG}"]},
        },
        env,
    )
    assert config.auth.master_key == "sk-1"
    assert config.auth.keys[0].key == "t0k" and config.auth.keys[0].models == ["gpt-x", "y"]
    [model] = config.models
    assert model.name == "gpt-x"
    assert model.api_base == "https://example.test:8443/v1"
    assert model.headers == {"Authorization": "Bearer t0k", "OpenAI-Organization": "org-9"}
    assert model.settings == {"nested": {"deep": ["a", "org-9-org-9"]}, "n": 3}
    assert config.upstream.forward_headers == ["x-org-9"]


def test_expansion_is_single_pass() -> None:
    # A value taken from the environment is used as it is, never expanded again.
    config = parse({"auth": {"master_key": "${A}"}}, {"A": "${B}", "B": "leak"})
    assert config.auth.master_key == "${B}"


@pytest.mark.parametrize("literal", ["$NAME", "${", "${1X}", "${ spaced }", "cost: $5"])
def test_text_that_is_not_a_reference_is_kept(literal: str) -> None:
    config = parse({"models": [{"name": "m", "provider": "p", "headers": {"x": literal}}]})
    assert config.models[0].headers["x"] == literal


def test_expansion_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOPROXY_TEST_KEY", "sk-from-os")
    config = parse_config({"auth": {"master_key": "${AIOPROXY_TEST_KEY}"}})
    assert config.auth.master_key == "sk-from-os"


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"auth": {"master_key": "${MISSING}"}}, "$.auth.master_key"),
        (
            {
                "models": [
                    {"name": "m", "provider": "p"},
                    {"name": "n", "provider": "p", "api_key": "Bearer ${MISSING}"},
                ]
            },
            "$.models[1].api_key",
        ),
        (
            {
                "models": [
                    {"name": "m", "provider": "p", "settings": {"a": {"b": ["x", "${MISSING}"]}}}
                ]
            },
            "$.models[0].settings.a.b[1]",
        ),
        ({"upstream": {"forward_headers": ["${MISSING}"]}}, "$.upstream.forward_headers[0]"),
    ],
)
def test_missing_variable_names_var_and_field(raw: dict[str, Any], path: str) -> None:
    message = config_error(raw)
    assert message.startswith("test.toml: ")
    assert "MISSING" in message
    assert f"`{path}`" in message


def test_missing_variable_in_file_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[auth]\nmaster_key = "${NOT_SET_ANYWHERE}"\n')
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE") as caught:
        load_config(path, env={})
    assert str(path) in str(caught.value)
    assert "`$.auth.master_key`" in str(caught.value)


# --- validation errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "path", "field"),
    [
        ({"models": [{"name": "m", "provider": "p", "modle": "x"}]}, "$.models[0]", "modle"),
        (
            {"models": [{"name": "m", "provider": "p", "timeouts": {"conect": 1}}]},
            "$.models[0].timeouts",
            "conect",
        ),
        ({"auth": {"keys": [{"key": "k", "model": ["a"]}]}}, "$.auth.keys[0]", "model"),
    ],
)
def test_unknown_key_names_field_path(raw: dict[str, Any], path: str, field: str) -> None:
    message = config_error(raw)
    assert "unknown field" in message
    assert f"`{field}`" in message
    assert message.endswith(f"at `{path}`")


def test_unknown_top_level_table() -> None:
    message = config_error({"sever": {"port": 1}})
    assert message.startswith("test.toml: ") and "unknown field `sever`" in message


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"server": {"port": "80"}}, "$.server.port"),
        ({"models": {"name": "m"}}, "$.models"),
        ({"models": [{"name": 1, "provider": "p"}]}, "$.models[0].name"),
        ({"models": [{"provider": "p"}]}, "$.models[0]"),
        (
            {"models": [{"name": "m", "provider": "p", "headers": {"x": 1}}]},
            "$.models[0].headers[...]",
        ),  # msgspec does not name dict keys
        ({"plugins": {"strict": "yes"}}, "$.plugins.strict"),
        ({"aliases": {"chat_completions": "/x"}}, "$.aliases[...]"),
    ],
)
def test_wrong_type_names_field_path(raw: dict[str, Any], path: str) -> None:
    assert config_error(raw).endswith(f"at `{path}`")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"auth": {"master_key": 12345}}, "$.auth.master_key"),
        ({"models": [{"name": "m", "provider": "p", "api_key": True}]}, "$.models[0].api_key"),
    ],
)
def test_non_string_secret_is_a_config_error(raw: dict[str, Any], path: str) -> None:
    assert config_error(raw).endswith(f"at `{path}`")


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        ({"models": [{"name": "m", "provider": "p", "weight": -1}]}, "$.models[0].weight"),
        ({"models": [{"name": "", "provider": "p"}]}, "$.models[0].name"),
        ({"models": [{"name": "m", "provider": ""}]}, "$.models[0].provider"),
        (
            {"models": [{"name": "m", "provider": "p", "timeouts": {"read": 0}}]},
            "$.models[0].timeouts.read",
        ),
        ({"server": {"port": 65536}}, "$.server.port"),
        ({"server": {"port": -1}}, "$.server.port"),
        ({"server": {"max_body_size": 1023}}, "$.server.max_body_size"),
        ({"upstream": {"timeouts": {"total": -5}}}, "$.upstream.timeouts.total"),
        ({"upstream": {"max_connections": -1}}, "$.upstream.max_connections"),
        # PostgreSQL takes up to 2**31 - 1 ms; above, every transaction's bounds would fail.
        ({"database": {"statement_timeout": -1}}, "$.database.statement_timeout"),
        ({"database": {"statement_timeout": 2_147_484}}, "$.database.statement_timeout"),
    ],
)
def test_constraint_errors(raw: dict[str, Any], path: str) -> None:
    assert config_error(raw).endswith(f"at `{path}`")


@pytest.mark.parametrize("port", [0, 65535])
def test_port_bounds_accepted(port: int) -> None:
    assert parse({"server": {"port": port}}).server.port == port


@pytest.mark.parametrize("seconds", [0, 2_147_483])
def test_statement_timeout_bounds_accepted(seconds: int) -> None:
    """0 is no bound; 2,147,483 s PostgreSQL's most."""
    assert parse({"database": {"statement_timeout": seconds}}).database.statement_timeout == seconds


def test_zero_weight_accepted() -> None:
    assert parse({"models": [{"name": "m", "provider": "p", "weight": 0}]}).models[0].weight == 0


def test_unknown_alias_kind() -> None:
    message = config_error({"aliases": {"chat": ["/chat"]}})
    assert "'chat'" in message and "`$.aliases`" in message
    assert "chat_completions" in message  # lists what is expected


def test_alias_path_must_be_absolute() -> None:
    message = config_error({"aliases": {"embeddings": ["/ok", "emb"]}})
    assert "`$.aliases.embeddings[1]`" in message


def test_every_alias_kind_accepted() -> None:
    from aioproxy.routes import KINDS

    config = parse({"aliases": {kind: [f"/x/{kind}"] for kind in KINDS}})
    assert set(config.aliases) == set(KINDS)


# --- files ---------------------------------------------------------------------------------------


def test_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\nport = 1\n")
    with pytest.raises(ConfigError, match="invalid TOML") as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(path)
    assert str(path) in str(caught.value)


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_file_not_utf8(tmp_path: Path) -> None:
    path = write(tmp_path, b'[auth]\nmaster_key = "\xff\xfe"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(path) in str(caught.value)


def test_validation_error_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nport = 99999\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert str(caught.value).startswith(f"{path}: ")
    assert "`$.server.port`" in str(caught.value)


def test_config_is_immutable() -> None:
    config = parse({})
    with pytest.raises(AttributeError):
        config.server = None  # type: ignore[misc]


# --- secrets -------------------------------------------------------------------------------------


def test_secret_masked_in_repr_but_usable_as_str() -> None:
    secret = Secret("sk-very-secret")
    assert repr(secret) == "Secret('***')"
    assert "sk-very-secret" not in repr([secret, {"k": secret}])
    assert f"{secret!r}" == "Secret('***')"
    assert secret == "sk-very-secret"
    assert str(secret) == "sk-very-secret" and type(str(secret)) is str
    assert f"Bearer {secret}" == "Bearer sk-very-secret"
    assert secret.encode() == b"sk-very-secret"
    assert hash(secret) == hash("sk-very-secret")


def test_config_repr_never_shows_a_key() -> None:
    config = parse(
        {
            "auth": {"master_key": "${MK}", "keys": [{"key": "sk-virtual-123", "name": "team"}]},
            "models": [{"name": "m", "provider": "p", "api_key": "sk-upstream-456"}],
        },
        {"MK": "sk-master-789"},
    )
    text = repr(config)
    for key in ("sk-master-789", "sk-virtual-123", "sk-upstream-456"):
        assert key not in text
        assert key not in str(config)
    assert "team" in text  # the rest is still shown


def test_config_repr_hides_expanded_header_key() -> None:
    config = parse(
        {
            "models": [
                {"name": "m", "provider": "p", "headers": {"Authorization": "Bearer ${TOKEN}"}}
            ]
        },
        {"TOKEN": "sk-header-secret"},
    )
    assert "sk-header-secret" not in repr(config)


def test_msgspec_refuses_to_encode_a_secret() -> None:
    secret = Secret("sk-never-on-the-wire")
    for encode in (msgspec.json.encode, msgspec.msgpack.encode):
        with pytest.raises(TypeError, match="Secret"):
            encode(secret)
        with pytest.raises(TypeError, match="Secret"):
            encode({"api_key": secret})
    deployment = Deployment(name="m", provider="p", model="m", api_key=secret)
    with pytest.raises(TypeError, match="Secret"):
        msgspec.json.encode(deployment)
    # without a key the same struct encodes: it is the Secret that is refused
    assert b'"api_key":null' in msgspec.json.encode(Deployment(name="m", provider="p", model="m"))


def test_parse_config_does_not_mutate_input() -> None:
    raw = {"auth": {"master_key": "${K}"}}
    parse(raw, {"K": "v"})
    assert raw == {"auth": {"master_key": "${K}"}}
