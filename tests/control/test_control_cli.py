"""``python -m aioproxy keys|teams|spend``, against a running instance."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from typing import Any
from unittest import mock

import pytest
from aiohttp import web

from aioproxy import cli
from tests.control.conftest import Control, chat
from tests.support import MASTER_KEY

# The CLI only speaks HTTP: one database kind is enough here.
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def _env(control: Control, key: str) -> dict[str, str]:
    return {"AIOPROXY_URL": control.url("/"), "AIOPROXY_MASTER_KEY": key}


async def run_process(control: Control, *argv: str, key: str = MASTER_KEY) -> tuple[int, str, str]:
    """``python -m aioproxy ARGV`` as a process: (its exit code, stdout, stderr)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "aioproxy",
        *argv,
        env={**os.environ, **_env(control, key)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def run(control: Control, *argv: str, key: str = MASTER_KEY) -> tuple[int, str, str]:
    """What ``python -m aioproxy ARGV`` does, without a process start-up (~1 s of imports) each:
    its ``main`` in a thread (it blocks on HTTP while this loop serves the instance), with the
    same environment, stdout and stderr. ``test_keys`` runs the real process."""
    out, err = io.StringIO(), io.StringIO()

    def main() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return cli.main(list(argv))

    with mock.patch.dict(os.environ, _env(control, key)):
        code = await asyncio.to_thread(main)
    return code, out.getvalue(), err.getvalue()


@sqlite_only
async def test_keys(control: Control) -> None:
    code, out, err = await run_process(
        control,
        "keys",
        "create",
        "--name",
        "ci",
        "--rpm",
        "5",
        "--models",
        "gpt-test,gpt-other",
        "--metadata",
        '{"env": "ci"}',
        "--json",
    )
    assert code == 0, err
    created = json.loads(out)
    assert created["key"].startswith("sk-") and created["models"] == ["gpt-test", "gpt-other"]
    await chat(control.server, created["key"])
    code, out, _ = await run(control, "keys", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "NAME", "KEY_PREFIX"]
    assert created["id"] in out and created["key"] not in out
    code, out, _ = await run(control, "keys", "update", created["id"], "--tpm", "900", "--disable")
    assert code == 0 and any(line.split() == ["disabled", "True"] for line in out.splitlines())
    shown = json.loads((await run(control, "keys", "show", created["id"], "--json"))[1])
    assert shown["tpm"] == 900 and shown["disabled"] is True and "key" not in shown
    code, out, _ = await run(control, "keys", "revoke", created["id"])
    assert code == 0
    code, _, err = await run(control, "keys", "show", created["id"])
    assert code == 1 and "404" in err


@sqlite_only
async def test_teams_and_spend(control: Control) -> None:
    code, out, err = await run(
        control, "teams", "create", "--name", "research", "--tpm", "1000", "--json"
    )
    assert code == 0, err
    team = json.loads(out)
    key = json.loads(
        (await run(control, "keys", "create", "--name", "r1", "--team", team["id"], "--json"))[1]
    )
    await chat(control.server, key["key"])
    code, out, _ = await run(control, "teams", "list")
    assert code == 0 and "research" in out
    code, out, _ = await run(control, "spend", "summary", "--group-by", "team", "--json")
    assert code == 0 and json.loads(out)["data"][0]["group"] == team["id"]
    code, out, _ = await run(control, "spend", "requests", "--key", key["id"])
    assert code == 0 and len(out.splitlines()) == 2 and "gpt-test" in out
    code, _, err = await run(control, "teams", "delete", team["id"])
    assert code == 1 and "409" in err  # it still has a key


@sqlite_only
async def test_refusals_are_told(control: Control) -> None:
    code, _, err = await run(control, "keys", "list", key="sk-wrong")
    assert code == 1 and "401" in err
    code, _, err = await run(control, "keys", "create", "--name", "x", "--budget-duration", "1w")
    assert code == 1 and "budget_duration" in err
    code, _, err = await run(control, "keys", "list", "--url", "http://127.0.0.1:1")
    assert code == 1 and "cannot reach" in err


def test_tables_line_up() -> None:
    from aioproxy.control.cli import table

    text = table([{"a": 1, "b": None}, {"a": 22.5, "b": ["x", "y"]}], ("a", "b"))
    assert text.splitlines() == ["A     B", "1     -", "22.5  x,y"]


@sqlite_only
async def test_update_sets_fields_back_to_null(control: Control) -> None:
    """A limit, a team, an expiry or a model list once set can be removed from the shell, as
    the API's PATCH with null does (the options alone could only change them)."""
    team = (await control.admin("POST", "/admin/teams", {"name": "t", "rpm": 5}, status=201))["id"]
    created = await control.new_key(
        team=team, rpm=5, models=["gpt-test"], expires_at="2100-01-01T00:00:00Z"
    )
    argv = ["keys", "update", created["id"], "--tpm", "9", "--json"]
    for name in ("rpm", "team", "models", "expires_at"):
        argv += ["--unset", name]
    code, out, err = await run(control, *argv)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["tpm"] == 9
    assert [shown[name] for name in ("rpm", "team", "models", "expires_at")] == [None] * 4
    code, out, err = await run(control, "teams", "update", team, "--unset", "rpm", "--json")
    assert code == 0 and json.loads(out)["rpm"] is None, err
    code, _, err = await run(
        control, "keys", "update", created["id"], "--rpm", "1", "--unset", "rpm"
    )
    assert code == 1 and "choose one" in err
    code, out, _ = await run(control, "spend", "requests", "--team", team, "--json")
    assert code == 0 and json.loads(out)["data"] == []


@sqlite_only
async def test_an_address_that_is_no_aioproxy_is_told(
    control: Control, aiohttp_server: Any
) -> None:
    """A 200 that is not JSON (a web page, a login proxy) was a traceback."""

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>sign in</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/{tail:.*}", page)
    server = await aiohttp_server(app)
    code, out, err = await run(control, "keys", "list", "--url", str(server.make_url("/")))
    assert code == 1 and "did not answer JSON" in err and not out
