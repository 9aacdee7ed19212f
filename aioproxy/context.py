"""What one request carries through the hooks: the caller, the chosen deployment, the body."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from .config import Price, Secret, Timeouts
from .errors import BadRequest
from .fields import raw_fields
from .request_ids import HEADER as REQUEST_ID_HEADER
from .request_ids import request_id
from .routes import Kind

__all__ = [
    "CACHE_ANSWERS",
    "FAILED_ATTEMPTS",
    "STOPPED_ATTEMPT",
    "STREAM_FILTER",
    "STREAM_RECORDER",
    "Call",
    "Deployment",
    "Principal",
]

# ``call.state[STREAM_FILTER]``: a function a before_request hook may set, given a streamed
# StreamReply and returning the one the client gets (e.g. without a chunk the plugin asked for).
STREAM_FILTER = "aioproxy.stream_filter"
# ``call.state[RETRIES]``: ``[retries, fallbacks]`` the dispatcher made (absent: none), for the
# request log. Only a request tried more than once pays for it.
RETRIES = "aioproxy.retries"
# ``call.state[FAILED_ATTEMPTS]``: ``[(deployment, status), ...]``, the upstream attempts that
# failed (``status`` as ``after_attempt`` hears it, but STOPPED_ATTEMPT for one the gateway's
# stop cut), in order (absent: none), for the observer to count in its batch. Only a request
# with a failed attempt pays for it.
FAILED_ATTEMPTS = "aioproxy.failed_attempts"
# The status an attempt the gateway's stop cut is counted with (aioproxy_upstream_requests_total):
# one no upstream sends, so that alerts on upstreams' 503s do not fire at every rolling restart.
STOPPED_ATTEMPT = "shutdown"
# ``call.state[STREAM_RECORDER]``: likewise, given the StreamReply the client gets (after
# STREAM_FILTER), returning one that reads along (the response cache keeps a copy).
STREAM_RECORDER = "aioproxy.stream_recorder"
# ``call.state[CACHE_ANSWERS]``: set (at map_model) by a plugin that may answer the call from a
# store, without the upstream (the response cache): an async function of the call, whether it
# will (its lookup read once). The limits ask it before refusing a request for its tokens
# (tpm) alone: an answer from the cache spends none.
CACHE_ANSWERS = "aioproxy.cache_answers"

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode


def _decode(raw: bytes | msgspec.Raw, field: str | None) -> Any:
    """Decode what the core kept raw; the values it never looked at can still be out of range
    (1e999999, 5,000-digit integers) or nested too deep, and that is the client's error."""
    try:
        return _decode_any(raw)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        where = f"'{field}'" if field else "the request body"
        problem = (
            "is nested too deeply" if isinstance(exc, RecursionError) else f"cannot be read: {exc}"
        )
        raise BadRequest(f"{where} {problem}", param=field, code="invalid_value") from None


class Principal(msgspec.Struct, frozen=True):
    """Who is calling: the key's name and the model names it may use (``None``: all).

    ``id`` is the credential's stable identity (a digest of the key): what owns stored data.
    Names are labels an operator may reuse or renumber, so they never own anything.
    ``team_name`` is the team's label where it is logged; left out, it is ``team``, so a
    plugin's principal that sets only ``team`` (all it could set before there were names)
    keeps its team in the access log.
    """

    name: str
    models: frozenset[str] | None = None
    is_master: bool = False
    id: str = ""
    team: str | None = None  # the team's id, for a key in a team
    team_name: str | None = None  # its name (an operator's label, as ``name`` is the key's)
    # What enforcement needs, set by the plugin that authenticated the key (aioproxy.control's
    # KeyLimits for database keys); None: no limit of that plugin's applies.
    limits: Any = None

    def __post_init__(self) -> None:
        if self.team_name is None and self.team is not None:
            msgspec.structs.force_setattr(self, "team_name", self.team)  # frozen: set once here

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


ANONYMOUS = Principal("anonymous", id="anonymous")


class Deployment(msgspec.Struct, frozen=True, kw_only=True):
    """A real model behind a name: which provider serves it, as what, where and with which key."""

    name: str
    provider: str
    model: str
    api_base: str | None = None
    api_key: Secret | None = None
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    timeouts: Timeouts | None = None
    headers: dict[str, Secret] = {}
    settings: dict[str, Any] = {}
    # The endpoint kinds its upstream serves itself (None: all its provider implements); the
    # gateway bridges the others onto chat completions.
    endpoints: frozenset[Kind] | None = None

    price: Price | None = None  # USD per million tokens; None: the bundled price table's
    reasoning: bool = False  # takes reasoning_effort: the Messages bridge maps thinking onto it
    # Whether calling it reaches an upstream (False: the response cache's replay of a hit): the
    # attempt hooks run for those only, so no plugin counts or traces a hit as an attempt.
    upstream: bool = True

    id: str = ""  # unique among the app's deployments; config ones are "<name>#<n>"

    @property
    def key(self) -> str:
        """What routing state is kept under: ``id``, else what the deployment points at."""
        return self.id or f"{self.provider}:{self.model}@{self.api_base or ''}"

    def describe(self) -> str:
        """How error messages name the deployment: never with its key."""
        return f"{self.name} ({self.provider}:{self.model})"


