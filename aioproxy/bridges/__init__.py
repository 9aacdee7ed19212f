"""Endpoint kinds served on top of chat completions, for providers that only have chat."""

from __future__ import annotations

from collections.abc import Collection

from ..config import CompletionsConfig, ServerConfig
from ..providers import ProviderMethod
from ..routes import Kind
from .completions import Admission, make_completions_bridge
from .messages import count_tokens_estimate, make_messages_bridge
from .native import FallBack, NativeResponses
from .responses import make_responses_bridge
from .store import ResponseStore

__all__ = [
    "NativeResponses",
    "ResponseStore",
    "bridge_methods",
    "make_completions_bridge",
    "make_messages_bridge",
    "make_responses_bridge",
]

# The default limits (an immutable Struct): built once, not in the signature (B008).
_COMPLETIONS = CompletionsConfig()


def bridge_methods(
    methods: dict[Kind, ProviderMethod],
    store: ResponseStore | None,
    completions: CompletionsConfig = _COMPLETIONS,
    admission: Admission | None = None,
    *,
    endpoints: Collection[Kind] | None = None,
    natives: NativeResponses | None = None,
    fall_back: FallBack | None = None,
    max_body_size: int = ServerConfig().max_body_size,
) -> dict[Kind, ProviderMethod]:
    """``methods`` plus responses, completions and Anthropic's messages bridged onto its chat,
    where it lacks them (count_tokens then estimated).

    Args:
        methods: the provider's own methods.
        store: the response store (None: disabled).
        completions: the completions bridge's limits.
        admission: counts the completions bridge's further chat calls against the limits.
        endpoints: the kinds the upstream serves itself (None: all of ``methods``); the
            others are bridged too.
        natives: the record of native response ids: a native ``responses`` is wrapped to
            keep it, and to ``fall_back`` onto the bridge when the upstream lacks the route.
        max_body_size: ``[server] max_body_size``, which bounds what a completions request's
            chat calls carry all told, and the stored history a response continues.

    A native method is never replaced; without native chat completions nothing is bridged.
    """
    served = (
        dict(methods)
        if endpoints is None
        else {kind: method for kind, method in methods.items() if kind in endpoints}
    )
    chat = served.get(Kind.CHAT_COMPLETIONS)
    bridge = make_responses_bridge(chat, store, max_body_size) if chat is not None else None
    native = served.get(Kind.RESPONSES)
    if native is not None:
        if natives is not None and fall_back is not None:
            served[Kind.RESPONSES] = natives.wrap(native, bridge, fall_back)
    elif bridge is not None:
        served[Kind.RESPONSES] = bridge
    if chat is not None and Kind.COMPLETIONS not in served:
        served[Kind.COMPLETIONS] = make_completions_bridge(
            chat, completions, admission, max_body_size
        )
    if chat is not None and Kind.MESSAGES not in served:
        served[Kind.MESSAGES] = make_messages_bridge(chat)
    if Kind.MESSAGES in served and Kind.COUNT_TOKENS not in served:
        served[Kind.COUNT_TOKENS] = count_tokens_estimate
    return served
