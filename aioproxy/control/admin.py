"""The admin API: keys, teams, spend and the request log, for the master key and admin keys.

Every change is one transaction that also moves the change watermark; this instance's key cache
reloads before the answer, the others' within ``[database] poll_interval``.
"""

from __future__ import annotations

import functools
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, ParamSpec, TypeVar

import msgspec
import sqlalchemy as sa
from aiohttp import web

from ..builtins.config_auth import key_id, presented_key
from ..config import Config
from ..errors import AuthenticationError, BadRequest, NotFound, PermissionDenied, ProxyError
from ..keys import workers_key
from . import rollup, schema
from .cache import as_dict
from .engine import driver_message
from .meters import Meter, spend_now
from .plane import ControlPlane, plane_key
from .records import COUNTED, KeyEntry, TeamEntry, digest_of, parse_duration, period_end, rfc3339
from .validation import KEY_FIELDS, TEAM_FIELDS, Check, read_fields

__all__ = ["ADMIN_VOUCHED", "admin_routes"]

log = logging.getLogger("aioproxy")

_encode = msgspec.json.Encoder().encode
_SECRET_BYTES = 32  # 43 url-safe characters after "sk-"
_MAX_ROWS = 1000
_DIGITS = re.compile(r"[0-9]{1,9}")
_Entry = TypeVar("_Entry", KeyEntry, TeamEntry)


# ``request[ADMIN_VOUCHED]``: a caller that authorised the request itself (the dashboard, for a
# signed-in operator) sets it, and the handlers serve it without an API key.
ADMIN_VOUCHED = web.RequestKey("aioproxy.admin_vouched", bool)


_Args = ParamSpec("_Args")


def _database_errors(
    handler: Callable[_Args, Awaitable[web.Response]],
) -> Callable[_Args, Awaitable[web.Response]]:
    """``handler`` with the database's failures answered in OpenAI's shape, not as a 500 with
    a traceback: 409 when a change met another instance's (the team it names was deleted
    meanwhile), else 503 while the database is unreachable."""

    @functools.wraps(handler)
    async def handle(*args: _Args.args, **kwargs: _Args.kwargs) -> web.Response:
        try:
            return await handler(*args, **kwargs)
        except ConnectionResetError:
            raise  # the client went away (an OSError too): the error middleware knows it
        except sa.exc.IntegrityError:
            raise ProxyError(
                "The change conflicts with one made meanwhile: read the current state and retry",
                status=409,
                type="invalid_request_error",
                code="conflict",
            ) from None
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            log.warning("admin API: the database failed: %s", driver_message(exc))
            raise ProxyError(
                "The database is unavailable: try again later",
                status=503,
                type="server_error",
                code="database_unavailable",
            ) from None

    return handle


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_encode(data), status=status, content_type="application/json")


def _require_admin(request: web.Request) -> ControlPlane:
    """The control plane, if the caller holds the master key or an admin key: else 401/403."""
    plane = request.app[plane_key]
    if request.get(ADMIN_VOUCHED):
        return plane
    key = presented_key(request)
    master = plane.config.auth.master_key
    # Without a master key, only an admin key made with one earlier opens the admin API: say
    # so, rather than call a key invalid that the models accept (no auth configured).
    unset = "" if master else " (no master key is configured: set [auth] master_key)"
    if key is None:
        raise AuthenticationError("Missing API key" + unset, code="missing_api_key")
    if master and hmac.compare_digest(key.encode(), master.encode()):
        return plane
    principal = plane.cache.principals.get(digest_of(key))
    if principal is not None:
        entry: KeyEntry = principal.limits.key
        now = plane.clock.time()
        if entry.disabled or (entry.expires_at is not None and now >= entry.expires_at):
            raise AuthenticationError("This API key is disabled or expired", code="invalid_api_key")
        if entry.role == "admin":
            return plane
    elif not any(hmac.compare_digest(key.encode(), v.key.encode()) for v in plane.config.auth.keys):
        raise AuthenticationError("Invalid API key" + unset, code="invalid_api_key")
    raise PermissionDenied(
        "The admin API needs the master key or a key with role 'admin'", code="admin_only"
    )


