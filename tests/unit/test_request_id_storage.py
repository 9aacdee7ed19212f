"""The request id is kept in the request's own storage: what ``request[REQUEST_ID]`` reads."""

from __future__ import annotations

from aiohttp.test_utils import make_mocked_request

from aioproxy.request_ids import HEADER, REQUEST_ID, request_id


def test_a_sane_client_id_is_kept_and_read_back_the_same() -> None:
    request = make_mocked_request("POST", "/v1/chat/completions", headers={HEADER: "abc-1"})
    assert request_id(request) == "abc-1"
    assert request[REQUEST_ID] == "abc-1"
    assert request_id(request) == "abc-1"


def test_a_made_id_is_made_once() -> None:
    request = make_mocked_request("POST", "/v1/chat/completions", headers={HEADER: "\x00bad"})
    made = request_id(request)
    assert made.startswith("req_") and made != "\x00bad"
    assert request[REQUEST_ID] == made
    assert request_id(request) == made


def test_an_id_set_through_the_request_is_the_one_read() -> None:
    request = make_mocked_request("GET", "/v1/models")
    request[REQUEST_ID] = "set-before"
    assert request_id(request) == "set-before"
