"""The dashboard's security, over plain HTTP: sessions, CSRF, who may sign in, the headers,
and that no page shows a secret."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from aioproxy import create_app
from aioproxy.config import parse_config
from aioproxy.testing import assert_openai_error
from aioproxy.ui.pages import PAGES
from aioproxy.ui.session import COOKIE, Sessions, sessions_key
from tests.support import MASTER_KEY, UPSTREAM_KEY, sdk
from tests.ui.conftest import ui_config
from tests.ui.support import csrf_in, sign_in

PAGE_PATHS = ["/ui" + path.replace("{id}", "req_x") for path, _ in PAGES]


@pytest.fixture
async def ui(aiohttp_client: Any, ui_server: TestServer) -> TestClient:
    """A plain HTTP client of the dashboard that does not follow redirects."""
    client: TestClient = await aiohttp_client(ui_server)
    return client


async def _create_key(ui: TestClient, csrf: str, **fields: Any) -> dict[str, Any]:
    response = await ui.post(
        "/ui/api/keys", json={"name": "k", **fields}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status == 201, await response.text()
    return dict(await response.json())


@pytest.mark.parametrize("path", PAGE_PATHS)
async def test_pages_without_a_session_redirect_to_sign_in(ui: TestClient, path: str) -> None:
    response = await ui.get(path, allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"].startswith("/ui/signin?next=")


async def test_calls_without_a_session_are_refused(ui: TestClient) -> None:
    response = await ui.post("/ui/api/keys", json={"name": "x"})
    await assert_openai_error(response, 401, "not_signed_in")


async def test_a_call_without_the_csrf_token_is_refused(ui: TestClient) -> None:
    csrf = await sign_in(ui, MASTER_KEY)
    for headers in ({}, {"X-CSRF-Token": "0" * 64}):
        response = await ui.post("/ui/api/keys", json={"name": "x"}, headers=headers)
        await assert_openai_error(response, 403, "csrf_failed")
        response = await ui.post(
            "/ui/api/chat", json={"model": "echo", "messages": []}, headers=headers
        )
        await assert_openai_error(response, 403, "csrf_failed")
    assert ui.server.app[sessions_key] and (await _create_key(ui, csrf))["name"] == "k"
    keys = (await (await ui.get("/admin/keys", headers=_master())).json())["data"]
    assert [key["name"] for key in keys] == ["k"]  # only the call with the token made one


async def test_sign_in_without_its_csrf_token_is_refused(ui: TestClient) -> None:
    await ui.get("/ui/signin")  # the nonce cookie, but not the form's token
    response = await ui.post("/ui/signin", json={"key": MASTER_KEY})
    await assert_openai_error(response, 403, "csrf_failed")
    assert COOKIE not in {cookie.key for cookie in ui.session.cookie_jar}


def _master() -> dict[str, str]:
    return {"Authorization": f"Bearer {MASTER_KEY}"}


async def _try_sign_in(ui: TestClient, key: str) -> aiohttp.ClientResponse:
    token = csrf_in(await (await ui.get("/ui/signin")).text())
    return await ui.post("/ui/signin", json={"key": key}, headers={"X-CSRF-Token": token})


async def test_only_the_master_key_and_admin_keys_sign_in(
    ui: TestClient, aiohttp_client: Any
) -> None:
    csrf = await sign_in(ui, MASTER_KEY)
    user = (await _create_key(ui, csrf, name="user"))["key"]
    admin = (await _create_key(ui, csrf, name="ops", role="admin"))["key"]
    other: TestClient = await aiohttp_client(ui.server)
    for refused in (user, "sk-not-a-key", UPSTREAM_KEY, ""):
        await assert_openai_error(await _try_sign_in(other, refused), 401, "invalid_api_key")
    assert (await _try_sign_in(other, admin)).status == 200
    assert (await other.get("/ui/keys", allow_redirects=False)).status == 200


async def test_a_disabled_admin_key_loses_its_session(ui: TestClient, aiohttp_client: Any) -> None:
    csrf = await sign_in(ui, MASTER_KEY)
    admin = await _create_key(ui, csrf, name="ops", role="admin")
    other: TestClient = await aiohttp_client(ui.server)
    await sign_in(other, admin["key"])
    response = await ui.patch(
        f"/ui/api/keys/{admin['id']}", json={"disabled": True}, headers={"X-CSRF-Token": csrf}
    )
    assert response.status == 200
    assert (await other.get("/ui/keys", allow_redirects=False)).status == 302


async def test_sessions_expire(ui: TestClient) -> None:
    sessions = ui.server.app[sessions_key]
    now = [1_900_000_000.0]
    sessions.now = lambda: now[0]
    await sign_in(ui, MASTER_KEY)
    now[0] += sessions.ttl - 5
    assert (await ui.get("/ui/keys", allow_redirects=False)).status == 200
    now[0] += 10
    assert (await ui.get("/ui/keys", allow_redirects=False)).status == 302


async def test_the_session_cookie_is_http_only_strict_and_expiring(ui: TestClient) -> None:
    token = csrf_in(await (await ui.get("/ui/signin")).text())
    response = await ui.post(
        "/ui/signin", json={"key": MASTER_KEY}, headers={"X-CSRF-Token": token}
    )
    cookie = response.cookies[COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert int(cookie["max-age"]) == 8 * 3600
    assert cookie["path"] == "/ui"
    assert not cookie["secure"]  # plain HTTP here; over TLS, below


def test_the_session_cookie_is_secure_over_tls() -> None:
    sessions = Sessions(parse_config({"auth": {"master_key": MASTER_KEY}}))
    request = make_mocked_request("POST", "/ui/signin").clone(scheme="https")
    response = web.Response()
    sessions.start(response, request, "master")
    assert response.cookies[COOKIE]["secure"] is True


async def test_pages_carry_a_strict_content_security_policy(ui: TestClient) -> None:
    await sign_in(ui, MASTER_KEY)
    for path in [*PAGE_PATHS[:-3], "/ui/signin"]:
        response = await ui.get(path)
        policy = response.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy, path
        assert "unsafe" not in policy and "http" not in policy
        assert response.headers["X-Frame-Options"] == "DENY"
        html = await response.text()
        assert "<script>" not in html and " style=" not in html and "onclick" not in html, path


async def test_no_page_shows_a_secret(ui: TestClient) -> None:
    csrf = await sign_in(ui, MASTER_KEY)
    team = await ui.post("/ui/api/teams", json={"name": "t"}, headers={"X-CSRF-Token": csrf})
    secret = (await _create_key(ui, csrf, name="used", team=(await team.json())["id"]))["key"]
    async with sdk(ui.server, secret) as client:
        await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    rows = (await (await ui.get("/admin/requests", headers=_master())).json())["data"]
    details = f"/ui/requests/{rows[0]['request_id']}"
    for path in [*PAGE_PATHS[:-2], details, "/ui/playground", "/ui/spend?group_by=team"]:
        response = await ui.get(path)
        assert response.status == 200, path
        text = await response.text()
        for hidden in (secret, MASTER_KEY, UPSTREAM_KEY):
            assert hidden not in text, (path, hidden[:5])
        assert secret[7:15] not in text  # not even past the prefix the key list shows


async def test_an_open_gateway_lets_anyone_in_without_a_key(
    aiohttp_client: Any, serve_proxy: Any, upstream_base: str, sqlite_url: str
) -> None:
    """No master key, no keys: the API is open (to loopback names only), and so is the
    dashboard, signed in without a key; a wrong key is still refused."""
    config = ui_config(upstream_base, sqlite_url)
    del config["auth"]
    client: TestClient = await aiohttp_client(await serve_proxy(config))
    page = await (await client.get("/ui/signin")).text()
    assert 'id="open-mode"' in page
    await assert_openai_error(await _try_sign_in(client, "sk-wrong"), 401, "invalid_api_key")
    await sign_in(client, "")
    assert (await client.get("/ui/playground", allow_redirects=False)).status == 200


async def test_off_unless_enabled(serve_proxy: Any, upstream_base: str, sqlite_url: str) -> None:
    config = ui_config(upstream_base, sqlite_url)
    del config["ui"]
    server = await serve_proxy(config)
    async with aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/ui"), allow_redirects=False) as response:
            await assert_openai_error(response, 404, "not_found")


async def test_served_under_a_prefix(
    aiohttp_client: Any, upstream_base: str, sqlite_url: str
) -> None:
    import aioproxy_echo
    import aioproxy_openai

    parent = web.Application()
    child = create_app(
        ui_config(upstream_base, sqlite_url),
        plugins=[aioproxy_openai, aioproxy_echo],
        load_entrypoints=False,
    )
    parent.add_subapp("/llm", child)
    client: TestClient = await aiohttp_client(parent)
    response = await client.get("/llm/ui/models", allow_redirects=False)
    assert response.headers["Location"].startswith("/llm/ui/signin?next=")
    await sign_in(client, MASTER_KEY, prefix="/llm")
    page = await client.get("/llm/ui/models")
    assert page.status == 200
    assert 'href="/llm/ui/static/ui.js"' not in await page.text()  # scripts, not links
    assert 'src="/llm/ui/static/ui.js"' in await page.text()
