"""The admin API on SQLite and PostgreSQL: keys, teams, validation, who may call it."""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
import aioproxy_echo
import aioproxy_openai
import openai
import pytest

from aioproxy import create_app
from aioproxy.keys import plugin_manager_key, workers_key
from tests.control.conftest import Control, chat, control_config
from tests.support import MASTER_KEY

KEY_FIELDS = {
    "id",
    "object",
    "source",
    "name",
    "key_prefix",
    "team",
    "models",
    "rpm",
    "tpm",
    "max_parallel",
    "max_budget",
    "budget_duration",
    "budget_resets_at",
    "spend",
    "total_spend",
    "expires_at",
    "disabled",
    "role",
    "metadata",
    "created_at",
    "last_used_at",
}


def assert_error(data: dict[str, Any], param: str | None, code: str | None = None) -> None:
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


async def test_create_key_shows_the_secret_once(control: Control) -> None:
    created = await control.new_key(name="alice", rpm=10, metadata={"owner": "a"})
    secret = created.pop("key")
    assert secret.startswith("sk-") and len(secret) >= 35
    assert set(created) == KEY_FIELDS
    assert created["key_prefix"] == secret[:7] and created["name"] == "alice"
    assert created["rpm"] == 10 and created["spend"] == 0 and created["source"] == "database"
    shown = await control.admin("GET", f"/admin/keys/{created['id']}")
    listed = await control.admin("GET", "/admin/keys")
    for data in (shown, listed):
        assert secret not in str(data)
    assert shown == created
    assert listed["object"] == "list" and created in listed["data"]
    # the key works at once, on this instance
    reply = await chat(control.server, secret)
    assert reply.choices[0].message.content


async def test_the_database_holds_only_a_digest(control: Control) -> None:
    secret = (await control.new_key())["key"]
    async with control.plane.engine.connect() as connection:
        import sqlalchemy as sa

        rows = (await connection.execute(sa.text("SELECT * FROM keys"))).all()
    dump = repr(rows)
    assert secret not in dump and secret[7:] not in dump


async def test_config_keys_are_listed_read_only(start_control: Any) -> None:
    control = await start_control(
        auth={"master_key": MASTER_KEY, "keys": [{"key": "sk-config-1", "name": "cfg"}]}
    )
    listed = await control.admin("GET", "/admin/keys")
    config_keys = [key for key in listed["data"] if key["source"] == "config"]
    assert [key["name"] for key in config_keys] == ["cfg"]
    assert set(config_keys[0]) == KEY_FIELDS  # a script reads both kinds alike
    assert config_keys[0]["key_prefix"] is None and config_keys[0]["role"] == "user"
    assert "sk-config-1" not in str(listed)
    # shown as listed (it was refused, as if a change), and not changed nor deleted
    assert await control.admin("GET", f"/admin/keys/{config_keys[0]['id']}") == config_keys[0]
    for method, body in (("PATCH", {"rpm": 1}), ("DELETE", None)):
        refused = await control.admin(
            method, f"/admin/keys/{config_keys[0]['id']}", body, status=403
        )
        assert_error(refused, "id", "read_only")
    # a config key that is not admin may not call the admin API
    assert_error(
        await control.admin("GET", "/admin/keys", key="sk-config-1", status=403), None, "admin_only"
    )


async def test_update_and_disable_and_revoke(control: Control) -> None:
    created = await control.new_key(name="bob")
    secret = created["key"]
    updated = await control.admin(
        "PATCH", f"/admin/keys/{created['id']}", {"name": "robert", "disabled": True}
    )
    assert updated["name"] == "robert" and updated["disabled"] is True
    with pytest.raises(openai.AuthenticationError) as refused:
        await chat(control.server, secret)
    assert refused.value.code == "key_disabled"
    await control.admin("PATCH", f"/admin/keys/{created['id']}", {"disabled": False})
    await chat(control.server, secret)
    deleted = await control.admin("DELETE", f"/admin/keys/{created['id']}")
    assert deleted == {"id": created["id"], "object": "key", "deleted": True}
    with pytest.raises(openai.AuthenticationError):
        await chat(control.server, secret)
    assert_error(
        await control.admin("GET", f"/admin/keys/{created['id']}", status=404),
        "id",
        "key_not_found",
    )


