"""bridge_methods: what a provider lacks is bridged onto its chat; nothing native is replaced."""

from __future__ import annotations

from aioproxy import Call, JSONReply, Reply
from aioproxy.bridges import bridge_methods
from aioproxy.routes import Kind


async def chat(call: Call) -> Reply:
    return JSONReply.of({})


async def native(call: Call) -> Reply:
    return JSONReply.of({})


def test_chat_only_gains_responses_completions_and_messages() -> None:
    methods = bridge_methods({Kind.CHAT_COMPLETIONS: chat}, None)
    assert set(methods) == {
        Kind.CHAT_COMPLETIONS,
        Kind.RESPONSES,
        Kind.COMPLETIONS,
        Kind.MESSAGES,
        Kind.COUNT_TOKENS,  # estimated
    }
    assert methods[Kind.CHAT_COMPLETIONS] is chat


def test_native_methods_are_kept() -> None:
    given = {Kind.CHAT_COMPLETIONS: chat, Kind.RESPONSES: native, Kind.EMBEDDINGS: native}
    methods = bridge_methods(given, None)
    assert methods[Kind.RESPONSES] is native and methods[Kind.EMBEDDINGS] is native
    assert Kind.COMPLETIONS in methods
    assert Kind.COMPLETIONS not in given  # the argument is left as it was


def test_native_messages_keeps_its_own_count_tokens() -> None:
    given = {Kind.CHAT_COMPLETIONS: chat, Kind.MESSAGES: native, Kind.COUNT_TOKENS: native}
    methods = bridge_methods(given, None)
    assert methods[Kind.MESSAGES] is native and methods[Kind.COUNT_TOKENS] is native


def test_without_chat_nothing_is_bridged() -> None:
    assert bridge_methods({Kind.EMBEDDINGS: native}, None) == {Kind.EMBEDDINGS: native}