def _limits_object(entry: KeyEntry | TeamEntry, meter: Meter | None, now: float) -> dict[str, Any]:
    """What a key's and a team's objects share: their models, limits, budget and spend."""
    spend, resets_at = spend_now(entry, meter or Meter(), now)
    return {
        "models": entry.models,
        "rpm": entry.rpm,
        "tpm": entry.tpm,
        "max_parallel": entry.max_parallel,
        "max_budget": entry.max_budget,
        "budget_duration": entry.budget_duration,
        "budget_resets_at": rfc3339(resets_at),
        "spend": spend,
        "total_spend": entry.total_spend,
    }


def key_object(entry: KeyEntry, plane: ControlPlane) -> dict[str, Any]:
    meter = plane.cache.key_meters.get(entry.id)
    return {
        "id": entry.id,
        "object": "key",
        "source": "database",
        "name": entry.name,
        "key_prefix": entry.key_prefix,
        "team": entry.team_id,
        **_limits_object(entry, meter, plane.clock.time()),
        "expires_at": rfc3339(entry.expires_at),
        "disabled": entry.disabled,
        "role": entry.role,
        "metadata": entry.metadata,
        "created_at": rfc3339(entry.created_at),
        "last_used_at": rfc3339(entry.last_used_at),
    }


# A config key's object has a database key's fields (a script reads either alike), null where
# the file has no such setting: no prefix (part of a secret the operator chose), no limits, and
# no spend figures (its requests' spend is in /admin/spend, grouped by its id).
_CONFIG_KEY_NULLS = dict.fromkeys(
    (
        "key_prefix",
        "team",
        "rpm",
        "tpm",
        "max_parallel",
        "max_budget",
        "budget_duration",
        "budget_resets_at",
        "spend",
        "total_spend",
        "expires_at",
        "metadata",
        "created_at",
        "last_used_at",
    )
)


def _config_keys(config: Config) -> list[dict[str, Any]]:
    """The TOML file's keys, read-only."""
    return [
        {
            **_CONFIG_KEY_NULLS,
            "id": key_id(vkey.key),
            "object": "key",
            "source": "config",
            "name": vkey.name or f"key-{i}",
            "models": vkey.models,
            "disabled": False,
            "role": "user",
        }
        for i, vkey in enumerate(config.auth.keys)
    ]


def team_object(entry: TeamEntry, plane: ControlPlane) -> dict[str, Any]:
    meter = plane.cache.team_meters.get(entry.id)
    return {
        "id": entry.id,
        "object": "team",
        "name": entry.name,
        **_limits_object(entry, meter, plane.clock.time()),
        "metadata": entry.metadata,
        "created_at": rfc3339(entry.created_at),
    }


async def _change(plane: ControlPlane, *statements: sa.Executable) -> int:
    """Run ``statements`` and move the watermark, in one transaction; reload the cache.
    Returns the rows the first statement touched."""
    async with plane.engine.begin() as connection:
        touched = (await connection.execute(statements[0])).rowcount
        for statement in statements[1:]:
            await connection.execute(statement)
        await connection.execute(sa.update(schema.state).values(version=schema.state.c.version + 1))
    await plane.cache.reload()
    if plane.announce_change is not None:  # the other instances reload now, not at their poll
        await plane.announce_change()
    return touched


async def _update(plane: ControlPlane, table: sa.Table, id_: str, fields: dict[str, Any]) -> None:
    if fields:
        await _change(plane, sa.update(table).where(table.c.id == id_).values(_columns(fields)))


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    columns = dict(fields)
    if "team" in columns:
        columns["team_id"] = columns.pop("team")
    return columns


