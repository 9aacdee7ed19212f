"""aioproxy.dispatch on a fake clock: retries and backoff, fallbacks and the ``allows`` check, panic
mode, ``before_request`` re-routes, admission, and the lease released exactly once on every path
(cancellation included). The provider is a scripted method; nothing waits on the wall clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request

from aioproxy.config import parse_config
from aioproxy.context import Call, Deployment, Principal
from aioproxy.deployments import deployments_from
from aioproxy.dispatch import Answer, Dispatcher, Lease, Plan, tokens_spent
from aioproxy.errors import BadRequest, ModelNotFound, PermissionDenied, ProxyError, RateLimited
from aioproxy.hookspecs import hookimpl
from aioproxy.outcome import Outcome
from aioproxy.payloads import decode_request
from aioproxy.plugins import Hooks, make_plugin_manager
from aioproxy.providers import JSONReply, Reply, StreamReply
from aioproxy.registry import Registry
from aioproxy.router import Router
from aioproxy.routes import Kind
from aioproxy.testing import FakeClock

OK = b'{"ok": true}'


def ok() -> JSONReply:
    """A fresh answer each time: a JSONReply kept alive at module level would count as one a
    request leaked (tests/e2e/test_fault_load.py counts the live ones)."""
    return JSONReply(OK)


def failure(status: int = 503) -> ProxyError:
    return ProxyError(f"upstream {status}", status=status)


class Provider:
    """The provider's chat method: answers (or raises) from a script per upstream model id, and
    records the order of the calls."""

    def __init__(self, **script: list[Reply | BaseException]) -> None:
        self.script = script
        self.calls: list[str] = []
        self.hang = asyncio.Event()  # set while a call hangs on ``hang_on``
        self.hang_on: str | None = None

    async def chat(self, call: Call) -> Reply:
        upstream = call.deployment.model
        self.calls.append(upstream)
        if upstream == self.hang_on:
            self.hang.set()
            await asyncio.Event().wait()  # until cancelled
        outcome = self.script[upstream].pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class Setup:
    """One dispatcher on a fake clock over the config's models, all served by ``provider``."""

    def __init__(
        self,
        provider: Provider,
        models: list[dict[str, Any]],
        plugins: Iterable[object] = (),
        **router: Any,
    ) -> None:
        for entry in models:
            entry.setdefault("provider", "fake")
        self.config = parse_config({"models": models, "router": router})
        self.clock = FakeClock()
        self.router = Router(self.config.router, self.clock)
        self.deployments = deployments_from(self.config)
        registry = Registry({}, self.config, self.deployments)
        registry.serving["fake"] = {Kind.CHAT_COMPLETIONS: provider.chat}
        pm = make_plugin_manager(self.config, plugins, load_entrypoints=False)
        self.dispatcher = Dispatcher(self.router, registry, Hooks(pm), self.config)

    def deployment(self, model: str, number: int = 0) -> Deployment:
        return self.deployments[model][number]

    def in_flight(self) -> dict[str, int]:
        return {
            d.model: self.router.health(d).in_flight for ds in self.deployments.values() for d in ds
        }

    async def answer(self, call: Call) -> Answer:
        plan, lease = await self.dispatcher.plan(call)
        return await self.dispatcher.dispatch(call, plan, lease)


ANYONE = Principal("p")


def make_call(model: str = "m", principal: Principal = ANYONE) -> Call:
    body = b'{"model": "' + model.encode() + b'", "messages": []}'
    fields, model, stream = decode_request(body)
    request = make_mocked_request("POST", "/v1/chat/completions")
    return Call(Kind.CHAT_COMPLETIONS, request, principal, model, fields, stream)


def entry(name: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "model": upstream, **extra}


# -- the lease ------------------------------------------------------------------------------


def test_a_lease_releases_exactly_once() -> None:
    setup = Setup(Provider(), [entry("m", "a", tpm=100)])
    a = setup.deployment("m")
    lease = Lease(setup.router, a)
    assert setup.in_flight() == {"a": 1} and not lease.released
    lease.release(7)
    lease.release(7)  # every later path is a no-op
    lease.release()
    assert setup.in_flight() == {"a": 0} and lease.released
    assert setup.router.health(a).tokens.total(setup.clock.now()) == 7


