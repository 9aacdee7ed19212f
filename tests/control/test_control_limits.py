"""Enforcement, end to end with the official SDK, on SQLite and PostgreSQL: rpm, tpm,
max_parallel, budgets and their periods, expiry, team limits and model access."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import openai
import pytest

from aioproxy import hookimpl
from aioproxy.context import Call
from tests.control.conftest import CHAT, PRICE, Control, FakeControlClock, chat, metric_counts
from tests.redis_server import redis_server, redis_url
from tests.support import MASTER_KEY, sdk

__all__ = ["redis_server", "redis_url"]  # the fixtures, for the Redis-counted case


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


async def post_chat(
    control: Control, key: str, **overrides: Any
) -> tuple[int, dict[str, str], Any]:
    async with control.session.post(
        control.url("/v1/chat/completions"),
        json={**CHAT, **overrides},
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        return response.status, dict(response.headers), await response.json()


async def test_rpm_refuses_then_resets(control: Control, clock: FakeControlClock) -> None:
    key = (await control.new_key(rpm=3))["key"]
    for remaining in (2, 1, 0):
        status, headers, _ = await post_chat(control, key)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-remaining-requests"] == str(remaining)
        assert headers["x-ratelimit-reset-requests"].endswith("s")
    status, headers, body = await post_chat(control, key)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["Retry-After"]) >= 1 and headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError):
        async with sdk(control.server, key) as client:
            await client.chat.completions.create(**CHAT)
    clock.advance(61)
    assert (await post_chat(control, key))[0] == 200


async def test_headers_of_a_counted_request_reset_in_a_minute(
    control: Control, clock: FakeControlClock
) -> None:
    """A request just counted is in both windows: each empties a minute later, whenever in
    the second it came (the reset is known without asking the window)."""
    key = (await control.new_key(rpm=5, tpm=100_000))["key"]
    for step in (0.25, 30.5, 0.0):
        clock.advance(step)
        status, headers, _ = await post_chat(control, key)
        assert status == 200
        assert headers["x-ratelimit-reset-requests"] == "1m0s"
        assert headers["x-ratelimit-reset-tokens"] == "1m0s"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
    clock.advance(45)  # the first request has left the window, the two since have not
    status, headers, _ = await post_chat(control, key, max_tokens=1)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "2"


async def test_rpm_holds_under_concurrency(control: Control) -> None:
    key = (await control.new_key(rpm=20))["key"]
    results = await asyncio.gather(*(post_chat(control, key) for _ in range(100)))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 20 and statuses.count(429) == 80


async def test_tpm_admits_within_one_reservation(control: Control, fake: Any) -> None:
    body = {"max_tokens": 100}
    # reservation = the body's bytes / 4 + max_tokens; find it from the first request's headers
    key = (await control.new_key(tpm=1000))["key"]
    results = await asyncio.gather(*(post_chat(control, key, **body) for _ in range(30)))
    admitted = [r for r in results if r[0] == 200]
    assert 0 < len(admitted) < 30
    assert all(r[2]["error"]["code"] == "rate_limit_exceeded" for r in results if r[0] == 429)
    reservation = 100 + len(str(CHAT)) // 4 + 20
    assert len(admitted) * reservation <= 1000 + reservation
    # reconciled: the real usage replaced the reservations
    used = sum(r[2]["usage"]["total_tokens"] for r in admitted)
    await asyncio.sleep(0)
    assert (
        control.plane.cache.key_meters[next(iter(control.plane.cache.keys))].tokens.total(
            control.plane.clock.monotonic()
        )
        == used
    )


async def test_without_max_tokens_tpm_reserves_the_output_answers_have_had(
    control: Control,
) -> None:
    """A request that caps no output reserves toward tpm its prompt and the key's running
    average of its answers' output tokens (0 before any answer), not the prompt alone."""
    key = (await control.new_key(tpm=100_000))["key"]
    used, average, expected, reserved = 0, 0.0, [], []
    for _ in range(4):
        status, headers, body = await post_chat(control, key)
        assert status == 200
        # Right after admission the window holds the earlier answers' usage and this request's
        # reservation: the prompt's estimate and the output learnt so far.
        reserved.append(100_000 - int(headers["x-ratelimit-remaining-tokens"]) - used)
        expected.append(round(average))
        used += body["usage"]["total_tokens"]
        assert body["usage"]["completion_tokens"] > 0
        average += (body["usage"]["completion_tokens"] - average) * 0.2
    prompt = reserved[0]  # nothing learnt yet: the prompt alone
    assert expected[0] == 0 and expected[3] > 0
    assert reserved == [prompt + output for output in expected]


