"""The alias map (endpoint kind -> paths) and the route table built from it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType

from aiohttp import web
from aiohttp.typedefs import Handler

__all__ = [
    "ALIASES",
    "ANTHROPIC_KINDS",
    "AZURE_ALIASES",
    "DEPLOYMENT_ALIASES",
    "KINDS",
    "METHODS",
    "Kind",
    "merge_aliases",
    "route_table",
]


class Kind(StrEnum):
    """An endpoint kind; the value is also the Provider method that serves it."""

    CHAT_COMPLETIONS = "chat_completions"
    RESPONSES = "responses"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    MODELS = "models"
    MODEL = "model"
    MESSAGES = "messages"  # Anthropic's Messages API
    COUNT_TOKENS = "count_tokens"  # its /v1/messages/count_tokens


KINDS: tuple[str, ...] = tuple(kind.value for kind in Kind)

# Every kind in its OpenAI form and its short alias; both reach the same handler.
ALIASES: Mapping[Kind, tuple[str, ...]] = MappingProxyType(
    {
        Kind.CHAT_COMPLETIONS: ("/v1/chat/completions", "/chat/completions"),
        Kind.RESPONSES: ("/v1/responses", "/responses"),
        Kind.COMPLETIONS: ("/v1/completions", "/completions"),
        Kind.EMBEDDINGS: ("/v1/embeddings", "/embeddings"),
        Kind.MODELS: ("/v1/models", "/models"),
        Kind.MODEL: ("/v1/models/{model}", "/models/{model}"),
        Kind.MESSAGES: ("/v1/messages", "/messages"),
        Kind.COUNT_TOKENS: ("/v1/messages/count_tokens", "/messages/count_tokens"),
    }
)

# Azure OpenAI's routes, so that its clients (``AzureOpenAI``) work unchanged: its v1 API is
# OpenAI's under /openai/v1 (its Responses also under /openai), and its deployment routes name
# the model in the path (DEPLOYMENT_ALIASES, whose handlers read it there; any api-version).
AZURE_ALIASES: Mapping[Kind, tuple[str, ...]] = MappingProxyType(
    {
        Kind.CHAT_COMPLETIONS: ("/openai/v1/chat/completions",),
        Kind.RESPONSES: ("/openai/v1/responses", "/openai/responses"),
        Kind.COMPLETIONS: ("/openai/v1/completions",),
        Kind.EMBEDDINGS: ("/openai/v1/embeddings",),
        Kind.MODELS: ("/openai/v1/models",),
        Kind.MODEL: ("/openai/v1/models/{model}",),
    }
)
DEPLOYMENT_ALIASES: Mapping[Kind, tuple[str, ...]] = MappingProxyType(
    {
        Kind.CHAT_COMPLETIONS: ("/openai/deployments/{deployment}/chat/completions",),
        Kind.COMPLETIONS: ("/openai/deployments/{deployment}/completions",),
        Kind.EMBEDDINGS: ("/openai/deployments/{deployment}/embeddings",),
    }
)

METHODS: Mapping[Kind, str] = MappingProxyType(
    {kind: "GET" if kind in (Kind.MODELS, Kind.MODEL) else "POST" for kind in Kind}
)

# Kinds that call a provider (the rest are answered by the proxy itself).
PROVIDER_KINDS: tuple[Kind, ...] = (
    Kind.CHAT_COMPLETIONS,
    Kind.RESPONSES,
    Kind.COMPLETIONS,
    Kind.EMBEDDINGS,
    Kind.MESSAGES,
    Kind.COUNT_TOKENS,
)

# Kinds that speak Anthropic's conventions: its error shape (``{"type": "error", ...}``).
ANTHROPIC_KINDS = frozenset({Kind.MESSAGES, Kind.COUNT_TOKENS})


def merge_aliases(
    base: Mapping[Kind, Iterable[str]],
    extra: Mapping[str, Iterable[str]] | Mapping[Kind, Iterable[str]],
) -> dict[Kind, tuple[str, ...]]:
    """``base`` plus the config's extra paths per kind, without duplicates, order kept."""
    merged = {kind: tuple(paths) for kind, paths in base.items()}
    for kind_name, paths in extra.items():
        kind = Kind(kind_name)
        merged[kind] = tuple(dict.fromkeys((*merged.get(kind, ()), *paths)))
    return merged


def route_table(
    aliases: Mapping[Kind, Iterable[str]], handlers: Mapping[Kind, Handler]
) -> list[web.RouteDef]:
    """One route per path of every kind, all paths of a kind sharing its handler."""
    return [
        web.route(METHODS[kind], path, handlers[kind])
        for kind, paths in aliases.items()
        for path in paths
    ]
