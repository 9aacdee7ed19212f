"""Request ids: the client's own ``x-request-id`` when it is sane, else a new one, on every answer.

The id is read (or made) once per request, the first time something asks for it, and kept in
the request: the providers send it upstream, the access log and traces carry it, and the
response's ``on_response_prepare`` signal puts it on every answer, errors and streams included.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets

from aiohttp import web

from ._aiohttp import request_state
from .config import Config
from .masking import app_secrets, is_keylike

__all__ = ["HEADER", "REQUEST_ID", "is_sane", "new_request_id", "request_id", "set_header"]

HEADER = "x-request-id"
REQUEST_ID = web.RequestKey("aioproxy.request_id", str)  # where the request keeps its id
_MAX_LENGTH = 128


def is_sane(value: str) -> bool:
    """1 to 128 printable ASCII characters, nothing key-like among them: safe to log, trace,
    forward and send back (a client that pastes its key into the header gets a new id)."""
    return (
        0 < len(value) <= _MAX_LENGTH
        and value.isascii()
        and value.isprintable()
        and not is_keylike(value)
    )


class _Ids:
    """A random prefix per process and a counter: unique across workers and restarts, and
    about ten times cheaper than a uuid4 per request."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = "req_" + secrets.token_hex(8)
        self.counter = itertools.count(1)


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reset)  # forked workers must not share the prefix


def _holds_a_secret(request: web.BaseRequest, value: str) -> bool:
    """Whether ``value`` holds a secret of the app's config (a key not shaped like one)."""
    secrets = app_secrets(request)
    return secrets is not None and secrets.search(value) is not None


_MIN_SECRET = 8  # shorter values are no key worth the name, and would match ordinary ids


def secrets_pattern(config: Config) -> re.Pattern[str] | None:
    """The config's keys as sent (the master key, config keys, upstream keys), as one pattern
    to look for in a client's id. Header values are not among them: many are no secret (an API
    version, an app name) and would match ordinary ids."""
    keys = {str(config.auth.master_key or "")}
    keys.update(str(entry.key) for entry in config.auth.keys)
    keys.update(str(model.api_key or "") for model in config.models)
    keys = {key for key in keys if len(key) >= _MIN_SECRET}
    if not keys:
        return None
    return re.compile("|".join(map(re.escape, sorted(keys, key=len, reverse=True))))


def new_request_id() -> str:
    return f"{_ids.prefix}{next(_ids.counter):08x}"


def request_id(request: web.BaseRequest) -> str:
    """The request's id: read or made the first time it is asked for, the same thereafter."""
    state = request_state(request)
    rid: str | None = state.get(REQUEST_ID)
    if rid is None:
        given = request.headers.get(HEADER)
        rid = (
            given
            if given is not None and is_sane(given) and not _holds_a_secret(request, given)
            else new_request_id()
        )
        state[REQUEST_ID] = rid
    return rid


async def set_header(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: every answer carries the request's id."""
    response.headers[HEADER] = request_id(request)
