"""Endpoint kinds served on top of chat completions, for providers that only have chat."""

from __future__ import annotations

from ..config import CompletionsConfig
from ..providers import ProviderMethod
from ..routes import Kind
from .completions import Admission, make_completions_bridge
from .responses import make_responses_bridge
from .store import ResponseStore

__all__ = ["ResponseStore", "bridge_methods", "make_completions_bridge", "make_responses_bridge"]


def bridge_methods(
    methods: dict[Kind, ProviderMethod],
    store: ResponseStore | None,
    completions: CompletionsConfig = CompletionsConfig(),
    admission: Admission | None = None,
) -> dict[Kind, ProviderMethod]:
    """``methods`` plus responses and completions bridged onto its chat, where it lacks them.

    A provider's own method is never replaced; without chat completions nothing is added.
    ``admission`` counts the completions bridge's further chat calls against the limits.
    """
    served = dict(methods)
    chat = served.get(Kind.CHAT_COMPLETIONS)
    if chat is None:
        return served
    if Kind.RESPONSES not in served:
        served[Kind.RESPONSES] = make_responses_bridge(chat, store)
    if Kind.COMPLETIONS not in served:
        served[Kind.COMPLETIONS] = make_completions_bridge(chat, completions, admission)
    return served