async def _new_period(
    plane: ControlPlane, entry: KeyEntry | TeamEntry, fields: dict[str, Any]
) -> dict[str, Any]:
    """``fields`` with what a change of ``budget_duration`` does to the budget's period.

    The same duration again (the dashboard's edit form sends every limit) changes nothing: it
    used to restart the period at a spend of 0, so any edit freed the budget. A new duration
    starts the period holding now, carrying the spend so far (an edit never frees budget); none
    makes the budget one period for ever, whose spend is everything spent."""
    if "budget_duration" not in fields:
        return fields
    duration = fields["budget_duration"]
    if duration == entry.budget_duration:
        return {name: value for name, value in fields.items() if name != "budget_duration"}
    await _flush(plane)  # this instance's spend so far, written in the period it belongs to
    meters = plane.cache.key_meters if isinstance(entry, KeyEntry) else plane.cache.team_meters
    now = plane.clock.time()
    spent, _ = spend_now(entry, meters.get(entry.id) or Meter(), now)
    ends = period_end(entry.created_at, parse_duration(duration) if duration else None, now)
    spend = spent if duration else entry.total_spend
    return {**fields, "budget_resets_at": ends, "spend": spend}


def _check_team(plane: ControlPlane, fields: dict[str, Any]) -> None:
    team = fields.get("team")
    if team is not None and team not in plane.cache.teams:
        raise BadRequest("'team' names no team", param="team", code="invalid_value")


def _check_counted_once(request: web.Request, plane: ControlPlane, fields: dict[str, Any]) -> None:
    """Under ``--workers N`` without ``[state] redis_url`` each worker counts on its own, so a
    limit set now would hold N times over: refused, as run.py refuses to start with one."""
    workers = request.app.get(workers_key, 1)
    if workers <= 1 or plane.shared is not None:
        return
    for name in COUNTED:
        if fields.get(name) is not None:
            raise ProxyError(
                f"'{name}' would be counted by each of the {workers} workers on its own (held "
                f"{workers} times over): limits under --workers need [state] redis_url",
                param=name,
                code="limits_need_shared_state",
                status=409,
                type="invalid_request_error",
            )


@_database_errors
async def create_key(request: web.Request) -> web.Response:
    plane = _require_admin(request)
    fields = read_fields(await request.read(), KEY_FIELDS, required=("name",))
    _check_team(plane, fields)
    _check_counted_once(request, plane, fields)
    secret = "sk-" + secrets.token_urlsafe(_SECRET_BYTES)
    id_ = "key_" + secrets.token_hex(12)
    row = {
        "id": id_,
        "digest": digest_of(secret),
        "key_prefix": secret[:7],
        "created_at": plane.clock.time(),
        **_columns(fields),
    }
    await _change(plane, sa.insert(schema.keys).values(row))
    return _json({**key_object(plane.cache.keys[id_], plane), "key": secret}, 201)


async def list_keys(request: web.Request) -> web.Response:
    plane = _require_admin(request)
    data = [key_object(entry, plane) for entry in plane.cache.keys.values()]
    return _json({"object": "list", "data": [*data, *_config_keys(plane.config)]})


def _found(entries: Mapping[str, _Entry], request: web.Request, noun: str) -> _Entry:
    """The key or team the route's ``{id}`` names: else a 404 ``{noun}_not_found``."""
    entry = entries.get(request.match_info["id"])
    if entry is None:
        raise NotFound(f"No {noun} has this id", param="id", code=f"{noun}_not_found")
    return entry


def _config_key(plane: ControlPlane, request: web.Request) -> dict[str, Any] | None:
    """The config file's key the route's ``{id}`` names, if it names one."""
    id_ = request.match_info["id"]
    if id_ in plane.cache.keys:
        return None
    return next((key for key in _config_keys(plane.config) if key["id"] == id_), None)