async def test_a_learnt_output_estimate_never_locks_a_key_out(
    control: Control, clock: FakeControlClock
) -> None:
    """Long answers teach a large output estimate; with a long prompt the two exceed the tpm.
    The estimate is held under what the tpm leaves beside the prompt: a request the empty
    window would take is never refused for it (refused, it would teach nothing, for good)."""
    key = (await control.new_key(tpm=1000))["key"]
    long_prompt = {"messages": [{"role": "user", "content": " ".join(["a"] * 700)}]}
    statuses = []
    for _ in range(15):
        status, _, _ = await post_chat(control, key, **long_prompt)
        statuses.append(status)
        clock.advance(61)  # the window empties every time
    meter = control.plane.cache.key_meters[next(iter(control.plane.cache.keys))]
    assert meter.output > 300  # what was learnt, with the prompt, is over the tpm
    assert statuses == [200] * 15


class Gate:
    """A before_request hook that runs after the limits and holds requests until released."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    @hookimpl(trylast=True)
    async def before_request(self, call: Call) -> None:
        if call.get("user") == "hold":
            self.entered.set()
            await self.release.wait()


async def test_max_parallel(start_control: Any) -> None:
    gate = Gate()
    control = await start_control(plugins=(gate,))
    key = (await control.new_key(max_parallel=1))["key"]
    held = asyncio.create_task(post_chat(control, key, user="hold"))
    await gate.entered.wait()
    status, headers, body = await post_chat(control, key)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert headers["Retry-After"] == "1"
    gate.release.set()
    assert (await held)[0] == 200
    assert (await post_chat(control, key))[0] == 200  # the slot came back


async def test_a_cancelled_request_frees_its_slot(start_control: Any) -> None:
    gate = Gate()
    control = await start_control(plugins=(gate,))
    key = (await control.new_key(max_parallel=1))["key"]
    held = asyncio.create_task(post_chat(control, key, user="hold"))
    await gate.entered.wait()
    held.cancel()  # the client goes away while the request is in flight
    meter = next(iter(control.plane.cache.key_meters.values()))
    async with asyncio.timeout(30):  # safety net: the server notices the disconnect
        while meter.in_flight:
            await asyncio.sleep(0.01)
    assert (await post_chat(control, key))[0] == 200


async def test_a_team_key_s_cancelled_request_frees_its_slot_and_its_team_s(
    start_control: Any,
) -> None:
    """A key in a team reserves in both scopes (``Reservation``, not the one-scope
    ``SoloReservation`` of a key with no team): both slots come back when its client goes."""
    gate = Gate()
    control = await start_control(plugins=(gate,))
    team = await control.admin("POST", "/admin/teams", {"name": "t", "max_parallel": 1}, status=201)
    key = (await control.new_key(team=team["id"], max_parallel=1))["key"]
    held = asyncio.create_task(post_chat(control, key, user="hold"))
    await gate.entered.wait()
    assert (await post_chat(control, key))[0] == 429
    held.cancel()
    cache = control.plane.cache
    meters = [*cache.key_meters.values(), *cache.team_meters.values()]
    async with asyncio.timeout(30):  # safety net: the server notices the disconnect
        while any(meter.in_flight for meter in meters):
            await asyncio.sleep(0.01)
    assert (await post_chat(control, key))[0] == 200


async def test_budget_is_refused_then_resets(control: Control, clock: FakeControlClock) -> None:
    created = await control.new_key(max_budget=0.000001, budget_duration="1h")
    key = created["key"]
    reply = await chat(control.server, key)
    cost = (
        reply.usage.prompt_tokens * PRICE["input"] + reply.usage.completion_tokens * PRICE["output"]
    ) / 1e6
    assert cost > 0.000001
    status, _, body = await post_chat(control, key)
    assert status == 429 and body["error"]["code"] == "insufficient_quota"
    with pytest.raises(openai.RateLimitError) as refused:
        await chat(control.server, key)
    assert refused.value.code == "insufficient_quota"
    await control.settle()
    shown = await control.admin("GET", f"/admin/keys/{created['id']}")
    assert shown["spend"] == pytest.approx(cost) and shown["total_spend"] == pytest.approx(cost)
    clock.advance(3600)  # a new period
    shown = await control.admin("GET", f"/admin/keys/{created['id']}")
    assert shown["spend"] == 0 and shown["total_spend"] == pytest.approx(cost)
    assert (await post_chat(control, key))[0] == 200


async def test_editing_a_budget_never_frees_it(control: Control, clock: FakeControlClock) -> None:
    """The dashboard's edit form sends every limit: the same period again used to restart it
    at a spend of 0, so any edit (an rpm) let a spent key spend its budget again."""
    start = clock.now
    created = await control.new_key(max_budget=0.000001, budget_duration="1h")
    path, key = f"/admin/keys/{created['id']}", created["key"]
    await chat(control.server, key)
    assert (await post_chat(control, key))[0] == 429
    await control.settle()  # the spend written, as a second after it is
    await control.admin(
        "PATCH", path, {"rpm": 100, "max_budget": 0.000001, "budget_duration": "1h"}
    )
    assert (await post_chat(control, key))[0] == 429
    # a new period length: the period holding now, with what was spent so far in it
    shown = await control.admin("PATCH", path, {"budget_duration": "1d"})
    assert shown["spend"] > 0.000001 and shown["budget_resets_at"] == rfc3339(start + 86400)
    assert (await post_chat(control, key))[0] == 429
    clock.advance(86400)
    assert (await post_chat(control, key))[0] == 200
    # no period: one for ever, whose spend is all that was spent
    shown = await control.admin("PATCH", path, {"budget_duration": None})
    assert shown["spend"] == pytest.approx(shown["total_spend"]) and shown["spend"] > 0
    assert shown["budget_resets_at"] is None
    assert (await post_chat(control, key))[0] == 429


async def test_budget_without_period_stays_spent(control: Control, clock: FakeControlClock) -> None:
    key = (await control.new_key(max_budget=0.000001))["key"]
    await chat(control.server, key)
    clock.advance(400 * 86400)
    assert (await post_chat(control, key))[2]["error"]["code"] == "insufficient_quota"


async def test_raising_the_budget_admits_again(control: Control) -> None:
    created = await control.new_key(max_budget=0.000001)
    await chat(control.server, created["key"])
    assert (await post_chat(control, created["key"]))[0] == 429
    await control.admin("PATCH", f"/admin/keys/{created['id']}", {"max_budget": 10})
    assert (await post_chat(control, created["key"]))[0] == 200


async def test_expiry(control: Control, clock: FakeControlClock) -> None:
    key = (await control.new_key(expires_at=rfc3339(clock.now + 60)))["key"]
    await chat(control.server, key)
    clock.advance(60)
    with pytest.raises(openai.AuthenticationError) as refused:
        await chat(control.server, key)
    assert refused.value.status_code == 401 and refused.value.code == "key_expired"


async def test_team_limits_and_models(control: Control, clock: FakeControlClock) -> None:
    team = await control.admin(
        "POST", "/admin/teams", {"name": "t", "rpm": 3, "models": ["gpt-test", "embed"]}, status=201
    )
    first = (await control.new_key(team=team["id"], models=["gpt-test", "gpt-other"]))["key"]
    second = (await control.new_key(team=team["id"], rpm=100))["key"]
    assert (await post_chat(control, first))[0] == 200
    assert (await post_chat(control, second))[0] == 200
    status, headers, _ = await post_chat(control, second)
    assert status == 200 and headers["x-ratelimit-remaining-requests"] == "0"  # the team's
    status, _, body = await post_chat(control, first)
    assert status == 429 and "team" in body["error"]["message"]
    # models: the key allows gpt-other, the team does not; the team allows embed, the key not
    for model in ("gpt-other", "embed"):
        status, _, body = await post_chat(control, first, model=model)  # the team's rpm first
        assert status == 429 and "team" in body["error"]["message"]
    clock.advance(61)
    for model in ("gpt-other", "embed"):
        status, _, body = await post_chat(control, first, model=model)
        assert status == 403 and body["error"]["param"] == "model"


async def test_team_budget_is_shared_then_resets(control: Control, clock: FakeControlClock) -> None:
    """What one key of a team spends counts toward the team's budget: the team's other key,
    with no budget of its own, is refused too; the team's next period admits both again."""
    team = await control.admin(
        "POST",
        "/admin/teams",
        {"name": "t", "max_budget": 0.000001, "budget_duration": "1d"},
        status=201,
    )
    spender = (await control.new_key(team=team["id"]))["key"]
    other = (await control.new_key(team=team["id"]))["key"]
    assert (await post_chat(control, spender))[0] == 200
    for key in (other, spender):
        status, headers, body = await post_chat(control, key)
        assert status == 429 and body["error"]["code"] == "insufficient_quota"
        assert "team" in body["error"]["message"] and int(headers["Retry-After"]) > 0
    await control.settle()
    shown = await control.admin("GET", f"/admin/teams/{team['id']}")
    assert shown["spend"] > 0.000001 and shown["total_spend"] == shown["spend"]
    clock.advance(86400)
    assert (await control.admin("GET", f"/admin/teams/{team['id']}"))["spend"] == 0
    assert (await post_chat(control, other))[0] == 200


