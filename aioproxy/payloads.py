"""Request bodies: the few fields the core reads, checked, and the rest kept as sent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec

from ._aiohttp import BadHttpMessage, RequestPayloadError, read_arrived_body
from .context import Call
from .errors import BadRequest, PermissionDenied, ProxyError
from .routes import Kind

__all__ = ["decode_request", "read_body", "refuse_unless_allowed"]

_decode_fields = msgspec.json.Decoder(dict[str, msgspec.Raw]).decode
_decode_model = msgspec.json.Decoder(str).decode
_decode_stream = msgspec.json.Decoder(bool | None).decode


_ARRAY, _STRING, _OBJECT = ord("["), ord('"'), ord("{")

# Per kind: the body field that carries the input, whether it is required, and the JSON types
# (by first byte) it may have. Checked here so that a malformed request never reaches a provider.
_INPUT_FIELDS: dict[Kind, tuple[str, bool, tuple[int, ...], str]] = {
    Kind.CHAT_COMPLETIONS: ("messages", True, (_ARRAY,), "an array of messages"),
    Kind.COMPLETIONS: ("prompt", True, (_STRING, _ARRAY), "a string or an array"),
    Kind.EMBEDDINGS: ("input", True, (_STRING, _ARRAY), "a string or an array"),
    Kind.RESPONSES: ("input", False, (_STRING, _ARRAY), "a string or an array of items"),
    Kind.MESSAGES: ("messages", True, (_ARRAY,), "an array of messages"),
    Kind.COUNT_TOKENS: ("messages", True, (_ARRAY,), "an array of messages"),
}

_UNSTREAMED = (Kind.EMBEDDINGS, Kind.COUNT_TOKENS)  # kinds that have no stream

# Fields that other gateways read to redirect or re-key the upstream call (server-side request
# forgery). aioproxy never reads them, and drops them so that they never reach an upstream either.
_DROPPED_FIELDS = (
    "api_base",
    "base_url",
    "api_key",
    "api_version",
    "organization",
    "extra_headers",
)
_DROPPED = frozenset(_DROPPED_FIELDS)


def decode_request(
    body: bytes, kind: Kind = Kind.CHAT_COMPLETIONS, model: str | None = None
) -> tuple[dict[str, msgspec.Raw], str, bool]:
    """Split a request body into its raw top-level fields, and read ``model`` (unless the path
    gave it: ``model``, then the body's is not read) and ``stream``.

    Only what the core needs is decoded; every other field stays as the bytes the client sent.
    """
    fields = _fields_of(body)
    if model is None:
        model = _model_of(fields)
    return fields, model, _checked(fields, kind)


def _fields_of(body: bytes) -> dict[str, msgspec.Raw]:
    """The body's top-level fields, raw: 400 unless it is a UTF-8 JSON object."""
    if not body:
        raise BadRequest("The request body is empty; expected a JSON object")
    try:
        body.decode("utf-8")  # msgspec skips over fields it keeps raw; check them all here
    except UnicodeDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid UTF-8 (byte {exc.start})", code="invalid_encoding"
        ) from None
    try:
        return _decode_fields(body)
    except RecursionError:
        raise BadRequest("The request body is nested too deeply", code="invalid_json") from None
    except msgspec.ValidationError:
        raise BadRequest("The request body must be a JSON object", code="invalid_body") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None


def _checked(fields: dict[str, msgspec.Raw], kind: Kind) -> bool:
    """Whether the call streams, once ``stream`` and the kind's input field are checked (400
    if not as expected); the fields other gateways read to re-route are dropped."""
    raw_stream = fields.get("stream")
    stream = False
    if raw_stream is not None and kind not in _UNSTREAMED:
        try:
            stream = bool(_decode_stream(raw_stream))
        except msgspec.DecodeError:
            raise BadRequest(
                "'stream' must be a boolean", param="stream", code="invalid_type"
            ) from None
    field, required, types, expected = _INPUT_FIELDS[kind]
    raw_input = fields.get(field)
    if raw_input is None:
        if required:
            raise BadRequest(
                f"Missing required parameter: '{field}'",
                param=field,
                code="missing_required_parameter",
            )
    elif memoryview(raw_input)[0] not in types:
        raise BadRequest(f"'{field}' must be {expected}", param=field, code="invalid_type")
    if not _DROPPED.isdisjoint(fields):  # one C call for the usual body that has none of them
        for name in _DROPPED_FIELDS:
            fields.pop(name, None)
    return stream


def _model_of(fields: dict[str, msgspec.Raw]) -> str:
    raw_model = fields.get("model")
    if raw_model is None:
        raise BadRequest(
            "Missing required parameter: 'model'", param="model", code="missing_required_parameter"
        )
    try:
        model = _decode_model(raw_model)
    except msgspec.DecodeError:
        raise BadRequest("'model' must be a string", param="model", code="invalid_type") from None
    if not model:
        raise BadRequest("'model' must not be empty", param="model", code="invalid_value")
    return model


async def read_body(call: Call, body_timeout: float) -> None:
    """Read the body into ``call``, made before it with no fields and ``model`` the path's (Azure's
    deployment routes) or ``""`` (408 if it does not arrive within ``body_timeout``, 400 if its
    framing is broken or it is not a request of its kind). The call exists first so that a
    refusal here is still its key's call, which ``on_error`` hears (the request log's row): its
    ``model`` is set as soon as the body names it, its fields once all of them are checked."""
    request = call.request
    try:
        if request.content.is_eof():  # all of it came with the headers: nothing to wait for
            body = read_arrived_body(request)
        else:
            async with asyncio.timeout(body_timeout):
                body = await request.read()
    except TimeoutError:
        raise ProxyError(
            "The request body did not arrive in time",
            status=408,
            type="invalid_request_error",
            code="request_timeout",
        ) from None
    except (BadHttpMessage, RequestPayloadError):  # e.g. broken chunked framing (a
        # compressed body never gets here: aioproxy.ingress refuses it unread)
        raise BadRequest(
            "The request body could not be read (its framing is broken)",
            code="invalid_encoding",
        ) from None
    fields = _fields_of(body)
    if not call.model:  # else the path's
        call.model = _model_of(fields)
    call.stream = _checked(fields, call.kind)
    call.fields = fields


def refuse_unless_allowed(call: Call, allows: Callable[[Call, str], bool]) -> None:
    """403 for a model the principal may not use (``allows``: the one check every model a call
    reaches passes, see ``Dispatcher.allows``). Checked once the call exists, so the refusal's
    hooks (the request log's row) see it."""
    if not allows(call, call.model):
        raise PermissionDenied(f"This API key may not use the model '{call.model}'", param="model")
