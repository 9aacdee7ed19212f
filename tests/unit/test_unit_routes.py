"""aioproxy.routes: the alias map, merging the config's extra paths, and the route table."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from aioproxy.routes import (
    ALIASES,
    KINDS,
    METHODS,
    PROVIDER_KINDS,
    Kind,
    merge_aliases,
    route_table,
)

OPENAI_PATHS = {
    Kind.CHAT_COMPLETIONS: "/v1/chat/completions",
    Kind.RESPONSES: "/v1/responses",
    Kind.COMPLETIONS: "/v1/completions",
    Kind.EMBEDDINGS: "/v1/embeddings",
    Kind.MODELS: "/v1/models",
    Kind.MODEL: "/v1/models/{model}",
    Kind.MESSAGES: "/v1/messages",
    Kind.COUNT_TOKENS: "/v1/messages/count_tokens",
}


def test_kinds_are_the_enum_values() -> None:
    assert KINDS == tuple(kind.value for kind in Kind)
    assert set(ALIASES) == set(Kind) == set(METHODS)


@pytest.mark.parametrize("kind", list(Kind))
def test_every_kind_has_openai_form_and_short_alias(kind: Kind) -> None:
    openai_form = OPENAI_PATHS[kind]
    assert ALIASES[kind] == (openai_form, openai_form.removeprefix("/v1"))


def test_methods() -> None:
    gets = {kind for kind, method in METHODS.items() if method == "GET"}
    assert gets == {Kind.MODELS, Kind.MODEL}
    assert {kind for kind, method in METHODS.items() if method == "POST"} == set(PROVIDER_KINDS)


def test_alias_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        ALIASES[Kind.MODELS] = ("/x",)  # type: ignore[index]


def test_merge_adds_paths_after_the_base_ones() -> None:
    merged = merge_aliases(ALIASES, {"chat_completions": ["/openai/v1/chat/completions", "/c"]})
    assert merged[Kind.CHAT_COMPLETIONS] == (
        "/v1/chat/completions",
        "/chat/completions",
        "/openai/v1/chat/completions",
        "/c",
    )
    for kind in Kind:
        if kind is not Kind.CHAT_COMPLETIONS:
            assert merged[kind] == ALIASES[kind]


def test_merge_dedups_and_keeps_first_order() -> None:
    merged = merge_aliases(
        ALIASES, {"embeddings": ["/e", "/v1/embeddings", "/e", "/f", "/embeddings", "/f"]}
    )
    assert merged[Kind.EMBEDDINGS] == ("/v1/embeddings", "/embeddings", "/e", "/f")


def test_merge_does_not_touch_base() -> None:
    base = {Kind.MODELS: ["/v1/models"]}
    merged = merge_aliases(base, {"models": ["/m"], "model": ["/m/{model}"]})
    assert base == {Kind.MODELS: ["/v1/models"]}
    assert merged == {Kind.MODELS: ("/v1/models", "/m"), Kind.MODEL: ("/m/{model}",)}
    assert all(isinstance(kind, Kind) for kind in merged)


def test_merge_with_nothing_extra_is_the_base() -> None:
    assert merge_aliases(ALIASES, {}) == dict(ALIASES)


def test_merge_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="chat"):
        merge_aliases(ALIASES, {"chat": ["/chat"]})


def test_route_table_one_route_per_path() -> None:
    handlers = {kind: _make_handler(kind) for kind in Kind}
    aliases = merge_aliases(ALIASES, {"responses": ["/r"]})
    table = route_table(aliases, handlers)

    expected = [(kind, path) for kind, paths in aliases.items() for path in paths]
    assert len(table) == len(expected) == 17
    for route, (kind, path) in zip(table, expected, strict=True):
        assert isinstance(route, web.RouteDef)
        assert route.path == path
        assert route.method == METHODS[kind]
        assert route.handler is handlers[kind]


def test_route_table_resolves_in_an_app() -> None:
    handlers = {kind: _make_handler(kind) for kind in Kind}
    app = web.Application()
    app.router.add_routes(route_table(ALIASES, handlers))
    resources = {resource.canonical: resource for resource in app.router.resources()}
    assert set(resources) == {path for paths in ALIASES.values() for path in paths}
    for kind, paths in ALIASES.items():
        for path in paths:
            [route] = [r for r in resources[path] if r.method != "HEAD"]  # GET adds HEAD
            assert route.method == METHODS[kind]
            assert route.handler is handlers[kind]


def _make_handler(kind: Kind) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=kind.value)

    return handler