# -- retries --------------------------------------------------------------------------------


async def test_a_retryable_failure_is_retried_after_a_backoff_on_the_clock() -> None:
    provider = Provider(a=[failure(503), failure(502), ok()])
    setup = Setup(
        provider, [entry("m", "a")], num_retries=2, retry_backoff=1.0, retry_backoff_max=10.0
    )
    answer = await setup.answer(make_call())
    assert isinstance(answer.reply, JSONReply) and answer.reply.body == OK and answer.first is None
    assert provider.calls == ["a", "a", "a"]
    assert len(setup.clock.sleeps) == 2  # jittered: 1 s then 2 s, each times 0.5-1
    assert 0.5 <= setup.clock.sleeps[0] <= 1.0 and 1.0 <= setup.clock.sleeps[1] <= 2.0
    assert setup.in_flight() == {"a": 1}  # the answer's lease, until it is sent
    answer.lease.release()
    assert setup.in_flight() == {"a": 0}


async def test_a_retry_goes_to_another_deployment_first_without_waiting() -> None:
    provider = Provider(a=[failure()], b=[failure()])
    setup = Setup(provider, [entry("m", "a"), entry("m", "b")], num_retries=1)
    with pytest.raises(ProxyError):
        await setup.answer(make_call())
    assert sorted(provider.calls) == ["a", "b"]
    assert setup.clock.sleeps == []  # no backoff before an untried deployment
    assert setup.in_flight() == {"a": 0, "b": 0}


async def test_a_request_error_is_not_retried_and_releases_its_lease() -> None:
    provider = Provider(a=[BadRequest("bad 'stop'", param="stop")])
    setup = Setup(provider, [entry("m", "a")], num_retries=3)
    with pytest.raises(BadRequest):
        await setup.answer(make_call())
    assert provider.calls == ["a"] and setup.in_flight() == {"a": 0}


async def test_retries_spent_raise_the_last_error_with_every_lease_released() -> None:
    provider = Provider(a=[failure(502), failure(503)])
    setup = Setup(provider, [entry("m", "a")], num_retries=1, cooldown_failures=10)
    with pytest.raises(ProxyError) as caught:
        await setup.answer(make_call())
    assert caught.value.status == 503
    assert setup.in_flight() == {"a": 0}


async def test_the_log_says_trying_again_only_when_an_attempt_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider = Provider(a=[failure(502), failure(503)])
    setup = Setup(provider, [entry("m", "a")], num_retries=1, cooldown_failures=10)
    with pytest.raises(ProxyError):
        await setup.answer(make_call())
    failed = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failed) == 2
    assert failed[0].endswith("; trying again") and not failed[1].endswith("; trying again")


# -- fallbacks and allows ----------------------------------------------------------------------


async def test_a_failed_model_falls_back_in_order() -> None:
    provider = Provider(a=[failure()], f=[failure()], g=[ok()])
    setup = Setup(
        provider,
        [entry("m", "a"), entry("f", "f"), entry("g", "g")],
        num_retries=0,
        fallbacks={"m": ["f", "g"]},
    )
    answer = await setup.answer(make_call())
    assert provider.calls == ["a", "f", "g"]
    assert answer.lease.deployment == setup.deployment("g")
    assert setup.in_flight() == {"a": 0, "f": 0, "g": 1}


class MapRecorder:
    def __init__(self) -> None:
        self.asked: list[str] = []

    @hookimpl(tryfirst=True)
    def map_model(self, model: str) -> None:
        self.asked.append(model)


async def test_a_fallback_the_key_may_not_use_is_never_asked_for() -> None:
    recorder = MapRecorder()
    provider = Provider(a=[failure()], secret=[ok()], open=[ok()])
    setup = Setup(
        provider,
        [entry("m", "a"), entry("secret", "secret"), entry("open", "open")],
        plugins=[recorder],
        num_retries=0,
        fallbacks={"m": ["secret", "open"]},
    )
    principal = Principal("limited", models=frozenset({"m", "open"}))
    answer = await setup.answer(make_call(principal=principal))
    assert provider.calls == ["a", "open"]
    assert recorder.asked == ["m", "open"]  # map_model never learns of "secret"
    assert answer.lease.deployment.name == "open"


