"""The dashboard's pages, server-rendered: each reads what it shows and hands it to a template.

Keys, teams, spend and the request log come through the admin API's own handlers (vouched for
by the session), so the pages show exactly what ``/admin/...`` answers.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp_jinja2
import msgspec
from aiohttp import web

from ..builtins.config_auth import key_id
from ..control import admin
from ..control.plane import ControlPlane, plane_key
from ..errors import NotFound, ProxyError
from ..keys import runtime_key
from . import queries
from .paths import ROOT, base_of
from .session import Session, sessions_key

points_key = web.AppKey("aioproxy.ui.points", queries.PointCache)

__all__ = ["PAGES", "points_key", "require_session"]

Page = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]
_GROUPS = ("key", "team", "model", "day")
_NAV = (
    ("", "Overview"),
    ("/models", "Models"),
    ("/keys", "Keys and teams"),
    ("/spend", "Spend"),
    ("/requests", "Requests"),
    ("/playground", "Playground"),
)


def require_session(request: web.Request) -> Session | None:
    return request.app[sessions_key].read(request)


def page(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A page for signed-in operators: others are sent to sign in, then back here."""

    async def handle(request: web.Request) -> web.StreamResponse:
        session = require_session(request)
        if session is None:
            target = quote(request.path_qs, safe="")
            raise web.HTTPFound(f"{base_of(request)}{ROOT}/signin?next={target}")
        return await handler(request, session)

    return handle


def render(
    request: web.Request, template: str, session: Session | None, **context: Any
) -> web.Response:
    base = base_of(request) + ROOT
    return aiohttp_jinja2.render_template(
        template,
        request,
        {
            "ui": base,
            "nav": [(base + path, label) for path, label in _NAV],
            "current": request.path,
            "session": session,
            **context,
        },
    )


def _plane(request: web.Request) -> ControlPlane:
    plane = request.app.get(plane_key)
    if plane is None:
        raise ProxyError(
            "The control plane (plugin 'database') is disabled", status=503, code="no_database"
        )
    return plane


async def _admin(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    query: Mapping[str, str],
) -> Any:
    """What an admin API handler answers to ``query`` (its blank fields left out), decoded."""
    clone = request.clone(rel_url=request.rel_url.with_query({k: v for k, v in query.items() if v}))
    clone[admin.ADMIN_VOUCHED] = True
    response = await handler(clone)
    assert isinstance(response, web.Response) and isinstance(response.body, bytes)
    return msgspec.json.decode(response.body)


def _names(plane: ControlPlane, *, teams: bool = True) -> dict[str, str]:
    """Key (and team) ids -> names, for the tables (the config's keys included)."""
    names = {entry.id: entry.name for entry in plane.cache.keys.values()}
    if teams:
        names.update((entry.id, entry.name) for entry in plane.cache.teams.values())
    names.update((key["id"], key["name"]) for key in admin._config_keys(plane.config))
    if plane.config.auth.master_key:
        names[key_id(plane.config.auth.master_key)] = "master"
    return names


# -- Overview -----------------------------------------------------------------------------------


async def overview(request: web.Request, session: Session) -> web.StreamResponse:
    plane = _plane(request)
    chosen = request.query.get("range", "24h")
    span, step = queries.RANGES.get(chosen, queries.RANGES["24h"])
    data = await queries.overview(plane, request.app[points_key], span, step)
    names = _names(plane)
    for row in data.top_keys:
        row["name"] = names.get(row["group"], row["group"] or "(none)")
    return render(
        request,
        "overview.html",
        session,
        ranges=list(queries.RANGES),
        chosen=chosen if chosen in queries.RANGES else "24h",
        data=data,
        series={
            "times": data.times,
            "requests": data.requests,
            "errors": data.errors,
            "latency_p50": data.latency_p50,
            "latency_p95": data.latency_p95,
            "ttft_p50": data.ttft_p50,
            "ttft_p95": data.ttft_p95,
            "input_tokens": data.input_tokens,
            "output_tokens": data.output_tokens,
            "cost": data.cost,
        },
    )


# -- Models -------------------------------------------------------------------------------------


async def models(request: web.Request, session: Session) -> web.StreamResponse:
    runtime = request.app[runtime_key]
    router = runtime.router
    wall_offset = time.time() - router.clock.now()
    rows = router.snapshot(runtime.deployments)
    table = []
    for name in runtime.deployments:
        policy = router.policy(name)
        deployments = []
        for row in (r for r in rows if r["model"] == name):
            finished = row["served"] + row["failed"]
            cooling = row["cooldown_remaining"]
            deployments.append(
                {
                    **row,
                    "state": "cooling down"
                    if cooling > 0
                    else "available"
                    if row["available"]
                    else "at its rate cap",
                    "cooling_until": _when(router.clock.now() + cooling + wall_offset)
                    if cooling > 0
                    else None,
                    "error_rate": row["failed"] / finished if finished else None,
                }
            )
        table.append({"name": name, "policy": policy, "deployments": deployments})
    return render(request, "models.html", session, models=table)