async def test_teams_crud(control: Control) -> None:
    team = await control.admin(
        "POST", "/admin/teams", {"name": "search", "rpm": 5, "models": ["gpt-test"]}, status=201
    )
    assert set(team) >= {
        "id",
        "name",
        "models",
        "rpm",
        "tpm",
        "max_budget",
        "budget_duration",
        "metadata",
        "spend",
    }
    key = await control.new_key(team=team["id"])
    assert key["team"] == team["id"]
    patched = await control.admin("PATCH", f"/admin/teams/{team['id']}", {"tpm": 1000})
    assert patched["tpm"] == 1000 and patched["rpm"] == 5
    assert [t["id"] for t in (await control.admin("GET", "/admin/teams"))["data"]] == [team["id"]]
    assert_error(
        await control.admin("DELETE", f"/admin/teams/{team['id']}", status=409),
        "id",
        "team_not_empty",
    )
    await control.admin("DELETE", f"/admin/keys/{key['id']}")
    await control.admin("DELETE", f"/admin/teams/{team['id']}")
    assert_error(
        await control.admin("GET", f"/admin/teams/{team['id']}", status=404), "id", "team_not_found"
    )


BAD_KEY_FIELDS = [
    ("name", ""),
    ("name", 5),
    ("name", "x" * 201),
    ("name", "a\x00b"),  # PostgreSQL refuses a NUL in text: a 500 before
    ("name", "line\nbreak"),
    ("team", 7),
    ("team", "team_missing"),
    ("models", "gpt-test"),
    ("models", [1]),
    ("models", ["gpt\x00test"]),
    ("rpm", 0),
    ("rpm", 2**31),  # past PostgreSQL's integer column: a 500 before
    ("rpm", 1.5),
    ("rpm", True),
    ("tpm", -1),
    ("tpm", 10**12),
    ("max_parallel", "2"),
    ("max_parallel", 2**31),
    ("max_budget", -0.01),
    ("max_budget", "10"),
    ("budget_duration", "1w"),
    ("budget_duration", "0d"),
    ("budget_duration", 30),
    ("expires_at", "tomorrow"),
    ("expires_at", "2030-01-01T00:00:00"),
    ("expires_at", 1),
    # Stored, then the key could not be shown: every listing of the keys failed (a 500).
    ("expires_at", "0001-01-01T00:00:00+01:00"),
    ("expires_at", "9999-12-31T23:59:59-01:00"),
    ("role", "root"),
    ("metadata", [1]),
    ("metadata", {"x": "y" * 20000}),
    ("disabled", "yes"),
    ("colour", "red"),
]


@pytest.mark.parametrize(("field", "value"), BAD_KEY_FIELDS)
async def test_bad_key_fields_name_the_field(control: Control, field: str, value: Any) -> None:
    body = {"name": "k", field: value}
    data = await control.admin("POST", "/admin/keys", body, status=400)
    assert_error(data, field)
    assert str(value) not in data["error"]["message"] or len(str(value)) < 3


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", None),
        ("rpm", 0),
        ("budget_duration", "2x"),
        ("models", {}),
        ("max_parallel", 0),
        ("disabled", False),
        ("colour", 1),
    ],
)
async def test_bad_team_fields_name_the_field(control: Control, field: str, value: Any) -> None:
    data = await control.admin("POST", "/admin/teams", {"name": "t", field: value}, status=400)
    assert_error(data, field)


async def test_the_largest_values_are_stored_and_shown(control: Control) -> None:
    """At the bounds of what validation admits, on both databases, and listed after."""
    largest = {
        "rpm": 2**31 - 1,
        "tpm": 2**31 - 1,
        "max_parallel": 2**31 - 1,
        "expires_at": "9999-12-31T23:59:59Z",
    }
    created = await control.new_key(**largest)
    assert {name: created[name] for name in largest} == largest
    earliest = await control.new_key(expires_at="1970-01-01T00:00:00Z")
    listed = {key["id"]: key for key in (await control.admin("GET", "/admin/keys"))["data"]}
    assert listed[created["id"]]["expires_at"] == "9999-12-31T23:59:59Z"
    assert listed[earliest["id"]]["expires_at"] == "1970-01-01T00:00:00Z"


