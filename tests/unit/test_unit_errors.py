"""aioproxy.errors: the ProxyError family, the OpenAI error body, and the error middleware."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from aiohttp import web

import aioproxy
from aioproxy.errors import (
    AuthenticationError,
    BadRequest,
    ModelNotFound,
    NotFound,
    ProxyError,
    RateLimited,
    error_body,
    error_middleware,
    error_response,
)
from aioproxy.testing import assert_openai_error

# What each public error class answers with: (status, type, code).
EXPECTED = {
    "ProxyError": (500, "server_error", None),
    "BadRequest": (400, "invalid_request_error", None),
    "AuthenticationError": (401, "authentication_error", "invalid_api_key"),
    "PermissionDenied": (403, "permission_error", "model_not_allowed"),
    "NotFound": (404, "invalid_request_error", "not_found"),
    "ModelNotFound": (404, "invalid_request_error", "model_not_found"),
    "PayloadTooLarge": (413, "invalid_request_error", "request_too_large"),
    "RateLimited": (429, "rate_limit_error", "rate_limit_exceeded"),
    "UpstreamError": (500, "upstream_error", None),
    "BadGateway": (502, "upstream_error", "bad_gateway"),
    "GatewayTimeout": (504, "timeout_error", "upstream_timeout"),
    "ClientDisconnected": (499, "client_error", "client_disconnected"),
    "ServerShutdown": (503, "server_error", "server_shutdown"),
}
# The error classes the package exports, found from aioproxy.__all__ so a new one is not missed.
PUBLIC_ERRORS = [
    obj
    for obj in (getattr(aioproxy, name) for name in aioproxy.__all__)
    if isinstance(obj, type) and issubclass(obj, ProxyError)
]


def test_every_public_error_class_is_checked() -> None:
    assert {cls.__name__ for cls in PUBLIC_ERRORS} == set(EXPECTED)


@pytest.mark.parametrize("cls", PUBLIC_ERRORS, ids=lambda cls: cls.__name__)
def test_error_classes(cls: type[ProxyError]) -> None:
    status, type_, code = EXPECTED[cls.__name__]
    exc = cls("it failed")
    assert (exc.status, exc.type, exc.code) == (status, type_, code)
    assert exc.message == str(exc) == "it failed"
    assert exc.param is None and exc.headers is None
    assert json.loads(error_response(exc).body) == {
        "error": {"message": "it failed", "type": type_, "param": None, "code": code}
    }
    assert error_response(exc).status == status


def test_model_not_found_is_a_not_found() -> None:
    assert issubclass(ModelNotFound, NotFound)


def test_overrides_per_instance_leave_the_class_alone() -> None:
    exc = BadRequest("m", param="model", code="c", status=422, type="t", headers={"X-A": "1"})
    assert (exc.status, exc.type, exc.code, exc.param, exc.headers) == (
        422,
        "t",
        "c",
        "model",
        {"X-A": "1"},
    )
    assert (BadRequest.status, BadRequest.type) == (400, "invalid_request_error")
    assert BadRequest("m").status == 400


def test_explicit_code_replaces_default() -> None:
    assert AuthenticationError("m", code="missing_api_key").code == "missing_api_key"


def test_error_body_shape() -> None:
    assert json.loads(error_body("msg", "invalid_request_error")) == {
        "error": {"message": "msg", "type": "invalid_request_error", "param": None, "code": None}
    }
    assert json.loads(error_body("m", "t", "model", "c")) == {
        "error": {"message": "m", "type": "t", "param": "model", "code": "c"}
    }


def test_error_body_escapes_message() -> None:
    message = 'quote " backslash \\ newline \n unicode é </script>'
    assert json.loads(error_body(message, "t"))["error"]["message"] == message


def test_error_response_headers_and_type() -> None:
    response = error_response(RateLimited("slow down", headers={"Retry-After": "3"}))
    assert response.status == 429
    assert response.content_type == "application/json"
    assert response.headers["Retry-After"] == "3"


# --- the middleware, in a tiny app ---------------------------------------------------------------


async def raise_proxy_error(request: web.Request) -> web.Response:
    raise RateLimited("Too many", param="p", headers={"Retry-After": "7"})


async def raise_unexpected(request: web.Request) -> web.Response:
    raise RuntimeError("secret internals sk-abcdef123456")


async def read_body(request: web.Request) -> web.Response:
    return web.Response(text=str(len(await request.read())))


async def raise_http_bad_request(request: web.Request) -> web.Response:
    raise web.HTTPBadRequest(text="plain aiohttp 400")


async def raise_http_redirect(request: web.Request) -> web.Response:
    raise web.HTTPFound("/elsewhere")


async def ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


@pytest.fixture
async def client(aiohttp_client: Any) -> Any:
    app = web.Application(client_max_size=1024, middlewares=[error_middleware])
    app.router.add_get("/proxy-error", raise_proxy_error)
    app.router.add_get("/boom", raise_unexpected)
    app.router.add_post("/upload", read_body)
    app.router.add_get("/http-400", raise_http_bad_request)
    app.router.add_get("/redirect", raise_http_redirect)
    app.router.add_get("/ok", ok)
    return await aiohttp_client(app)


async def test_success_passes_through(client: Any) -> None:
    response = await client.get("/ok")
    assert response.status == 200 and await response.json() == {"ok": True}


async def test_renders_proxy_error(client: Any) -> None:
    response = await client.get("/proxy-error")
    error = await assert_openai_error(response, 429, "rate_limit_exceeded")
    assert error == {
        "message": "Too many",
        "type": "rate_limit_error",
        "param": "p",
        "code": "rate_limit_exceeded",
    }
    assert response.headers["Retry-After"] == "7"


async def test_unknown_route_is_openai_404(client: Any) -> None:
    response = await client.get("/v1/nope")
    error = await assert_openai_error(response, 404, "not_found")
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "Unknown route: GET /v1/nope"


async def test_wrong_method_is_405_with_allow(client: Any) -> None:
    response = await client.get("/upload")
    error = await assert_openai_error(response, 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
    assert "GET" in error["message"] and "POST" in error["message"]


async def test_body_over_client_max_size_is_413(client: Any) -> None:
    small = await client.post("/upload", data=b"x" * 1000)
    assert small.status == 200 and await small.text() == "1000"
    response = await client.post("/upload", data=b"x" * 4096)
    error = await assert_openai_error(response, 413, "request_too_large")
    assert error["message"].startswith("Request body too large")
    assert "1024" in error["message"]


async def test_other_http_error_keeps_status_and_text(client: Any) -> None:
    error = await assert_openai_error(await client.get("/http-400"), 400)
    assert error["message"] == "plain aiohttp 400"
    assert error["code"] is None and error["type"] == "invalid_request_error"


async def test_redirect_is_not_an_error(client: Any) -> None:
    response = await client.get("/redirect", allow_redirects=False)
    assert response.status == 302
    assert response.headers["Location"] == "/elsewhere"


async def test_unexpected_exception_is_generic_500_and_logged(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="aioproxy"):
        response = await client.get("/boom")
        error = await assert_openai_error(response, 500, "internal_error")
    assert error["type"] == "server_error"
    assert "RuntimeError" not in error["message"] and "sk-" not in error["message"]
    assert error["message"] == "The proxy failed unexpectedly; the error was logged."
    [record] = [r for r in caplog.records if r.name == "aioproxy"]
    assert record.levelno == logging.ERROR
    assert "GET /boom" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


def test_a_kind_of_failure_declared_in_its_class_line_or_body() -> None:
    class Gone(ProxyError, status=410, type="invalid_request_error", code="gone"):
        pass

    class Older(ProxyError):  # the class attributes still work
        status = 409
        type = "conflict"

    class Faded(Gone, code="faded"):
        pass

    assert (Gone.status, Gone.type, Gone.default_code) == (410, "invalid_request_error", "gone")
    assert (Faded.status, Faded.default_code, Faded("x").code) == (410, "faded", "faded")
    assert (Older.status, Older.type, Older("x").code) == (409, "conflict", None)
    assert (ModelNotFound.status, ModelNotFound.type, ModelNotFound("m").code) == (
        404,
        "invalid_request_error",
        "model_not_found",
    )
