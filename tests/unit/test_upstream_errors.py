"""aioproxy.failures and Upstream.read: client errors as 502/504, upstream error bodies relayed,
keys scrubbed."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from aioproxy import upstream
from aioproxy.config import Secret, Timeouts, parse_config
from aioproxy.context import Call, Deployment, Principal
from aioproxy.errors import BadGateway, GatewayTimeout, ProxyError, RateLimited
from aioproxy.failures import as_proxy_error, read_upstream_error, scrub
from aioproxy.passthrough import check_answer
from aioproxy.routes import Kind
from aioproxy.transport import SessionTransport
from aioproxy.transport import client_timeout as timeout_for

KEY = "sk-proj-Upstr3amS3cretKey0000"
DEPLOYMENT = Deployment(
    name="gpt-test", provider="openai", model="gpt-4o-mini", api_key=Secret(KEY)
)
WHERE = "gpt-test (openai:gpt-4o-mini)"


def os_error() -> OSError:
    return OSError(111, "Connection refused")


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (TimeoutError(), 504, "upstream_timeout"),
        (aiohttp.ServerTimeoutError("read"), 504, "upstream_timeout"),
        (aiohttp.ConnectionTimeoutError("connect"), 504, "upstream_timeout"),
        (aiohttp.SocketTimeoutError("sock read"), 504, "upstream_timeout"),
        (aiohttp.ClientConnectorError(None, os_error()), 502, "upstream_unreachable"),
        (aiohttp.ClientConnectorDNSError(None, os_error()), 502, "upstream_unreachable"),
        (
            aiohttp.ClientConnectorCertificateError(None, Exception("bad cert")),
            502,
            "upstream_unreachable",
        ),
        (aiohttp.ServerDisconnectedError(), 502, "upstream_disconnected"),
        (
            aiohttp.ClientPayloadError("Response payload is not completed"),
            502,
            "upstream_disconnected",
        ),
        (aiohttp.ClientOSError(104, "Connection reset by peer"), 502, "upstream_error"),
        (aiohttp.ClientResponseError(None, (), status=500), 502, "upstream_error"),
        (aiohttp.InvalidURL("nope"), 502, "upstream_error"),
        (ConnectionResetError(104, "reset"), 502, "upstream_error"),
        (ValueError("weird"), 502, "upstream_error"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, BaseException) else None,
)
def test_as_proxy_error(exc: BaseException, status: int, code: str) -> None:
    error = as_proxy_error(exc, DEPLOYMENT)
    assert isinstance(error, GatewayTimeout if status == 504 else BadGateway)
    assert (error.status, error.code) == (status, code)
    assert WHERE in error.message
    assert KEY not in error.message


def test_as_proxy_error_unknown_exception_names_its_type_only() -> None:
    error = as_proxy_error(KeyError(f"contains {KEY}"), DEPLOYMENT)
    assert error.message == f"Deployment {WHERE} failed: KeyError"


def test_as_proxy_error_keeps_proxy_errors() -> None:
    original = RateLimited("slow")
    assert as_proxy_error(original, DEPLOYMENT) is original


def test_as_proxy_error_without_deployment() -> None:
    error = as_proxy_error(aiohttp.ServerDisconnectedError(), None)
    assert "the upstream" in error.message and error.status == 502


# --- read_upstream_error -------------------------------------------------------------------------


def test_openai_shaped_error_passes_through() -> None:
    body = json.dumps(
        {
            "error": {
                "message": "Invalid 'messages': empty.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "empty_array",
            }
        }
    ).encode()
    error = read_upstream_error(400, body, DEPLOYMENT)
    assert (error.status, error.message, error.type, error.param, error.code) == (
        400,
        "Invalid 'messages': empty.",
        "invalid_request_error",
        "messages",
        "empty_array",
    )


def test_numeric_code_becomes_string() -> None:
    body = b'{"error": {"message": "slow down", "code": 429}}'
    error = read_upstream_error(429, body, DEPLOYMENT)
    assert error.code == "429" and error.status == 429
    assert error.type == "invalid_request_error"  # no type given: by status


def test_server_error_names_the_deployment() -> None:
    error = read_upstream_error(503, b'{"error": {"message": "overloaded"}}', DEPLOYMENT)
    assert (error.status, error.type) == (503, "upstream_error")  # no type given: by status
    assert error.message == f"Deployment {WHERE} answered 503: overloaded"


def test_server_error_key_scrubbed() -> None:
    body = json.dumps({"error": {"message": f"bad key {KEY}", "type": "server_error"}}).encode()
    error = read_upstream_error(500, body, DEPLOYMENT)
    assert error.message == f"Deployment {WHERE} answered 500: bad key ***"
    assert error.type == "server_error"


def test_string_error() -> None:
    error = read_upstream_error(400, b'{"error": "model is required"}', DEPLOYMENT)
    assert error.message == "model is required" and error.param is None and error.code is None


def test_top_level_message() -> None:
    error = read_upstream_error(404, b'{"message": "no such route"}', DEPLOYMENT)
    assert (error.status, error.message) == (404, "no such route")


@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"detail": "Not Found"}',
        b"[1,2]",
        b'{"error": {"message": 5}}',
    ],
    ids=["html", "other-json", "array", "wrong-types"],
)
def test_unreadable_error_body_is_previewed(body: bytes) -> None:
    error = read_upstream_error(500, body, DEPLOYMENT)
    assert error.status == 500 and error.type == "upstream_error"
    assert error.message == f"Deployment {WHERE} answered 500: {body.decode()}"


def test_empty_body() -> None:
    error = read_upstream_error(502, b"   ", DEPLOYMENT)
    assert error.message == f"Deployment {WHERE} answered 502"


def test_preview_is_capped_and_tolerates_bad_utf8() -> None:
    body = b"\xff" + b"x" * 10_000
    error = read_upstream_error(500, body, DEPLOYMENT)
    assert "\ufffd" in error.message
    assert len(error.message) < 400


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_auth_failure_is_502(status: int) -> None:
    body = json.dumps(
        {
            "error": {
                "message": f"Incorrect API key provided: {KEY}",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
    )
    error = read_upstream_error(status, body.encode(), DEPLOYMENT)
    assert isinstance(error, BadGateway)
    assert (error.status, error.code, error.type) == (502, "upstream_auth_failed", "upstream_error")
    assert str(status) in error.message and WHERE in error.message
    assert "Incorrect" not in error.message  # not the upstream's words
    assert KEY not in error.message


def test_deployment_key_scrubbed_from_message() -> None:
    odd_key = Deployment(
        name="a", provider="azure", model="m", api_key=Secret("0123456789abcdef0123456789abcdef")
    )
    body = b'{"error": {"message": "key 0123456789abcdef0123456789abcdef is over quota"}}'
    error = read_upstream_error(429, body, odd_key)
    assert error.message == "key *** is over quota"


@pytest.mark.parametrize(
    "leak",
    [
        "sk-abcdef123456",
        "sk-proj-AbC_dEf-123.456",
        "SK-ABCDEF1234",
        "key-0123456789",
        "api_key_abcdef12",
        "api-key-abcdef12",
        "apikey-abcdefgh",
    ],
)
def test_key_like_strings_scrubbed(leak: str) -> None:
    error = read_upstream_error(
        400, json.dumps({"error": {"message": f"bad [{leak}]"}}).encode(), DEPLOYMENT
    )
    assert leak not in error.message
    assert error.message == "bad [***]"


def test_key_scrubbed_from_preview() -> None:
    error = read_upstream_error(
        500, f"upstream said: Authorization: Bearer {KEY}".encode(), DEPLOYMENT
    )
    assert KEY not in error.message and "***" in error.message


@pytest.mark.parametrize("text", ["sk-short", "risk-assessment", "a key-value pair", "desk-top"])
def test_ordinary_words_kept(text: str) -> None:
    assert scrub(text, Deployment(name="a", provider="p", model="m")) == text


def test_result_is_a_proxy_error() -> None:
    error = read_upstream_error(418, b'{"error": {"message": "teapot", "type": "odd"}}', DEPLOYMENT)
    assert isinstance(error, ProxyError) and (error.status, error.type) == (418, "odd")


# --- timeouts and capped reads -------------------------------------------------------------------


def test_timeout_for() -> None:
    timeout = timeout_for(Timeouts(connect=1.5, read=30.0, total=90.0))
    assert (timeout.connect, timeout.sock_read, timeout.total) == (1.5, 30.0, 90.0)
    assert timeout_for(Timeouts()).total is None
    assert timeout_for(Timeouts(connect=2)) is timeout_for(Timeouts(connect=2))  # cached


@pytest.fixture
async def body_server(aiohttp_client: Any) -> Any:
    async def chunked(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(4):
            await response.write(b"x" * 10)
        await response.write_eof()
        return response

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 40)

    app = web.Application()
    app.router.add_get("/chunked", chunked)
    app.router.add_get("/sized", sized)
    return await aiohttp_client(app)


async def read_capped(response: Any) -> bytes:
    """Upstream.read on a call routed to DEPLOYMENT."""
    call = Call(
        Kind.CHAT_COMPLETIONS, make_mocked_request("POST", "/"), Principal("t"), "m", {}, False
    )
    call.route_to(DEPLOYMENT)
    reader = upstream.Upstream(SessionTransport(None), parse_config({}))  # type: ignore[arg-type]
    return await reader.read(response, call)


@pytest.mark.parametrize("path", ["/chunked", "/sized"])
async def test_read_capped_reads_whole_body(body_server: Any, path: str) -> None:
    async with body_server.session.get(body_server.make_url(path)) as response:
        assert len(await read_capped(response)) == 40


@pytest.mark.parametrize("path", ["/chunked", "/sized"])
async def test_read_capped_refuses_too_large(
    body_server: Any, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upstream, "MAX_UPSTREAM_BODY", 25)
    async with body_server.session.get(body_server.make_url(path)) as response:
        with pytest.raises(BadGateway) as caught:
            await read_capped(response)
    assert caught.value.code == "upstream_too_large" and WHERE in caught.value.message


def test_an_error_after_other_fields_of_a_2xx_answer_is_the_upstreams_error() -> None:
    """A 200 whose error object follows a long id is still an error, and masked."""
    deployment = Deployment(
        name="m", provider="openai", model="m", api_key=Secret("sk-secret-123456")
    )
    body = (
        b'{"id": "' + b"x" * 200 + b'", "object": "chat.completion",'
        b' "error": {"message": "bad key sk-secret-123456", "code": "invalid_key"}}'
    )
    with pytest.raises(ProxyError) as caught:
        check_answer(body, deployment)
    assert "sk-secret-123456" not in caught.value.message
    check_answer(b'{"id": "x", "choices": [{"finish_reason": "error"}]}', deployment)  # no error