def _key(plane: ControlPlane, request: web.Request) -> KeyEntry:
    """The database key to change or delete: a config key is read-only (403)."""
    if _config_key(plane, request) is not None:
        raise PermissionDenied(
            "This key is in the config file: change it there", param="id", code="read_only"
        )
    return _found(plane.cache.keys, request, "key")


async def get_key(request: web.Request) -> web.Response:
    """A key: the config file's keys are shown as listed (read-only, not refused)."""
    plane = _require_admin(request)
    config_key = _config_key(plane, request)
    if config_key is not None:
        return _json(config_key)
    return _json(key_object(_found(plane.cache.keys, request, "key"), plane))


@_database_errors
async def create_team(request: web.Request) -> web.Response:
    plane = _require_admin(request)
    fields = read_fields(await request.read(), TEAM_FIELDS, required=("name",))
    _check_counted_once(request, plane, fields)
    id_ = "team_" + secrets.token_hex(12)
    row = {"id": id_, "created_at": plane.clock.time(), **_columns(fields)}
    await _change(plane, sa.insert(schema.teams).values(row))
    return _json(team_object(plane.cache.teams[id_], plane), 201)


async def list_teams(request: web.Request) -> web.Response:
    plane = _require_admin(request)
    return _json(
        {
            "object": "list",
            "data": [team_object(entry, plane) for entry in plane.cache.teams.values()],
        }
    )


def _team(plane: ControlPlane, request: web.Request) -> TeamEntry:
    return _found(plane.cache.teams, request, "team")


def _check_empty(plane: ControlPlane, entry: TeamEntry) -> None:
    if any(key.team_id == entry.id for key in plane.cache.keys.values()):
        raise ProxyError(
            "The team still has keys: move or delete them first",
            param="id",
            code="team_not_empty",
            status=409,
            type="invalid_request_error",
        )


@dataclass(frozen=True)
class _Item(Generic[_Entry]):
    """What ``/admin/keys/{id}`` and ``/admin/teams/{id}`` do alike: the entry the route's id
    names, shown, changed (fields of ``fields``) or deleted."""

    noun: str
    table: sa.Table
    fields: Mapping[str, Check]
    find: Callable[[ControlPlane, web.Request], _Entry]
    show: Callable[[_Entry, ControlPlane], dict[str, Any]]
    check: Callable[[ControlPlane, dict[str, Any]], None]  # the fields of a change
    check_delete: Callable[[ControlPlane, _Entry], None]

    async def get(self, request: web.Request) -> web.Response:
        plane = _require_admin(request)
        return _json(self.show(self.find(plane, request), plane))

    @_database_errors
    async def update(self, request: web.Request) -> web.Response:
        plane = _require_admin(request)
        entry = self.find(plane, request)
        fields = read_fields(await request.read(), self.fields)
        self.check(plane, fields)
        _check_counted_once(request, plane, fields)
        await _update(plane, self.table, entry.id, await _new_period(plane, entry, fields))
        return _json(self.show(self.find(plane, request), plane))

    @_database_errors
    async def delete(self, request: web.Request) -> web.Response:
        plane = _require_admin(request)
        entry = self.find(plane, request)
        self.check_delete(plane, entry)
        await _change(plane, sa.delete(self.table).where(self.table.c.id == entry.id))
        return _json({"id": entry.id, "object": self.noun, "deleted": True})


def _nothing(plane: ControlPlane, fields: Any) -> None:
    pass


_KEY = _Item("key", schema.keys, KEY_FIELDS, _key, key_object, _check_team, _nothing)
_TEAM = _Item("team", schema.teams, TEAM_FIELDS, _team, team_object, _nothing, _check_empty)
update_key, delete_key = _KEY.update, _KEY.delete
get_team, update_team, delete_team = _TEAM.get, _TEAM.update, _TEAM.delete