def _when(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


# -- Keys and teams -----------------------------------------------------------------------------


async def keys(request: web.Request, session: Session) -> web.StreamResponse:
    plane = _plane(request)
    key_list = (await _admin(request, admin.list_keys, {}))["data"]
    teams = (await _admin(request, admin.list_teams, {}))["data"]
    team_names = {team["id"]: team["name"] for team in teams}
    return render(
        request,
        "keys.html",
        session,
        keys=key_list,
        teams=teams,
        team_names=team_names,
        models=list(request.app[runtime_key].deployments),
        when=lambda text: text and text.replace("T", " ")[:19],
        plane=plane,
    )


# -- Spend --------------------------------------------------------------------------------------


def _spend_query(request: web.Request) -> dict[str, str]:
    group_by = request.query.get("group_by", "day")
    today = datetime.now(UTC).date()
    start = request.query.get("start", (today - timedelta(days=29)).isoformat())
    end = request.query.get("end", "")
    return {"group_by": group_by if group_by in _GROUPS else "day", "start": start, "end": end}


async def _spend_rows(request: web.Request) -> tuple[dict[str, str], list[dict[str, Any]]]:
    plane = _plane(request)
    query = _spend_query(request)
    rows: list[dict[str, Any]] = (await _admin(request, admin.spend, query))["data"]
    if query["group_by"] in ("key", "team"):
        names = _names(plane)
        for row in rows:
            row["label"] = names.get(row["group"], row["group"] or "(none)")
    else:
        for row in rows:
            row["label"] = row["group"] or "(none)"
    return query, rows


async def spend(request: web.Request, session: Session) -> web.StreamResponse:
    try:
        query, rows = await _spend_rows(request)
        error = None
    except ProxyError as exc:
        query, rows, error = _spend_query(request), [], exc.message
    return render(
        request,
        "spend.html",
        session,
        query=query,
        groups=_GROUPS,
        rows=rows,
        error=error,
        export=request.rel_url.with_path(f"{base_of(request)}{ROOT}/spend.csv").with_query(query),
        chart={
            "labels": [row["label"] for row in rows],
            "cost": [row["cost"] for row in rows],
            "requests": [row["requests"] for row in rows],
        },
        total=sum(row["cost"] for row in rows),
    )


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run as a formula."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


async def spend_csv(request: web.Request, session: Session) -> web.StreamResponse:
    query, rows = await _spend_rows(request)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [query["group_by"], "name", "requests", "input_tokens", "output_tokens", "cost"]
    )
    for row in rows:
        writer.writerow(
            _cell(v)
            for v in (
                row["group"],
                row["label"],
                row["requests"],
                row["input_tokens"],
                row["output_tokens"],
                f"{row['cost']:.6f}",
            )
        )
    name = f"aioproxy-spend-by-{query['group_by']}.csv"
    return web.Response(
        text=out.getvalue(),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{name}"'},
    )


# -- Requests -----------------------------------------------------------------------------------


async def requests(request: web.Request, session: Session) -> web.StreamResponse:
    plane = _plane(request)
    query = {name: request.query.get(name, "").strip() for name in ("key", "model", "status")}
    try:
        rows = (await _admin(request, admin.request_log, {**query, "limit": "200"}))["data"]
        error = None
    except ProxyError as exc:
        rows, error = [], exc.message
    names = _names(plane, teams=False)
    return render(
        request,
        "requests.html",
        session,
        rows=rows,
        query=query,
        error=error,
        key_choices=sorted(names.items(), key=lambda item: item[1]),
        models=list(request.app[runtime_key].deployments),
    )


async def request_details(request: web.Request, session: Session) -> web.StreamResponse:
    plane = _plane(request)
    row = await queries.request_row(plane, request.match_info["id"])
    if row is None:
        raise NotFound("No request has this id", param="id", code="request_not_found")
    row.pop("seq", None)
    row["time"] = _when(row["time"])
    return render(request, "request.html", session, row=row)


# -- Playground ---------------------------------------------------------------------------------


async def playground(request: web.Request, session: Session) -> web.StreamResponse:
    names = request.app[runtime_key].model_names(session.principal)
    return render(request, "playground.html", session, models=names)


PAGES: list[tuple[str, Page]] = [
    ("", overview),
    ("/models", models),
    ("/keys", keys),
    ("/spend", spend),
    ("/spend.csv", spend_csv),
    ("/requests", requests),
    ("/requests/{id}", request_details),
    ("/playground", playground),
]
