"""What a finished request's record keeps while it waits in the request log's queue."""

from __future__ import annotations

import sys

from aiohttp.test_utils import make_mocked_request

from aioproxy import Call, Principal
from aioproxy.control.rows import Finished
from aioproxy.outcome import Outcome
from aioproxy.payloads import decode_request
from aioproxy.routes import Kind


def test_a_queued_request_keeps_no_view_of_its_body() -> None:
    """The body's ``user`` is a view of the request's whole body: the record keeps a copy, so
    a queue of records holds a few bytes each, not every prompt until the batch is written."""
    messages = b", ".join([b'{"role": "user", "content": "hello"}'] * 500)
    body = b'{"model": "m", "user": "end-user-7", "messages": [' + messages + b"]}"
    fields, model, stream = decode_request(body)
    call = Call(
        Kind.CHAT_COMPLETIONS,
        make_mocked_request("POST", "/v1/chat/completions"),
        Principal("alice"),
        model,
        fields,
        stream,
    )
    finished = Finished.of(call, Outcome(200, stream=False), 0.0)
    del call, fields
    assert sys.getrefcount(body) == 2  # ``body`` and getrefcount's own argument: nothing else
    assert bytes(finished.end_user or b"") == b'"end-user-7"'
