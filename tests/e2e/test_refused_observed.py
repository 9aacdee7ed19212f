"""A request refused for its body has a call (its key known, its model once the body names it):
the access log and the metrics show them, and a body that named no model stays ``none``."""

from __future__ import annotations

import io

import aiohttp

from tests.e2e.test_access_log import lines_of
from tests.e2e.test_metrics import scrape, value
from tests.support import AUTH, ServeProxy, gateway_config

BODIES = (b"{not json", b'{"model": "gpt-test"}')  # no model read; one read, but no messages


async def test_a_refused_body_is_observed_with_its_key_and_model(
    serve_proxy: ServeProxy,
    upstream_base: str,
    access_lines: io.StringIO,
) -> None:
    config = gateway_config(upstream_base, metrics={"enabled": True}, logging={"access_log": True})
    proxy = await serve_proxy(config)
    async with aiohttp.ClientSession() as http:
        for body in BODIES:
            async with http.post(
                proxy.make_url("/v1/chat/completions"), data=body, headers=AUTH
            ) as response:
                assert response.status == 400
    samples = await scrape(proxy)
    requests = "aioproxy_requests_total"
    for model in ("none", "gpt-test"):
        assert value(samples, requests, kind="chat_completions", model=model, status="400") == 1
    lines = [line for line in lines_of(access_lines) if line["path"] == "/v1/chat/completions"]
    assert [(line["key"], line["model"], line["status"]) for line in lines] == [
        ("master", None, 400),
        ("master", "gpt-test", 400),
    ]
