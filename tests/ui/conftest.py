"""Fixtures for the dashboard: a proxy with the control plane and ``[ui] enabled`` in front of
the fake upstream, and headless Chromium (Debian's, driven by Playwright: nothing downloaded)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from tests.control.conftest import control_config
from tests.support import ROOT, ServeProxy, free_port

ARTIFACTS = ROOT / "tests" / "artifacts" / "ui"  # screenshots (gitignored)
UNREACHABLE_MODEL = "flaky"


def ui_config(api_base: str, database_url: str, **overrides: Any) -> dict[str, Any]:
    """The control plane's test config with the dashboard on, and a model whose only
    deployment is unreachable and cools down at its first failure."""
    config = control_config(api_base, database_url, ui={"enabled": True}, **overrides)
    config["models"].append(
        {
            "name": UNREACHABLE_MODEL,
            "provider": "openai",
            "api_base": f"http://127.0.0.1:{free_port()}/v1",
            "api_key": "sk-upstream-secret",
        }
    )
    config["router"] = {
        "cooldown_failures": 1,
        "cooldown_seconds": 600,
        "models": {UNREACHABLE_MODEL: {"num_retries": 0}},
    }
    return config


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ui.sqlite3'}"


@pytest.fixture
async def ui_server(serve_proxy: ServeProxy, upstream_base: str, sqlite_url: str) -> TestServer:
    return await serve_proxy(ui_config(upstream_base, sqlite_url))


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed: `make test` installs it (Debian's chromium)")
    return found


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium page; its console errors fail the test."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"]
        )
        context = await chromium.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            yield page
        finally:
            await chromium.close()
        assert not errors, errors


async def screenshot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


# The control plane's database fixtures (SQLite, and a throwaway PostgreSQL cluster), so the
# dashboard's own queries run on both as the control plane's do.
from tests.control.conftest import clock, db_url, postgres_port  # noqa: F401
