"""The dashboard in a real browser (headless Chromium), end to end with the official SDK: the
scenario of issue 17, with a screenshot of each page saved under tests/artifacts/ui/."""

from __future__ import annotations

import re
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestServer
from playwright.async_api import expect

from tests.support import MASTER_KEY, sdk
from tests.ui.conftest import UNREACHABLE_MODEL, screenshot

pytestmark = pytest.mark.xdist_group("browser")

MESSAGE = [{"role": "user", "content": "hello from the sdk"}]


async def _sign_in(page: Any, base: str, key: str) -> None:
    await page.goto(f"{base}/ui/keys")
    await expect(page).to_have_url(re.compile(r"/ui/signin\?next="))
    await page.fill("input[name=key]", key)
    await page.click("form button[type=submit]")
    await expect(page).to_have_url(f"{base}/ui/keys")


async def test_operator_scenario(ui_server: TestServer, browser: Any) -> None:
    page, base = browser, str(ui_server.make_url("")).rstrip("/")
    await _sign_in(page, base, MASTER_KEY)

    # Create a key and read its secret from the page, shown once.
    await page.fill("#new-key input[name=name]", "alice")
    await page.click("#new-key button[type=submit]")
    await expect(page.locator("#secret")).to_be_visible()
    secret = (await page.text_content("#secret-value") or "").strip()
    assert secret.startswith("sk-") and len(secret) >= 35
    await screenshot(page, "keys-new-secret")

    # Use it from the official SDK.
    async with sdk(ui_server, secret) as client:
        answer = await client.chat.completions.create(model="gpt-test", messages=MESSAGE)
    assert answer.choices[0].message.content

    # The request and its cost appear in Requests, and its details open.
    await page.goto(f"{base}/ui/requests")
    row = page.locator("#requests tbody tr", has_text="alice")
    await expect(row).to_have_count(1)
    await expect(row.locator("td.cost")).to_have_text(re.compile(r"^\$0\.0\d*[1-9]"))
    await screenshot(page, "requests")
    await row.locator("a").click()
    await expect(page.locator("dl.details")).to_contain_text("gpt-test")
    await expect(page.locator("h1")).to_contain_text("Request req_")
    await screenshot(page, "request-details")

    # ... and in Spend, grouped by key.
    await page.goto(f"{base}/ui/spend?group_by=key")
    spend_row = page.locator("#spend tbody tr", has_text="alice")
    await expect(spend_row).to_contain_text("$0.0")
    await expect(page.locator("#spend-chart canvas")).to_have_count(1)
    await screenshot(page, "spend")

    # A budget below its spend: the SDK is refused.
    await page.goto(f"{base}/ui/keys")
    key_row = page.locator('#keys tr[data-key-name="alice"]')
    await key_row.locator("summary").click()
    await key_row.locator("input[name=max_budget]").fill("0.0000001")
    await key_row.locator("details button[type=submit]").click()
    await expect(key_row.locator("meter")).to_have_count(1)
    await screenshot(page, "keys-over-budget")
    async with sdk(ui_server, secret) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="gpt-test", messages=MESSAGE)
    assert refused.value.code == "insufficient_quota"

    # Revoked: the SDK gets 401.
    page.once("dialog", lambda dialog: dialog.accept())
    await key_row.locator("button.danger").click()
    await expect(page.locator('#keys tr[data-key-name="alice"]')).to_have_count(0)
    async with sdk(ui_server, secret) as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gpt-test", messages=MESSAGE)


async def test_playground_streams_an_echo_answer(ui_server: TestServer, browser: Any) -> None:
    page, base = browser, str(ui_server.make_url("")).rstrip("/")
    await _sign_in(page, base, MASTER_KEY)
    await page.goto(f"{base}/ui/playground")
    await page.select_option("select[name=model]", "echo")
    await page.fill("textarea[name=message]", "streamed word by word")
    await page.click("#playground button[type=submit]")
    await expect(page.locator('#answer[data-done="true"]')).to_have_count(1)
    await expect(page.locator("#answer")).to_have_text("streamed word by word")
    await screenshot(page, "playground")


async def test_a_cooling_deployment_shows_on_models(ui_server: TestServer, browser: Any) -> None:
    async with sdk(ui_server) as client:
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model=UNREACHABLE_MODEL, messages=MESSAGE)
    page, base = browser, str(ui_server.make_url("")).rstrip("/")
    await _sign_in(page, base, MASTER_KEY)
    await page.goto(f"{base}/ui/models")
    flaky = page.locator("section", has=page.locator(f"h2:text-is('{UNREACHABLE_MODEL}')"))
    await expect(flaky.locator("td.state")).to_contain_text("cooling down until")
    echo = page.locator("section", has=page.locator("h2:text-is('echo')"))
    await expect(echo.locator("td.state")).to_have_text("available")
    await screenshot(page, "models")


async def test_overview_charts_the_traffic(ui_server: TestServer, browser: Any) -> None:
    async with sdk(ui_server) as client:
        for _ in range(3):
            await client.chat.completions.create(model="echo", messages=MESSAGE)
    page, base = browser, str(ui_server.make_url("")).rstrip("/")
    await _sign_in(page, base, MASTER_KEY)
    for name in ("1h", "24h", "30d"):
        await page.goto(f"{base}/ui?range={name}")
        await expect(page.locator("#total-requests")).to_have_text("3")
        await expect(page.locator(".chart canvas")).to_have_count(5)
    await screenshot(page, "overview")
