"""Database keys looked up in the key cache: a known key costs no digest after its first use,
and a change to it still applies at once."""

from __future__ import annotations

from typing import Any

import pytest

from aioproxy.control import records
from tests.control.conftest import CHAT, Control


async def post_chat(control: Control, key: str) -> int:
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json=CHAT,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        await response.read()
        return response.status


async def test_a_known_key_is_digested_once(
    start_control: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    control = await start_control()
    created = await control.new_key(rpm=100)
    digests: list[str] = []
    real = records.digest_of

    def counting_digest(secret: str) -> str:
        digests.append(secret)
        return real(secret)

    monkeypatch.setattr("aioproxy.control.cache.digest_of", counting_digest)
    for _ in range(3):
        assert await post_chat(control, created["key"]) == 200
    assert len(digests) == 1
    # A change reloads the cache, and with it what was remembered: the key is refused at once.
    await control.admin("PATCH", f"/admin/keys/{created['id']}", {"disabled": True})
    assert await post_chat(control, created["key"]) == 401
    assert await post_chat(control, "sk-not-a-key-" + "x" * 32) == 401
