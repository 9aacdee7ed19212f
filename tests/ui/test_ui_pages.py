"""The dashboard's pages over plain HTTP: the CSV export, details, sign-out, and the admin
API's errors as the pages show them."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from aioproxy.testing import assert_openai_error
from aioproxy.ui.site import _usd
from tests.support import MASTER_KEY, sdk
from tests.ui.support import csrf_in, sign_in


async def _signed_in(aiohttp_client: Any, server: TestServer) -> tuple[TestClient, str]:
    client: TestClient = await aiohttp_client(server)
    return client, await sign_in(client, MASTER_KEY)


async def test_spend_exports_csv(aiohttp_client: Any, ui_server: TestServer) -> None:
    ui, csrf = await _signed_in(aiohttp_client, ui_server)
    created = await ui.post(
        "/ui/api/keys", json={"name": "=HYPERLINK(1)"}, headers={"X-CSRF-Token": csrf}
    )
    secret = (await created.json())["key"]
    async with sdk(ui_server, secret) as client:
        await client.chat.completions.create(
            model="gpt-test", messages=[{"role": "user", "content": "hi"}]
        )
    response = await ui.get("/ui/spend.csv?group_by=key")
    assert response.content_type == "text/csv"
    assert "attachment" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(await response.text())))
    assert rows[0] == ["key", "name", "requests", "input_tokens", "output_tokens", "cost"]
    assert rows[1][1] == "'=HYPERLINK(1)"  # a spreadsheet shows it, never runs it
    assert rows[1][2] == "1" and float(rows[1][5]) > 0
    page = await (await ui.get("/ui/spend?group_by=key")).text()
    assert "/ui/spend.csv?group_by=key" in page


async def test_unknown_request_details_are_404(aiohttp_client: Any, ui_server: TestServer) -> None:
    ui, _ = await _signed_in(aiohttp_client, ui_server)
    await assert_openai_error(await ui.get("/ui/requests/req_none"), 404, "request_not_found")


async def test_bad_filters_show_the_admin_api_error(
    aiohttp_client: Any, ui_server: TestServer
) -> None:
    ui, _ = await _signed_in(aiohttp_client, ui_server)
    page = await ui.get("/ui/requests?status=abc")
    assert page.status == 200
    assert "&#39;status&#39; must be a whole number" in await page.text()
    page = await ui.get("/ui/spend?start=yesterday")
    assert "&#39;start&#39; must be a date" in await page.text()


async def test_a_bad_key_field_answers_the_admin_api_error(
    aiohttp_client: Any, ui_server: TestServer
) -> None:
    ui, csrf = await _signed_in(aiohttp_client, ui_server)
    response = await ui.post(
        "/ui/api/keys", json={"name": "x", "rpm": -1}, headers={"X-CSRF-Token": csrf}
    )
    body = await assert_openai_error(response, 400, "invalid_value")
    assert body["param"] == "rpm"


async def test_sign_out_ends_the_session(aiohttp_client: Any, ui_server: TestServer) -> None:
    ui, csrf = await _signed_in(aiohttp_client, ui_server)
    response = await ui.post("/ui/signout", json={}, headers={"X-CSRF-Token": csrf})
    assert (await response.json())["redirect"] == "/ui/signin"
    assert (await ui.get("/ui/keys", allow_redirects=False)).status == 302


async def test_sign_in_goes_back_to_the_page_asked_for_only(
    aiohttp_client: Any, ui_server: TestServer
) -> None:
    ui: TestClient = await aiohttp_client(ui_server)
    for asked, landed in (
        ("/ui/spend?group_by=model", "/ui/spend?group_by=model"),
        ("https://evil.example/ui", "/ui"),
        ("//evil.example/ui", "/ui"),
    ):
        ui.session.cookie_jar.clear()
        page = await ui.get("/ui/signin")
        token = csrf_in(await page.text())
        response = await ui.post(
            "/ui/signin", json={"key": MASTER_KEY, "next": asked}, headers={"X-CSRF-Token": token}
        )
        assert (await response.json())["redirect"] == landed


@pytest.mark.parametrize(
    "value, shown",
    [(None, "–"), (0.0, "$0"), (1e-07, "$0.0000001"), (6.4e-05, "$0.000064"),
     (0.25, "$0.25"), (1234.5, "$1,234.50")],
)  # fmt: skip
def test_amounts_show_their_first_digits(value: float | None, shown: str) -> None:
    assert _usd(value) == shown