async def test_bad_bodies_and_queries(control: Control) -> None:
    assert_error(
        await control.admin("POST", "/admin/keys", {}, status=400),
        "name",
        "missing_required_parameter",
    )
    assert_error(await control.admin("POST", "/admin/keys", [1], status=400), None)
    assert_error(await control.admin("GET", "/admin/spend?group_by=colour", status=400), "group_by")
    assert_error(await control.admin("GET", "/admin/spend?start=yesterday", status=400), "start")
    assert_error(await control.admin("GET", "/admin/requests?limit=0", status=400), "limit")
    assert_error(await control.admin("GET", "/admin/requests?status=abc", status=400), "status")
    # Each a 500 before: int() refuses "²" (a digit to str.isdigit) and 5,000 digits, and
    # PostgreSQL a NUL in text.
    assert_error(await control.admin("GET", "/admin/requests?limit=%C2%B2", status=400), "limit")
    assert_error(
        await control.admin("GET", f"/admin/requests?limit={'9' * 5000}", status=400), "limit"
    )
    for name in ("key", "model", "team"):
        assert_error(await control.admin("GET", f"/admin/requests?{name}=a%00b", status=400), name)
    assert_error(await control.admin("PATCH", "/admin/keys/key_nope", {"rpm": 1}, status=404), "id")
    assert_error(await control.admin("DELETE", "/admin/teams/team_nope", status=404), "id")


async def test_only_admins(control: Control) -> None:
    user = await control.new_key(name="user")
    admin = await control.new_key(name="ops", role="admin")
    assert_error(
        await control.admin("GET", "/admin/keys", key=user["key"], status=403), None, "admin_only"
    )
    assert_error(await control.admin("GET", "/admin/keys", key="sk-wrong", status=401), None)
    async with control.session.get(control.url("/admin/keys")) as response:
        assert response.status == 401
    made = await control.admin(
        "POST", "/admin/keys", {"name": "by-ops"}, key=admin["key"], status=201
    )
    assert made["name"] == "by-ops"


