"""Every aiohttp-internal import of aioproxy, in one place.

These names are not aiohttp's documented API: they may move between minor releases, which is
why pyproject pins ``aiohttp>=3.14,<3.15``. Upgrading aiohttp means checking this module (and
the tests of h1client.py and server.py) first. Elsewhere, import only ``aiohttp`` and
``aiohttp.web`` (plus the documented ``aiohttp.typedefs`` and ``aiohttp.test_utils``).
"""

import operator
from typing import Any

from aiohttp import web
from aiohttp.base_protocol import BaseProtocol  # h1client: the connection's flow control
from aiohttp.http import HttpResponseParser, RawResponseMessage  # h1client: the C parser
from aiohttp.http_exceptions import BadHttpMessage  # the body read: a malformed body
from aiohttp.streams import EMPTY_PAYLOAD  # h1client: an answer without a body
from aiohttp.web_protocol import ERROR as UNPARSED_MESSAGE  # server: a request not parsed
from aiohttp.web_protocol import RequestHandler, RequestPayloadError  # server, the body read
from aiohttp.web_request import BaseRequest  # server: malformed-request answers

__all__ = [
    "EMPTY_PAYLOAD",
    "UNPARSED_MESSAGE",
    "BadHttpMessage",
    "BaseProtocol",
    "BaseRequest",
    "HttpResponseParser",
    "RawResponseMessage",
    "RequestHandler",
    "RequestPayloadError",
    "peername",
    "read_arrived_body",
    "request_state",
]


def request_state(request: BaseRequest) -> dict[Any, Any]:
    """The dict behind ``request[key]``, to read with its ``get`` in C: the request's own ``get``
    and ``in`` are Mapping's, in Python, and raise and catch a KeyError for a key not there."""
    return request._state


# What aiohttp read of a request's peer (its connection's peer address, or what
# ``clone(remote=...)`` set), which ``request.remote`` turns into text on every read: the same
# object for each request of a connection, so a key to remember that text by (read in C).
peername: Any = operator.attrgetter("_transport_peername")


def read_arrived_body(request: BaseRequest) -> bytes:
    """``await request.read()`` for a body that has all arrived (its payload at EOF), without
    the coroutine and its loop: one read of the buffer, as ``read`` would find it (~100
    bytecodes a request less). Kept where ``read`` keeps it, so a later ``read`` (a plugin's)
    returns it; over ``client_max_size``, 413 as ``read`` refuses it."""
    if request._read_bytes is None:
        body = request.content.read_nowait()  # raises the payload's error, as readany does
        limit = request.client_max_size
        if limit and len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(limit)
        request._read_bytes = body
    return request._read_bytes