class Call:
    """One proxied request, as hooks and providers see it.

    The body is kept as its top-level fields, each the raw JSON bytes the client sent, so that a
    provider forwarding it re-encodes nothing but ``model``. ``json()`` decodes it all on demand.
    """

    __slots__ = (
        "_json",
        "_request_id",
        "fields",
        "kind",
        "model",
        "principal",
        "request",
        "routed_to",
        "started",
        "state",
        "stream",
        "upstream_headers",
        "upstream_request_id",
    )

    def __init__(
        self,
        kind: Kind,
        request: web.Request,
        principal: Principal,
        model: str,
        fields: dict[str, msgspec.Raw],
        stream: bool,
    ) -> None:
        self.kind = kind
        self.request = request
        self.principal = principal
        self.model = model
        # The deployment answering the call, None until it is routed: :attr:`deployment`
        # without its check, for code that handles both (an attribute: no call to read it).
        # Read only: ``route_to`` routes a call (it also sets the body's model).
        self.routed_to: Deployment | None = None
        self.fields = fields
        self.stream = stream
        self.state: dict[str, Any] = {}  # for plugins to share per-request data
        self.started = time.monotonic()
        # Headers the gateway and plugins send upstream on the provider's call (lower-case
        # names; the deployment's own headers and key win over them): the request id, a
        # trace's traceparent.
        self._request_id = request_id(request)  # fixed once read: kept for the request log
        self.upstream_headers: dict[str, str] = {REQUEST_ID_HEADER: self._request_id}
        # The upstream's own id for its answer (its x-request-id or request-id), for logs.
        self.upstream_request_id: str | None = None
        self._json: dict[str, Any] | None = None

    @property
    def request_id(self) -> str:
        """The request's id (the client's ``x-request-id`` when sane), as every answer carries."""
        return self._request_id

    @property
    def deployment(self) -> Deployment:
        """The deployment answering the call: set before any provider or ``before_request``
        hook sees it. RuntimeError before routing (see :attr:`routed`)."""
        deployment = self.routed_to
        if deployment is None:
            raise RuntimeError("call not routed yet")
        return deployment

    @property
    def routed(self) -> bool:
        """Whether a deployment was chosen: hooks that may see an unrouted call (``map_model``,
        ``on_error``) check it before reading :attr:`deployment`."""
        return self.routed_to is not None

    def for_chat(self, body: dict[str, Any]) -> Call:
        """A chat-completions Call carrying ``body``, for the same client, deployment and state
        (what the Responses and legacy completions bridges send on)."""
        fields = raw_fields(body)
        fields["model"] = msgspec.Raw(_encode(self.model))
        bridged = Call(
            Kind.CHAT_COMPLETIONS, self.request, self.principal, self.model, fields, self.stream
        )
        bridged.state = self.state  # one request: plugins' notes stay shared
        bridged.started = self.started
        bridged.upstream_headers = self.upstream_headers  # one request: one id, one trace
        if self.routed_to is not None:
            bridged.route_to(self.routed_to)
        return bridged

    def body_size(self) -> int:
        """The body's size in bytes, about (its fields' raw bytes, without the keys)."""
        return sum(map(len, self.fields.values()))

    def get(self, name: str, default: Any = None) -> Any:
        """The decoded value of one top-level body field (400 if it cannot be decoded)."""
        raw = self.fields.get(name)
        return default if raw is None else _decode(raw, name)

    def set(self, name: str, value: Any) -> None:
        """Replace (or add) one top-level body field."""
        self.fields[name] = msgspec.Raw(_encode(value))
        self._json = None

    def pop(self, name: str) -> None:
        if self.fields.pop(name, None) is not None:
            self._json = None

    def json(self) -> dict[str, Any]:
        """The whole body decoded, with ``model`` as the upstream model id. Cached; do not mutate."""
        if self._json is None:
            self._json = _decode(self.body(), None)
        return self._json

    def route_to(self, deployment: Deployment) -> None:
        """Send this call to ``deployment``: the body's ``model`` becomes its upstream model id."""
        self.routed_to = deployment
        self.fields["model"] = msgspec.Raw(_encode(deployment.model))
        self._json = None

    def body(self) -> bytes:
        """The body to send upstream: the client's fields as sent, bar ``model``.

        Each value is the client's raw bytes (msgspec.Raw), so encoding is little more than a
        copy: one ``model`` key and no dropped field, whatever the client's bytes held (a
        duplicate key, an escaped name), by construction.
        """
        return _encode(self.fields)