async def test_secrets_are_never_echoed_nor_logged(
    control: Control, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = (await control.new_key())["key"]
    for method, path, body in [
        ("GET", f"/admin/keys/{secret}", None),
        ("PATCH", f"/admin/keys/{secret}", {"name": "x"}),
        ("POST", "/admin/keys", {"name": "x", secret: 1}),
        ("POST", "/admin/keys", {"name": "x", "team": secret}),
        ("POST", "/admin/keys", {"name": "x", "models": secret}),
        ("GET", f"/admin/requests?key={secret}&limit={secret}", None),
    ]:
        async with control.session.request(
            method, control.url(path), json=body, headers={"Authorization": f"Bearer {MASTER_KEY}"}
        ) as response:
            text = await response.text()
            assert response.status >= 400
            assert secret not in text and secret[7:] not in text
    await chat(control.server, secret)
    await control.settle()
    # (the test server's access log is left out: `python run.py` runs with none)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert secret[7:] not in logged


async def test_a_secret_in_an_unknown_path_is_neither_told_back_nor_logged(
    start_control: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A 404 names the path it did not find, and the access log logs it: a key pasted into
    one (``/admin/sk-...``, ``/v1/sk-...``) is masked in both."""
    control = await start_control(logging={"access_log": True})
    caplog.set_level(logging.INFO)
    observer = control.server.app[plugin_manager_key].get_plugin("aioproxy.observer")
    secret = (await control.new_key())["key"]
    for path in (f"/admin/{secret}", f"/admin/keys/{secret}/more", f"/v1/{secret}"):
        async with control.session.get(
            control.url(path), headers={"Authorization": f"Bearer {MASTER_KEY}"}
        ) as response:
            error = (await response.json())["error"]
            assert response.status == 404 and error["code"] == "not_found"
            assert secret[7:] not in error["message"]
            assert error["message"].startswith(f"Unknown route: GET {path.split('sk-')[0]}")
    observer.observe_pending()  # the lines its batch would write within BATCH_WINDOW
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name != "aiohttp.access")
    assert "/admin/***" in logged and secret[7:] not in logged


async def test_the_access_log_names_the_team_and_the_row_keeps_its_id(
    start_control: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``team`` in the access line is the team's name, as ``key`` is the key's (renamed, the
    new name); the request log's row keeps the team's id, and ``request_id`` joins them."""
    control = await start_control(logging={"access_log": True})
    caplog.set_level(logging.INFO, logger="aioproxy.access")
    observer = control.server.app[plugin_manager_key].get_plugin("aioproxy.observer")
    team = await control.admin("POST", "/admin/teams", {"name": "research"}, status=201)
    key = await control.new_key(name="ci", team=team["id"])
    await chat(control.server, key["key"])
    await control.admin("PATCH", f"/admin/teams/{team['id']}", {"name": "research-eu"})
    await control.plane.cache.reload()  # what a poll does once the change is marked
    await chat(control.server, key["key"])
    observer.observe_pending()  # the lines its batch would write within BATCH_WINDOW
    lines = [r.getMessage() for r in caplog.records if r.name == "aioproxy.access"]
    fields = [dict(item.split("=", 1) for item in line.split()) for line in lines]
    fields = [f for f in fields if f["kind"] == "chat_completions"]  # not the admin calls'
    assert [(f["key"], f["team"]) for f in fields] == [("ci", "research"), ("ci", "research-eu")]
    rows = (await control.admin("GET", "/admin/requests"))["data"]
    assert {row["request_id"]: row["team_id"] for row in rows} == {
        f["request_id"]: team["id"] for f in fields
    }


async def test_change_reaches_another_instance(start_control: Any) -> None:
    """Two instances on one database: a key made on one works on the other once it polled."""
    first, second = await start_control(), await start_control()
    created = await first.new_key(name="shared")
    await second.plane.cache.refresh()  # what its poller does every poll_interval
    await chat(second.server, created["key"])
    await first.admin("DELETE", f"/admin/keys/{created['id']}")
    await second.plane.cache.refresh()
    with pytest.raises(openai.AuthenticationError):
        await chat(second.server, created["key"])


async def test_poller_picks_up_changes(start_control: Any) -> None:
    import asyncio

    first, second = await start_control(), await start_control()
    created = await first.new_key(name="polled")
    async with asyncio.timeout(30):  # safety net: the poller runs every 0.05 s here
        while created["id"] not in second.plane.cache.keys:
            await asyncio.sleep(0.02)


async def test_without_a_master_key_the_refusal_says_so(start_control: Any) -> None:
    """With no [auth] master_key the models take any key, and the admin API none: its 401
    must say why, not call the key invalid."""
    control = await start_control(auth={})
    for key in ("sk-anything", ""):
        refused = await control.admin("GET", "/admin/keys", key=key, status=401)
        assert "[auth] master_key" in refused["error"]["message"]


async def test_limits_under_workers_without_redis_are_refused(
    aiohttp_server: Any, upstream_base: str, db_url: str
) -> None:
    """Under run.py --workers N without [state] redis_url each worker counts on its own: a
    limit set through the admin API would hold N times over, so it is refused (409, naming
    [state] redis_url), as start-up refuses one already there; what counts nothing is taken."""
    app = create_app(
        control_config(upstream_base, db_url),
        plugins=[aioproxy_openai, aioproxy_echo],
        load_entrypoints=False,
    )
    app[workers_key] = 2  # what run.py sets before it forks its workers
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as session:
        control = Control(server, session)
        for path, body in (
            ("/admin/keys", {"name": "k", "rpm": 5}),
            ("/admin/keys", {"name": "k", "max_budget": 1}),
            ("/admin/teams", {"name": "t", "tpm": 100}),
        ):
            refused = await control.admin("POST", path, body, status=409)
            assert refused["error"]["code"] == "limits_need_shared_state"
            assert "[state] redis_url" in refused["error"]["message"]
            assert refused["error"]["param"] in body
        created = await control.new_key(models=["gpt-test"])  # no limit: nothing to count
        refused = await control.admin(
            "PATCH", f"/admin/keys/{created['id']}", {"max_parallel": 2}, status=409
        )
        assert refused["error"]["param"] == "max_parallel"
        await control.admin("PATCH", f"/admin/keys/{created['id']}", {"rpm": None})
