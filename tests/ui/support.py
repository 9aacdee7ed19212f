"""Signing in to the dashboard from a plain HTTP client (tests and bench/ui_pages.py)."""

from __future__ import annotations

import re

from aiohttp.test_utils import TestClient

_CSRF = re.compile(r'name="(?:csrf|csrf-token)" (?:value|content)="([0-9a-f]+)"')


def csrf_in(html: str) -> str:
    """The CSRF token a page carries (the sign-in form's, or the session's meta tag)."""
    match = _CSRF.search(html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


async def sign_in(client: TestClient, key: str, prefix: str = "") -> str:
    """Sign ``client`` in (its cookie jar keeps the session); the session's CSRF token."""
    page = await client.get(f"{prefix}/ui/signin")
    token = csrf_in(await page.text())
    answer = await client.post(
        f"{prefix}/ui/signin", json={"key": key}, headers={"X-CSRF-Token": token}
    )
    assert answer.status == 200, await answer.text()
    home = await client.get(f"{prefix}/ui/keys")
    assert home.status == 200
    return csrf_in(await home.text())