def _time_param(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    text = value if "T" in value else value + "T00:00:00+00:00"
    try:
        moment = datetime.fromisoformat(text)  # 3.11 reads "Z"
    except ValueError:
        raise BadRequest(
            f"'{name}' must be a date or an RFC 3339 timestamp", param=name, code="invalid_value"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


async def _flush(plane: ControlPlane) -> None:
    """Write what this instance served so far, so that the answer counts it. If that fails,
    the rows stay queued for the writer's retries and the answer is what is written: a batch
    the database refuses must not take the admin API down with the log."""
    try:
        await plane.log.flush_shielded()
    except Exception as exc:  # noqa: BLE001 - any driver error: the writer retries it
        log.warning(
            "admin API: answering without the rows not yet written: %s", driver_message(exc)
        )


@_database_errors
async def spend(request: web.Request) -> web.Response:
    plane = _require_admin(request)
    group_by = request.query.get("group_by", "key")
    if group_by not in rollup.GROUPS:
        raise BadRequest(
            "'group_by' must be key, team, model or day", param="group_by", code="invalid_value"
        )
    start, end = _time_param(request, "start"), _time_param(request, "end")
    await _flush(plane)
    query = rollup.spend_query(group_by, start, end)
    async with plane.engine.connect() as connection:
        rows = [as_dict(row) for row in (await connection.execute(query)).all()]
    return _json(
        {
            "object": "list",
            "data": [
                {
                    **row,
                    "requests": int(row["requests"]),
                    "input_tokens": int(row["input_tokens"]),
                    "output_tokens": int(row["output_tokens"]),
                    "cost": float(row["cost"]),
                }
                for row in rows
            ],
        }
    )


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    # ASCII digits only: "²" is a digit to str.isdigit(), and int() refuses it (a 500).
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        raise BadRequest(
            f"'{name}' must be a whole number from {low} to {high}",
            param=name,
            code="invalid_value",
        )
    return int(value)


def _text_param(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and "\x00" in value:  # PostgreSQL refuses a NUL in text (a 500)
        raise BadRequest(
            f"'{name}' must not hold a NUL character", param=name, code="invalid_value"
        )
    return value


@_database_errors
async def request_log(request: web.Request) -> web.Response:
    plane = _require_admin(request)
    limit = _int_param(request, "limit", 100, 1, _MAX_ROWS)
    await _flush(plane)
    table = schema.requests
    query = sa.select(table).order_by(table.c.time.desc(), table.c.seq.desc()).limit(limit)
    filters: dict[str, Callable[[str], Any]] = {
        "key": lambda v: table.c.key_id == v,
        "model": lambda v: table.c.model == v,
        "team": lambda v: table.c.team_id == v,
        "status": lambda v: table.c.status == _int_param(request, "status", 0, 100, 599),
    }
    for name, condition in filters.items():
        if (value := _text_param(request, name)) is not None:
            query = query.where(condition(value))
    async with plane.engine.connect() as connection:
        rows = [as_dict(row) for row in (await connection.execute(query)).all()]
    data = [
        {**{k: v for k, v in row.items() if k != "seq"}, "time": rfc3339(row["time"])}
        for row in rows
    ]
    return _json({"object": "list", "data": data})


def admin_routes() -> list[tuple[str, str, Callable[[web.Request], Any]]]:
    routes: list[tuple[str, str, Callable[[web.Request], Any]]] = []
    for path, create, list_all, show, item in (
        ("/admin/keys", create_key, list_keys, get_key, _KEY),
        ("/admin/teams", create_team, list_teams, get_team, _TEAM),
    ):
        routes += [
            ("POST", path, create),
            ("GET", path, list_all),
            ("GET", path + "/{id}", show),
            ("PATCH", path + "/{id}", item.update),
            ("DELETE", path + "/{id}", item.delete),
        ]
    return [*routes, ("GET", "/admin/spend", spend), ("GET", "/admin/requests", request_log)]