async def test_a_context_window_error_goes_to_its_fallbacks_at_once() -> None:
    too_long = ProxyError("too long", status=400, code="context_length_exceeded")
    provider = Provider(a=[too_long], big=[ok()])
    setup = Setup(
        provider,
        [entry("m", "a"), entry("big", "big")],
        num_retries=3,
        context_window_fallbacks={"m": ["big"]},
    )
    answer = await setup.answer(make_call())
    assert (
        provider.calls == ["a", "big"]
        and isinstance(answer.reply, JSONReply)
        and answer.reply.body == OK
    )
    assert setup.clock.sleeps == []


async def test_an_unknown_model_is_a_404_with_nothing_taken() -> None:
    setup = Setup(Provider(), [entry("m", "a")])
    with pytest.raises(ModelNotFound):
        await setup.answer(make_call("nope"))
    assert setup.in_flight() == {"a": 0}


# -- panic mode ------------------------------------------------------------------------------


async def test_a_model_all_cooling_down_is_served_in_panic_after_its_fallbacks() -> None:
    provider = Provider(a=[ok()], f=[failure()])
    setup = Setup(
        provider,
        [entry("m", "a"), entry("f", "f")],
        num_retries=0,
        cooldown_failures=1,
        fallbacks={"m": ["f"]},
    )
    setup.router.failed(setup.deployment("m"), failure())  # a cools down
    call = make_call()
    plan, lease = await setup.dispatcher.plan(call)
    assert lease.deployment.name == "f" and not plan.panic  # the fallback first
    answer = await setup.dispatcher.dispatch(call, plan, lease)
    assert plan.panic  # then the cooling model, cooldown ignored, with its attempt
    assert provider.calls == ["f", "a"] and answer.lease.deployment.model == "a"
    assert setup.in_flight() == {"a": 1, "f": 0}


async def test_every_deployment_at_its_cap_is_a_429() -> None:
    setup = Setup(Provider(), [entry("m", "a", rpm=1)])
    Lease(setup.router, setup.deployment("m")).release()  # the minute's one request
    with pytest.raises(RateLimited):
        await setup.answer(make_call())
    assert setup.in_flight() == {"a": 0}


async def test_plan_advance_takes_its_collaborators_not_the_dispatcher() -> None:
    a, f = (Deployment(name=n, provider="p", model=n) for n in ("a", "f"))
    plan = Plan("a", (a,), ["a", "f", "g"], attempts=1)
    offered = {"f": (f,), "g": ()}

    async def candidates(call: Call, model: str) -> tuple[Deployment, ...]:
        return offered[model]

    assert await plan.advance(make_call(), candidates, lambda model: 4)
    assert (plan.model, plan.candidates, plan.attempts) == ("f", (f,), 4)
    plan.skip()
    assert await plan.advance(make_call(), candidates, lambda model: 4)  # g offers nothing
    assert plan.panic and plan.model == "f"  # back to the skipped one
    assert not await plan.advance(make_call(), candidates, lambda model: 4)


# -- before_request --------------------------------------------------------------------------


class Reroute:
    def __init__(self, target: Deployment) -> None:
        self.target = target

    @hookimpl
    def before_request(self, call: Call) -> None:
        call.route_to(self.target)


async def test_a_before_request_reroute_moves_the_lease() -> None:
    provider = Provider(b=[ok()])
    models = [entry("m", "a"), entry("backup", "b")]
    setup = Setup(provider, models)
    setup.dispatcher.hooks = Hooks(
        make_plugin_manager(
            setup.config, [Reroute(setup.deployment("backup"))], load_entrypoints=False
        )
    )
    call = make_call()
    plan, lease = await setup.dispatcher.plan(call)
    assert lease.deployment == setup.deployment("backup") == call.deployment
    assert plan.candidates == (setup.deployment("backup"),)
    assert setup.in_flight() == {"a": 0, "b": 1}
    answer = await setup.dispatcher.dispatch(call, plan, lease)
    assert provider.calls == ["b"] and answer.lease is lease


