"""aioproxy.context: the Call's body fields, routing, and the Principal's model list."""

from __future__ import annotations

import json

import msgspec
import pytest
from aiohttp.test_utils import make_mocked_request

from aioproxy.config import Secret, Timeouts
from aioproxy.context import ANONYMOUS, Call, Deployment, Principal
from aioproxy.payloads import decode_request
from aioproxy.routes import Kind

# Odd spacing, key order, number forms and escapes: what a forwarded body must keep as sent.
BODY = (
    b'{"messages": [ {"role" : "user", "content": "h\\u00e9llo"} ],'
    b' "model":"alias",  "temperature": 1.0e0, "n": 1, "x": {"b": 2, "a": 1}, "stream": false}'
)


def make_call(body: bytes = BODY) -> Call:
    fields, model, stream = decode_request(body)
    request = make_mocked_request("POST", "/v1/chat/completions")
    return Call(Kind.CHAT_COMPLETIONS, request, Principal("p"), model, fields, stream)


DEPLOYMENT = Deployment(
    name="alias", provider="openai", model="gpt-4o-mini", api_key=Secret("sk-u")
)


def test_call_from_decoded_body() -> None:
    call = make_call()
    assert call.model == "alias" and call.stream is False
    assert call.kind is Kind.CHAT_COMPLETIONS
    assert not call.routed and call.state == {}
    assert call.started > 0


def test_get() -> None:
    call = make_call()
    assert call.get("messages") == [{"role": "user", "content": "héllo"}]
    assert call.get("temperature") == 1.0
    assert call.get("x") == {"b": 2, "a": 1}
    assert call.get("absent") is None
    assert call.get("absent", 42) == 42
    assert call.get("stream", True) is False  # a present value wins over the default


def test_get_null_field_is_none_not_default() -> None:
    call = make_call(b'{"model": "m", "messages": [], "user": null}')
    assert call.get("user", "default") is None


def test_route_to_replaces_only_model() -> None:
    call = make_call()
    call.route_to(DEPLOYMENT)
    assert call.deployment is DEPLOYMENT
    assert call.model == "alias"  # the client's name is kept on the call
    assert call.body() == (
        b'{"messages":[ {"role" : "user", "content": "h\\u00e9llo"} ],'
        b'"model":"gpt-4o-mini","temperature":1.0e0,"n":1,"x":{"b": 2, "a": 1},"stream":false}'
    )


def test_routed_to_is_the_deployment_or_none() -> None:
    call = make_call()
    assert call.routed_to is None and not call.routed
    with pytest.raises(RuntimeError, match="not routed"):
        _ = call.deployment
    call.route_to(DEPLOYMENT)
    assert call.routed_to is DEPLOYMENT is call.deployment and call.routed


def test_body_is_the_same_json_as_sent_bar_model() -> None:
    call = make_call()
    call.route_to(DEPLOYMENT)
    sent = json.loads(BODY)
    assert json.loads(call.body()) == {**sent, "model": "gpt-4o-mini"}
    assert list(json.loads(call.body())) == list(sent)  # field order kept


def test_set_and_pop() -> None:
    call = make_call()
    call.set("temperature", 0.2)
    call.set("metadata", {"team": "a"})
    call.pop("n")
    call.pop("never-there")  # no error
    body = json.loads(call.body())
    assert body["temperature"] == 0.2 and body["metadata"] == {"team": "a"}
    assert "n" not in body
    assert call.get("metadata") == {"team": "a"}


def test_set_refuses_what_json_cannot_hold() -> None:
    call = make_call()
    with pytest.raises(TypeError):
        call.set("bad", object())
    with pytest.raises(TypeError):
        call.set("key", Secret("sk-never-in-a-body"))
    assert "key" not in json.loads(call.body())


def test_json_is_cached_and_invalidated() -> None:
    call = make_call()
    first = call.json()
    assert first["model"] == "alias" and first["temperature"] == 1.0
    assert call.json() is first

    call.route_to(DEPLOYMENT)
    routed = call.json()
    assert routed is not first and routed["model"] == "gpt-4o-mini"

    call.set("temperature", 0)
    assert call.json()["temperature"] == 0

    call.pop("temperature")
    assert "temperature" not in call.json()


def test_state_is_per_call() -> None:
    a, b = make_call(), make_call()
    a.state["x"] = 1
    assert b.state == {}


def test_call_has_no_instance_dict() -> None:
    with pytest.raises(AttributeError):
        make_call().other = 1  # type: ignore[attr-defined]


def test_principal_allows() -> None:
    assert Principal("all").allows("anything")
    limited = Principal("team", frozenset({"a", "b"}))
    assert limited.allows("a") and limited.allows("b")
    assert not limited.allows("c")
    assert not limited.allows("A")  # exact names
    nothing = Principal("none", frozenset())
    assert not nothing.allows("a")


def test_anonymous_and_master() -> None:
    assert ANONYMOUS.name == "anonymous" and ANONYMOUS.models is None and not ANONYMOUS.is_master
    assert ANONYMOUS.allows("x")
    assert Principal("master", is_master=True).is_master


def test_principal_is_frozen_and_hashable() -> None:
    principal = Principal("p", frozenset({"a"}))
    with pytest.raises(AttributeError):
        principal.name = "q"  # type: ignore[misc]
    assert principal == Principal("p", frozenset({"a"}))
    assert hash(principal) == hash(Principal("p", frozenset({"a"})))


def test_deployment_describe_never_shows_key() -> None:
    text = DEPLOYMENT.describe()
    assert text == "alias (openai:gpt-4o-mini)"
    assert "sk-u" not in repr(DEPLOYMENT)


def test_deployment_defaults() -> None:
    deployment = Deployment(name="n", provider="p", model="m")
    assert deployment.api_base is None and deployment.api_key is None
    assert deployment.weight == 1.0 and deployment.timeouts is None
    assert deployment.headers == {} and deployment.settings == {}
    assert Deployment(name="n", provider="p", model="m", timeouts=Timeouts()).timeouts == Timeouts()


def test_fields_are_raw() -> None:
    call = make_call()
    assert all(isinstance(raw, msgspec.Raw) for raw in call.fields.values())
    assert bytes(call.fields["x"]) == b'{"b": 2, "a": 1}'
