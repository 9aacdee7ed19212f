"""Response cache hits and the control plane: a hit costs nothing in the spend log (logged
as a hit: provider ``aioproxy-cache``), counts toward the key's rpm and not its tpm."""

from __future__ import annotations

from typing import Any

from tests.control.conftest import CHAT, Control

DETERMINISTIC = {**CHAT, "temperature": 0}


async def post(control: Control, key: str) -> tuple[int, dict[str, str], Any]:
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json=DETERMINISTIC,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, dict(response.headers), await response.json()


async def test_a_hit_is_logged_free(start_control: Any) -> None:
    control = await start_control(cache={"enabled": True})
    created = await control.new_key(rpm=100)
    for expected in ("miss", "hit"):
        status, headers, _ = await post(control, created["key"])
        assert status == 200 and headers["x-aioproxy-cache"] == expected
    await control.settle()
    rows = (await control.admin("GET", f"/admin/requests?key={created['id']}"))["data"]
    by_provider = {row["provider"]: row for row in rows}
    assert set(by_provider) == {"openai", "aioproxy-cache"}
    assert by_provider["openai"]["cost"] > 0
    assert by_provider["aioproxy-cache"]["cost"] == 0
    assert by_provider["aioproxy-cache"]["status"] == 200


async def test_a_hit_counts_toward_rpm_not_tpm(start_control: Any) -> None:
    control = await start_control(cache={"enabled": True})
    key = (await control.new_key(rpm=3, tpm=100_000))["key"]
    _, first, _ = await post(control, key)
    _, second, _ = await post(control, key)
    assert second["x-aioproxy-cache"] == "hit"
    assert second["x-ratelimit-remaining-requests"] == "1"
    _, third, _ = await post(control, key)
    # The hit's reservation was given back: tokens as after the miss alone, less the
    # third's own reservation (the same as the second's).
    reserved = 100_000 - int(first["x-ratelimit-remaining-tokens"])
    assert int(third["x-ratelimit-remaining-tokens"]) == int(second["x-ratelimit-remaining-tokens"])
    assert reserved > 0
    assert (await post(control, key))[0] == 429  # the fourth: hits count toward rpm