async def test_a_before_request_reroute_to_a_model_the_key_may_not_use_is_a_403() -> None:
    provider = Provider(b=[ok()])
    setup = Setup(provider, [entry("m", "a"), entry("secret", "b")])
    setup.dispatcher.hooks = Hooks(
        make_plugin_manager(
            setup.config, [Reroute(setup.deployment("secret"))], load_entrypoints=False
        )
    )
    limited = Principal("limited", models=frozenset({"m"}))
    with pytest.raises(PermissionDenied) as caught:
        await setup.dispatcher.plan(make_call(principal=limited))
    assert caught.value.status == 403 and "secret" not in caught.value.message
    assert setup.in_flight() == {"a": 0, "b": 0} and provider.calls == []


class Refuse:
    @hookimpl
    def before_request(self, call: Call) -> None:
        raise BadRequest("no")


async def test_a_before_request_refusal_releases_the_lease() -> None:
    setup = Setup(Provider(), [entry("m", "a")], plugins=[Refuse()])
    with pytest.raises(BadRequest):
        await setup.dispatcher.plan(make_call())
    assert setup.in_flight() == {"a": 0}


# -- cancellation ----------------------------------------------------------------------------


async def test_cancelled_during_the_provider_call_releases_the_lease() -> None:
    provider = Provider()
    provider.hang_on = "a"
    setup = Setup(provider, [entry("m", "a")])
    task = asyncio.ensure_future(setup.answer(make_call()))
    await provider.hang.wait()
    assert setup.in_flight() == {"a": 1}
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert setup.in_flight() == {"a": 0}


async def test_cancelled_during_the_backoff_sends_no_retry_and_holds_nothing() -> None:
    provider = Provider(a=[failure(), ok()])
    setup = Setup(provider, [entry("m", "a")], num_retries=1)
    setup.clock.hold = True
    task = asyncio.ensure_future(setup.answer(make_call()))
    await setup.clock.sleeping.wait()
    assert setup.in_flight() == {"a": 0}  # the failed try's lease is back while it waits
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert setup.clock.cancelled == 1 and provider.calls == ["a"]
    assert setup.in_flight() == {"a": 0}


async def test_a_stream_failing_before_its_first_event_is_retried_and_closed() -> None:
    closed: list[str] = []

    async def refused() -> AsyncGenerator[bytes, None]:
        raise failure()
        yield b""  # (an async generator that fails before its first event)

    async def answered() -> AsyncGenerator[bytes, None]:
        yield b"data: 1\n\n"

    async def close_refused() -> None:
        closed.append("refused")

    provider = Provider(a=[StreamReply(refused(), close=close_refused), StreamReply(answered())])
    setup = Setup(provider, [entry("m", "a")], num_retries=1)
    answer = await setup.answer(make_call())
    assert answer.first == b"data: 1\n\n" and closed == ["refused"]
    assert setup.in_flight() == {"a": 1}


# -- admission (the completions bridge's further calls) --------------------------------------


async def test_admit_counts_a_further_call_and_dismiss_releases_it_once() -> None:
    setup = Setup(Provider(), [entry("m", "a", rpm=2)])
    call = make_call()
    call.route_to(setup.deployment("m"))
    sub = call.for_chat({"messages": []})
    setup.dispatcher.admit(sub)
    assert setup.in_flight() == {"a": 1}
    setup.dispatcher.dismiss(sub)
    setup.dispatcher.dismiss(sub)  # once only
    assert setup.in_flight() == {"a": 0}
    other = call.for_chat({"messages": []})
    setup.dispatcher.admit(other)  # the minute's second request
    with pytest.raises(RateLimited) as refused:
        setup.dispatcher.admit(call.for_chat({"messages": []}))
    assert refused.value.caused_by_upstream is False  # our cap: no cooldown
    setup.dispatcher.dismiss(other)
    assert setup.in_flight() == {"a": 0}


# -- tokens ----------------------------------------------------------------------------------


def test_tokens_spent_only_for_a_tpm_capped_deployment() -> None:
    call = make_call()
    outcome = Outcome(200, stream=False)
    outcome.body = b"x" * 400
    capped = Deployment(name="m", provider="p", model="a", tpm=1000)
    assert tokens_spent(call, outcome, Deployment(name="m", provider="p", model="a")) == 0
    assert tokens_spent(call, None, capped) == 0
    assert tokens_spent(call, outcome, capped) == call.body_size() // 4 + 100