async def test_fallbacks_stay_within_model_access(start_control: Any, fake: Any) -> None:
    control = await start_control(
        router={"fallbacks": {"gpt-test": ["gpt-other"]}, "num_retries": 0}
    )
    key = (await control.new_key(models=["gpt-test"]))["key"]
    fake.faults = ["status:500"]
    status, _, _ = await post_chat(control, key)
    assert status >= 500
    assert [r.body["model"] for r in fake.requests] == ["gpt-4o-mini"]  # no fallback call
    open_key = (await control.new_key())["key"]
    fake.faults = ["status:500"]
    assert (await post_chat(control, open_key))[0] == 200  # gpt-other served it


async def test_headers_on_streams(control: Control) -> None:
    key = (await control.new_key(rpm=5, tpm=100000))["key"]
    async with sdk(control.server, key) as client:
        raw = await client.chat.completions.with_raw_response.create(**CHAT, stream=True)
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-limit-tokens"] == "100000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100000
        async for _ in raw.parse():
            pass


async def test_every_response_to_a_limited_key_carries_its_headers(
    control: Control, clock: FakeControlClock
) -> None:
    """Responses the limits did not count (the model list) carry the key's headers too, its
    windows as they are: the request itself not in them. A 400 for the body and a 404 for the
    model count one request each (``test_control_body_rpm``, ``test_control_refusals``), and
    their headers say so."""
    key = (await control.new_key(rpm=3, tpm=100_000))["key"]
    status, counted, body = await post_chat(control, key)
    assert status == 200 and counted["x-ratelimit-remaining-requests"] == "2"
    left = str(100_000 - body["usage"]["total_tokens"])  # its usage in place of its reservation
    clock.advance(1.5)
    auth = {"Authorization": f"Bearer {key}"}
    calls = [
        ("GET", "/v1/models", None, 200, "2"),
        ("POST", "/v1/chat/completions", {"model": CHAT["model"], "messages": "hi"}, 400, "1"),
        ("POST", "/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404, "0"),
    ]
    for method, path, body, expected, remaining in calls:
        async with control.session.request(
            method, control.url(path), json=body, headers=auth
        ) as response:
            assert response.status == expected, (path, await response.text())
            headers = response.headers
            assert headers["x-ratelimit-limit-requests"] == "3"
            assert headers["x-ratelimit-remaining-requests"] == remaining
            assert headers["x-ratelimit-limit-tokens"] == "100000"
            assert headers["x-ratelimit-remaining-tokens"] == left
            assert headers["x-ratelimit-reset-requests"].endswith("s")
    async with control.session.get(
        control.url("/v1/models"), headers={"Authorization": f"Bearer {MASTER_KEY}"}
    ) as response:
        assert not any(name.lower().startswith("x-ratelimit") for name in response.headers)


async def test_unlimited_keys_get_no_headers(control: Control) -> None:
    key = (await control.new_key())["key"]
    _, headers, _ = await post_chat(control, key)
    assert not any(name.lower().startswith("x-ratelimit") for name in headers)


async def test_the_limits_plugin_can_be_replaced(start_control: Any) -> None:
    """Enforcement is an ordinary plugin: disabled, a key's rpm is not held (spend still is)."""
    control = await start_control(plugins_config={"disable": ["limits"]})
    created = await control.new_key(rpm=1)
    for _ in range(3):
        status, headers, _ = await post_chat(control, created["key"])
        # nothing counts its windows: no figures claimed for them
        assert status == 200 and not any(name.startswith("x-ratelimit") for name in headers)
    await control.settle()
    assert (await control.admin("GET", f"/admin/keys/{created['id']}"))["spend"] > 0


@pytest.mark.parametrize("counted_in", ["process", "redis"])
async def test_refusals_are_counted_under_their_scope(
    start_control: Any, request: pytest.FixtureRequest, counted_in: str
) -> None:
    """aioproxy_rate_limited_total{scope}: a key's rate limit under "key", its team's under
    "team", a spent budget under "budget" (not all under the router's "deployment"), whether
    the limits are counted by this process or in Redis."""
    state = {"redis_url": request.getfixturevalue("redis_url")} if counted_in == "redis" else {}
    control = await start_control(metrics={"enabled": True}, state=state)
    team = await control.admin("POST", "/admin/teams", {"name": "t", "rpm": 1}, status=201)
    by_key = (await control.new_key(rpm=1))["key"]
    by_team = (await control.new_key(team=team["id"]))["key"]
    by_budget = (await control.new_key(max_budget=0.000001))["key"]
    for key in (by_key, by_team, by_budget):
        assert (await post_chat(control, key))[0] == 200
        assert (await post_chat(control, key))[0] == 429
    counted = await metric_counts(control, "aioproxy_rate_limited_total", "scope")
    assert counted == {"key": 1, "team": 1, "budget": 1}


async def test_a_request_whose_client_left_is_logged_and_gives_its_tokens_back(
    start_control: Any,
) -> None:
    """A client gone before its answer (the handler cancelled) reaches on_error as
    ClientDisconnected: its request log row says so (499, client_disconnected) and the tokens
    it had reserved leave its key's tpm window; nothing is lost."""
    gate = Gate()
    control = await start_control(plugins=(gate,))
    created = await control.new_key(tpm=100_000)
    held = asyncio.create_task(post_chat(control, created["key"], user="hold", max_tokens=500))
    await gate.entered.wait()
    meter = control.plane.cache.key_meters[created["id"]]
    assert meter.tokens.count >= 500  # reserved
    held.cancel()
    async with asyncio.timeout(30):  # safety net: the server notices the disconnect
        while meter.in_flight:
            await asyncio.sleep(0.01)
    assert meter.tokens.count == 0
    await control.settle()
    (row,) = (await control.admin("GET", f"/admin/requests?key={created['id']}"))["data"]
    assert row["status"] == 499 and row["error_code"] == "client_disconnected"
