"""Embedding aioproxy in another aiohttp app: the README's example, sub-apps, isolation."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from aioproxy import create_app
from tests.support import ServeProxy, gateway_config, sdk

README = Path(__file__).parents[2] / "README.md"
MESSAGES = [{"role": "user", "content": "hello sub app"}]


def readme_example() -> str:
    """The Python block after the README's ``<!-- embedding-example -->`` marker."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- embedding-example -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert match, "README.md lost its embedding example"
    return match.group(1)


async def test_readme_embedding_example_runs(aiohttp_server: Any) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)  # noqa: S102 - our README
    server = await aiohttp_server(namespace["make_app"]())
    async with aiohttp.ClientSession() as http:
        async with http.get(server.make_url("/")) as response:
            assert response.status == 200  # the parent app's own route
        async with http.get(server.make_url("/llm/health")) as response:
            assert response.status == 200
        async with http.get(server.make_url("/llm/v1/unknown")) as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
    async with sdk(server, key="sk-local", prefix="/llm/v1") as client:
        done = await client.chat.completions.create(model="echo", messages=MESSAGES)
        stream = await client.chat.completions.create(model="echo", messages=MESSAGES, stream=True)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert done.choices[0].message.content == streamed != ""


async def test_two_apps_in_one_process_share_nothing(
    serve_proxy: ServeProxy, upstream_base: str, aiohttp_server: Any
) -> None:
    first = await serve_proxy(gateway_config(upstream_base))
    second = await serve_proxy(
        {"auth": {"master_key": "sk-second"}, "models": [{"name": "only-echo", "provider": "echo"}]}
    )
    async with sdk(first) as client:
        assert {m.id for m in (await client.models.list()).data} == {"gpt-test", "echo"}
    async with sdk(second, key="sk-second") as client:
        assert [m.id for m in (await client.models.list()).data] == ["only-echo"]
    async with sdk(second) as client:  # the first app's key means nothing to the second
        async with aiohttp.ClientSession() as http:
            async with http.get(
                second.make_url("/v1/models"), headers={"Authorization": "Bearer sk-master-test"}
            ) as response:
                assert response.status == 401
    await second.close()  # closing one app's session leaves the other serving
    async with sdk(first) as client:
        assert (await client.chat.completions.create(model="gpt-test", messages=MESSAGES)).choices


async def test_create_app_from_a_toml_path(tmp_path: Path, aiohttp_server: Any) -> None:
    path = tmp_path / "aioproxy.toml"
    path.write_text('[[models]]\nname = "e"\nprovider = "echo"\n', encoding="utf-8")
    server = await aiohttp_server(create_app(path))
    async with sdk(server, key="none") as client:
        assert [m.id for m in (await client.models.list()).data] == ["e"]


async def test_subapp_is_a_plain_application() -> None:
    app = create_app({"models": [{"name": "e", "provider": "echo"}]}, load_entrypoints=True)
    assert type(app) is web.Application
